"""How long the loop waits for closed-loop clients' next requests (server.engine.admission.AdmissionWait)."""

import pytest

from server.engine.admission import AdmissionWait


def test_a_wait_is_bounded_by_its_share_of_the_step_and_by_the_maximum():
    wait = AdmissionWait(max_s=0.025, step_fraction=0.1)
    assert wait.budget(step_s=0.1) == pytest.approx(0.01)
    assert wait.budget(step_s=1.0) == pytest.approx(0.025)


def test_zero_maximum_never_waits():
    assert AdmissionWait(max_s=0.0).budget(step_s=1.0) == 0.0


def test_waits_that_do_not_pay_stop_while_the_window_stays_known():
    wait = AdmissionWait(max_s=0.025, step_fraction=0.1)
    misses = 0
    while wait.budget(step_s=0.2) > 0:
        wait.record(awaited=2, arrived=0)
        misses += 1
    assert misses == 3  # a few misses in a row, not one unlucky step
    assert wait.window(step_s=0.2) == pytest.approx(0.02)  # what a wait would take, to watch arrivals against


def test_waits_resume_after_a_few_arrivals_observed_in_time():
    wait = AdmissionWait(max_s=0.025)
    for _ in range(10):
        wait.record(awaited=1, arrived=0)
    assert wait.budget(step_s=0.2) == 0.0
    observed = 0
    while wait.budget(step_s=0.2) == 0.0:
        wait.record(awaited=1, arrived=1)  # the engine's record of arrivals it did not wait for
        observed += 1
    assert observed <= 3


def test_partial_arrivals_count_in_proportion():
    wait = AdmissionWait(max_s=0.025)
    wait.record(awaited=4, arrived=2)
    assert wait.hit_rate == pytest.approx(0.75 + 0.25 * 0.5)


def test_an_idle_engine_forgets_the_misses_of_the_last_burst():
    wait = AdmissionWait(max_s=0.025)
    for _ in range(10):
        wait.record(awaited=1, arrived=0)
    assert wait.budget(step_s=0.2) == 0.0
    wait.forget()
    assert wait.budget(step_s=0.2) == pytest.approx(0.025)
