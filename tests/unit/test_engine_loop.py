"""The serving loop's waits for closed-loop clients' next requests (server.engine.admission), deadlines and
cancellation, on a fake clock and a fake model runner: each step takes 25 ms of simulated time, so which
step a request joins is the same on every run."""

import pytest

from server.engine.admission import AdmissionWait
from server.engine.engine import AsyncSink
from server.errors import Overloaded
from server.engine.request import SamplingParams
from tests.unit.engine_fakes import Events, Inline, Loop, fake_loop

STEP_S = 0.025
WINDOW_S = 0.4 * STEP_S  # the default step fraction, under the 30 ms maximum
PROMPT = 4
BACKGROUND = SamplingParams(max_new_tokens=400, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
AT_ONCE = 0.005   # a closed-loop client's next request, well inside the window
LATER = 0.1       # a chat user reading: long after the window


def loop_with_waits() -> Loop:
    return fake_loop(step_s=STEP_S, admission=AdmissionWait(max_s=0.030, step_fraction=0.4))


def chain(loop: Loop, gaps: list[float]) -> list:
    """Short requests one after another; the one after request i is sent gaps[i] after it ends."""
    sent = []

    def send(i: int) -> None:
        def next_one() -> None:
            loop.clock.at(loop.clock.now() + gaps[i], lambda: send(i + 1))
        sent.append(loop.submit(PROMPT, SHORT, on_finish=next_one if i < len(gaps) else None))

    send(0)
    return sent


def short_requests_beside_a_long_one(loop: Loop, gaps: list[float]) -> list[bool]:
    """For each short request after the first: whether it was computed in the very next step after the one
    that ended its predecessor. A long request keeps the batch busy meanwhile."""
    background = loop.submit(PROMPT, BACKGROUND)
    sent = chain(loop, gaps)
    loop.run_until(lambda: len(sent) == len(gaps) + 1 and sent[-1].finish_reason is not None)
    loop.engine.abort(background.seq)
    loop.run_until(lambda: background.finish_reason is not None)
    return [loop.first_step_of(b.seq) == loop.last_step_of(a.seq) + 1 for a, b in zip(sent, sent[1:])]


def test_a_request_sent_as_the_last_one_ends_joins_the_very_next_step():
    loop = loop_with_waits()
    assert short_requests_beside_a_long_one(loop, [AT_ONCE]) == [True]


def test_the_wait_ends_as_soon_as_the_awaited_request_is_in():
    loop = loop_with_waits()
    sent = chain(loop, [AT_ONCE])
    loop.run_until(lambda: len(sent) == 2 and sent[1].finish_reason is not None)
    step = loop.last_step_of(sent[0].seq)
    assert loop.runner.started[step + 1] == pytest.approx(loop.runner.started[step] + STEP_S + AT_ONCE)


def test_a_wait_nobody_answers_costs_its_window_and_no_more():
    loop = loop_with_waits()
    assert short_requests_beside_a_long_one(loop, [0.05]) == [False]
    ended = 1  # the first short request: its prompt and first token in step 0, its second token in step 1
    assert loop.runner.started[ended + 1] == pytest.approx(loop.runner.started[ended] + STEP_S + WINDOW_S)


def test_after_requests_with_no_successor_the_wait_resumes_once_clients_come_back():
    """Requests that end without a next one (the last of a batch job, a chat user reading) make the wait
    stop paying, so the loop stops waiting; when closed-loop clients come back, the arrivals it watches
    without waiting bring the wait back within a few requests."""
    joined = short_requests_beside_a_long_one(loop_with_waits(), [LATER] * 12 + [AT_ONCE] * 8)
    assert joined[:12] == [False] * 12
    # the first three come back while the loop is not waiting and sit out a step; having watched them
    # arrive in time, it waits again
    assert joined[12:] == [False] * 3 + [True] * 5


def test_after_a_lull_the_first_closed_loop_request_of_a_new_burst_joins_the_very_next_step():
    """The drain of a burst (its last requests have no successors) makes waits stop paying; once the loop
    has run dry it forgets that, so the next burst's first closed-loop request is waited for."""
    loop = loop_with_waits()
    assert short_requests_beside_a_long_one(loop, [LATER] * 6) == [False] * 6
    assert not loop.engine.scheduler.has_work()
    loop.engine.run_once()  # idle: the loop naps
    assert short_requests_beside_a_long_one(loop, [AT_ONCE] * 5) == [True] * 5


def test_without_the_lull_the_next_burst_starts_out_not_waiting():
    loop = loop_with_waits()
    joined = short_requests_beside_a_long_one(loop, [LATER] * 6 + [AT_ONCE] * 5)
    assert joined[6] is False


def test_with_no_admission_wait_a_successor_always_sits_out_a_step():
    loop = fake_loop(step_s=STEP_S)  # AdmissionWait(0): the engine's default
    assert short_requests_beside_a_long_one(loop, [AT_ONCE] * 4) == [False] * 4


def test_a_request_past_its_deadline_ends_with_timeout_and_frees_its_slot():
    loop = fake_loop(step_s=STEP_S, timeout_s=0.1)
    got = loop.submit(PROMPT, BACKGROUND)
    loop.run_until(lambda: got.finish_reason is not None)
    assert got.finish_reason == "timeout"
    # four steps reach 0.1 s exactly, which is not past it; the fifth is
    assert got.got[-1].completion_tokens == 5
    assert loop.engine.scheduler.kv.used == 0 and loop.engine.pending == 0


def test_an_aborted_request_ends_at_the_next_step_and_the_others_continue():
    loop = fake_loop(step_s=STEP_S)
    kept = loop.submit(PROMPT, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    aborted = loop.submit(PROMPT, BACKGROUND)
    loop.clock.at(2.5 * STEP_S, lambda: loop.engine.abort(aborted.seq))  # during the third step
    loop.run_until(lambda: kept.finish_reason is not None)
    assert aborted.finish_reason == "abort"
    assert aborted.got[-1].completion_tokens == 3
    assert kept.finish_reason == "length" and kept.got[-1].completion_tokens == 8
    assert [t for e in kept.got for t in e.token_ids] == [3] * 8
    assert loop.last_step_of(aborted.seq) == 2


def test_requests_for_one_prompt_are_queued_all_together_or_not_at_all():
    loop = fake_loop(step_s=STEP_S)
    loop.engine.max_pending = 3
    loop.submit(PROMPT, BACKGROUND)
    sinks = [AsyncSink(Inline(), Events()) for _ in range(3)]
    with pytest.raises(Overloaded, match="asks for 3"):
        loop.engine.submit_all(list(range(1, PROMPT + 1)), [BACKGROUND] * 3, None, sinks)
    assert loop.engine.pending == 1  # no place taken by the refused three
    seqs = loop.engine.submit_all(list(range(1, PROMPT + 1)), [BACKGROUND] * 2, None, sinks[:2])
    assert loop.engine.pending == 3 and len({s.id for s in seqs}) == 2


def test_the_queue_gauges_read_the_scheduler_when_scraped_so_an_idle_engine_shows_none():
    loop = fake_loop(step_s=STEP_S)
    registry = loop.engine.metrics.prometheus.registry

    def running() -> float:
        return registry.get_sample_value("loraplex_queue_running")

    sent = [loop.submit(PROMPT, SHORT) for _ in range(3)]
    loop.run_until(lambda: loop.engine.stats.steps >= 1)
    assert running() == 3
    loop.run_until(lambda: all(s.finish_reason is not None for s in sent))
    assert running() == 0 and registry.get_sample_value("loraplex_queue_waiting") == 0
