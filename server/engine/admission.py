"""How long the serving loop waits, after a step that finished requests, for their clients' next ones.

Agents, batch jobs and benchmark clients send their next request as soon as the last one ends; it reaches
the engine just after the next step has started, so without a wait it sits through that whole step before
its own and its time to first token is two steps under load. Waiting a little lets it join the next step
instead, and the wait ends as soon as it is in: the dynamic-batching delay of Triton's `max_queue_delay`,
spent only where it is likely to pay.

Each wait costs at most `step_fraction` of a step (0.4 by default). Where waits stop paying (open-loop
traffic: a chat user types for seconds), the loop stops waiting, but still records when the next requests
come after a step that finished some, so waits resume as soon as they would pay again (learning only from
occasional probe waits left each burst's first requests a step late). Once the engine runs dry it forgets:
what the last clients of a burst did says nothing of the next burst's, and a wait with nobody else running
costs nobody anything. `make bench` measures it (TTFT p99 against a lone request); the figures behind each
rule are in docs/decisions.md.
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
