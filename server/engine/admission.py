"""How long the serving loop waits, after a step that finished requests, for their clients' next ones.

Agents, batch jobs and benchmark clients send their next request as soon as the last one ends. In the
bench's 16-stream load that request reached the engine 13, 16, 19 and 21 ms (quartiles and 90th
percentile) after the step that ended its predecessor (loopback HTTP, client and server in Python, on 2
busy cores), just after the next step had started, so it sat through that whole step before its own:
time to first token was two steps under load. Waiting a little for it lets it join the next step
instead, and the wait ends as soon as it is in. This is the dynamic-batching delay of Triton's
`max_queue_delay`, spent only where it is likely to pay.

On a 2-core Zen 5 EPYC, once the route stopped hopping to worker threads, such requests were submitted
4.3, 5.2, 8.0 and 8.9 ms after that step: a wait of 0.15 of a 25 ms step caught about a quarter of them;
0.3 and 0.45 caught most, for TTFT mean 53 -> 38-39 ms at 16 streams, with no throughput lost over 8
servers in turns (the loop idles only until they are in, and the next step runs full). 0.4 is the default.

Each wait costs at most `step_fraction` of a step. Where waits stop paying (open-loop traffic: a chat
user types for seconds), the loop stops waiting. The engine still records when the next requests come
after a step that finished some, without waiting for them, so waits resume as soon as they would pay
again: an earlier version learned only from occasional probe waits, and in the bench each workload began
in that skipping state (the last requests of the one before had no successors), so about half its
requests sat out a step before their own (TTFT in two clusters, 28-38 and 46-70 ms, at 16 streams).

Once the engine runs dry it forgets: what the last clients of a burst did (leave, with no next request)
says nothing of the next burst's, and a wait with nobody else running costs nobody anything. Before, the
first three requests of each closed-loop burst sat out a step while the misses of the last one's drain
were unlearned: 6 of 96 requests at 16 streams on a 2-core Zen 3 EPYC, 62-70 ms to a first token in the
server against 34-44 for the rest, and the bench's TTFT p99.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Clock:
    """The serving loop's time and sleeps; tests drive the loop on a fake one (tests/unit/test_engine_loop.py)."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, wake: threading.Event, timeout: float) -> bool:
        return wake.wait(timeout)


class AdmissionWait:
    def __init__(self, max_s: float, step_fraction: float = 0.4, worth_it: float = 0.5):
        self.max_s = max_s
        self.step_fraction = step_fraction
        self.worth_it = worth_it
        self.hit_rate = 1.0  # recent share of awaited requests that came (or would have come) in time

    def window(self, step_s: float) -> float:
        """The longest wait after a step of `step_s`, whether or not waits are paying now."""
        return min(self.max_s, self.step_fraction * step_s) if self.max_s > 0 else 0.0

    def budget(self, step_s: float) -> float:
        """Seconds to wait after a step of `step_s` that finished requests (0: start the next step now)."""
        return self.window(step_s) if self.hit_rate >= self.worth_it else 0.0

    def forget(self) -> None:
        """The engine has run dry: the next burst starts out waiting again."""
        self.hit_rate = 1.0

    def record(self, awaited: int, arrived: int) -> None:
        """After a step that finished requests: `arrived` of the `awaited` next ones came within the window
        (waited for, or observed without waiting)."""
        self.hit_rate = 0.75 * self.hit_rate + 0.25 * min(arrived, awaited) / awaited


class SuccessorWait:
    """The loop's side of admission: after a step that finished requests, waits up to `AdmissionWait`'s
    budget for their clients' next ones, or, while waits do not pay, watches when they come within the
    window a wait would have had, so `AdmissionWait` learns either way."""

    def __init__(self, policy: AdmissionWait, clock: Clock):
        self.policy = policy
        self.clock = clock
        self._watch: tuple[float, float, int] | None = None  # (step end, window end, requests awaited)
        self._hits = 0

    def idle(self) -> None:
        """The loop ran dry (see the module docstring): nothing watched, waits start out paying again."""
        self._watch = None
        self.policy.forget()

    def arrived(self, at: float) -> None:
        """A request submitted at `at` reached the loop."""
        if self._watch is not None and self._watch[0] <= at <= self._watch[1]:
            self._hits += 1

    def settle(self, force: bool = False) -> None:
        """Records how many awaited requests came within a skipped wait's window, once it has passed."""
        if self._watch is not None and (force or self.clock.now() >= self._watch[1]):
            self.policy.record(self._watch[2], self._hits)
            self._watch = None

    def after_step(self, step_s: float, awaited: int, queued: Callable[[], int], wake: threading.Event,
                   stop: threading.Event, catch_up: Callable[[], None]) -> float | None:
        """After a step of `step_s` that finished requests whose `awaited` successors would fit: waits until
        `queued()` holds them, the budget runs out or `stop` is set, and returns the seconds waited; or, where
        a wait does not pay, starts watching (after `catch_up()` has taken in what is queued) and returns None."""
        if awaited <= 0:
            return None
        budget = self.policy.budget(step_s)
        if budget <= 0:
            window = self.policy.window(step_s)
            if window > 0:
                catch_up()  # the last watch's requests may sit in the inbox since the step began: count them first
                self.settle(force=True)
                now = self.clock.now()
                self._watch, self._hits = (now, now + window, awaited), 0
            return None
        started = self.clock.now()
        deadline = started + budget
        while queued() < awaited and not stop.is_set():
            wake.clear()
            remaining = deadline - self.clock.now()
            if remaining <= 0 or queued() >= awaited:
                break
            self.clock.wait(wake, remaining)
        self.policy.record(awaited, queued())
        return self.clock.now() - started
