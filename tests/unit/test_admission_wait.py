"""How long the loop waits for closed-loop clients' next requests (server.engine.admission.AdmissionWait)."""

import pytest

from server.engine.admission import AdmissionWait


def test_a_wait_is_bounded_by_its_share_of_the_step_and_by_the_maximum():
    wait = AdmissionWait(max_s=0.025, step_fraction=0.1)
    assert wait.budget(step_s=0.1) == pytest.approx(0.01)
    assert wait.budget(step_s=1.0) == pytest.approx(0.025)


def test_zero_maximum_never_waits():
    assert AdmissionWait(max_s=0.0).budget(step_s=1.0) == 0.0


def test_waits_that_do_not_pay_stop_all_but_every_probe():
    wait = AdmissionWait(max_s=0.025, probe_every=4)
    misses = 0
    while wait.hit_rate >= wait.worth_it:
        wait.record(awaited=2, arrived=0)
        misses += 1
    assert misses == 3  # a few misses in a row, not one unlucky step
    budgets = [wait.budget(step_s=0.2) for _ in range(12)]
    assert [b > 0 for b in budgets] == [False, False, False, True] * 3


def test_waits_resume_once_probes_find_the_clients_coming_back():
    wait = AdmissionWait(max_s=0.025, probe_every=4)
    for _ in range(10):
        wait.record(awaited=1, arrived=0)
    probes = 0
    while wait.hit_rate < wait.worth_it:
        if wait.budget(step_s=0.2) > 0:
            probes += 1
            wait.record(awaited=1, arrived=1)
    assert probes <= 3
    assert all(wait.budget(step_s=0.2) > 0 for _ in range(5))


def test_partial_arrivals_count_in_proportion():
    wait = AdmissionWait(max_s=0.025)
    wait.record(awaited=4, arrived=2)
    assert wait.hit_rate == pytest.approx(0.75 + 0.25 * 0.5)

