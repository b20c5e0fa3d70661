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
0.3 and 0.45 caught most, for TTFT mean 53 -> 38-39 ms at 16 streams, with no throughput lost over 18
runs in turns (the loop idles only until they are in, and the next step runs full). 0.4 is the default.

Each wait costs at most `step_fraction` of a step. Where waits stop paying (open-loop traffic: a chat
user types for seconds), the loop stops waiting and only probes now and then, so such traffic loses
at most `step_fraction / probe_every` of its steps' time.
"""

from __future__ import annotations


class AdmissionWait:
    def __init__(self, max_s: float, step_fraction: float = 0.4, probe_every: int = 8, worth_it: float = 0.5):
        self.max_s = max_s
        self.step_fraction = step_fraction
        self.probe_every = probe_every
        self.worth_it = worth_it
        self.hit_rate = 1.0  # recent share of awaited requests that did arrive in time
        self._skipped = 0

    def budget(self, step_s: float) -> float:
        """Seconds to wait after a step of `step_s` that finished requests (0: start the next step now)."""
        if self.max_s <= 0:
            return 0.0
        if self.hit_rate < self.worth_it:
            self._skipped += 1
            if self._skipped % self.probe_every:
                return 0.0
        return min(self.max_s, self.step_fraction * step_s)

    def record(self, awaited: int, arrived: int) -> None:
        """After a wait for `awaited` requests, of which `arrived` came in time."""
        self.hit_rate = 0.75 * self.hit_rate + 0.25 * min(arrived, awaited) / awaited
