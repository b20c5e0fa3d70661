"""What the serving loop reports: the Prometheus series (server.metrics) and the in-process counters
(`EngineStats`) that tests and the bench read. The loop calls one method per event; nothing here decides
anything about serving."""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.request import Sequence
from server.lora.mode_switch import Switch
from server.metrics import Metrics, adapter_label


@dataclass
class EngineStats:
    steps: int = 0
    prefill_steps: int = 0
    merges: int = 0
    restores: int = 0
    merge_seconds: float = 0.0


class EngineMetrics:
    def __init__(self, metrics: Metrics | None = None):
        self.prometheus = metrics or Metrics()
        self.stats = EngineStats()
        self._totals_seen: dict[object, float] = {}  # counter -> the running total it last advanced to

    def watch_queue(self, scheduler) -> None:
        """The queue gauges read the scheduler when scraped: set at each step, they kept the last busy step's
        counts once the engine went idle."""
        self.prometheus.running.set_function(lambda: len(scheduler.running))
        self.prometheus.waiting.set_function(lambda: len(scheduler.waiting))

    def rejected(self, reason: str) -> None:
        self.prometheus.rejected.labels(reason).inc()

    def switched(self, switch: Switch) -> None:
        m, stats = self.prometheus, self.stats
        if switch.restored:
            stats.restores += 1
            m.restores.inc()
        if switch.merged:
            stats.merges += 1
            m.merges.inc()
        stats.merge_seconds += switch.seconds
        m.merge_seconds.inc(switch.seconds)

    def step(self, seconds: float, decoded: int, prefilled: int, scheduler, covers) -> None:
        """A step of `decoded` decode and `prefilled` prompt sequences; the scheduler's and the LoRA covers'
        running totals as they stand after it."""
        m = self.prometheus
        m.step.labels("prefill" if prefilled else "decode").observe(seconds)
        self.stats.steps += 1
        self.stats.prefill_steps += bool(prefilled)
        for phase, count in (("decode", decoded), ("prefill", prefilled)):
            if count:
                m.batch.labels(phase).observe(count)
        slots = scheduler.adapter_slots
        self._count_up(m.adapter_loads, slots.loads)
        m.resident.set(len(slots.resident()))
        self._count_up(m.cover_builds, covers.builds)
        self._count_up(m.cover_build_seconds, covers.build_seconds)
        cache = scheduler.prefix_cache
        if cache is not None:
            self._count_up(m.prefix_hit_tokens, cache.hit_tokens)
            m.prefix_bytes.set(cache.bytes)

    def first_token(self, seq: Sequence) -> None:
        self.prometheus.ttft.labels(adapter_label(seq.adapter_name)).observe(seq.first_token_at - seq.arrived)

    def finished(self, seq: Sequence, reason: str, now: float) -> None:
        label = adapter_label(seq.adapter_name)
        m = self.prometheus
        m.requests.labels(label, reason).inc()
        m.tokens.labels(label).inc(len(seq.output_ids))
        m.prompt_tokens.labels(label).inc(len(seq.prompt_ids))
        m.latency.labels(label).observe(now - seq.arrived)

    def admission_waited(self, seconds: float) -> None:
        self.prometheus.admission_wait_seconds.inc(seconds)

    def _count_up(self, counter, total: float) -> None:
        """Advances a Prometheus counter (which only takes increments) to a running total kept elsewhere."""
        counter.inc(total - self._totals_seen.get(counter, 0))
        self._totals_seen[counter] = total
