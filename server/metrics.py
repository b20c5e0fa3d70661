"""Prometheus metrics of the serving loop, recorded by the engine and scraped at /metrics.

Each app gets its own CollectorRegistry, so several servers (tests, benchmarks) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_STEP_BUCKETS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_GC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
BASE_LABEL = "__base__"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loraplex_requests", "finished generation requests", ["adapter", "finish_reason"], registry=r)
        self.tokens = Counter("loraplex_generated_tokens", "generated tokens", ["adapter"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "prompt tokens", ["adapter"], registry=r)
        self.latency = Histogram("loraplex_request_seconds", "request latency", ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loraplex_ttft_seconds", "time to first token", ["adapter"], buckets=_TTFT_BUCKETS, registry=r)
        self.batch = Histogram("loraplex_batch_size", "sequences per engine step", ["phase"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        # a step that carries a prompt chunk ("prefill") runs more rows than a decode-only one
        self.step = Histogram("loraplex_step_seconds", "engine step time, forward and sampling", ["kind"],
                              buckets=_STEP_BUCKETS, registry=r)
        self.gc_pause = Histogram("loraplex_gc_pause_seconds", "cyclic garbage collector runs, which hold the GIL",
                                  ["generation"], buckets=_GC_BUCKETS, registry=r)
        self.waiting = Gauge("loraplex_queue_waiting", "requests waiting for a batch slot", registry=r)
        self.running = Gauge("loraplex_queue_running", "requests in the running batch", registry=r)
        self.admission_wait_seconds = Counter("loraplex_admission_wait_seconds", "time spent after steps that "
                                              "finished requests, waiting for their clients' next ones", registry=r)
        self.merges = Counter("loraplex_merges", "hot-swap merges into the base weights", registry=r)
        self.restores = Counter("loraplex_restores", "exact restores of the base weights", registry=r)
        self.merge_seconds = Counter("loraplex_merge_seconds", "time spent merging and restoring", registry=r)
        self.resident = Gauge("loraplex_resident_adapters", "adapters resident on the compute device", registry=r)
        self.memory_adapters = Gauge("loraplex_memory_adapters", "adapters whose weights are in memory (the "
                                     "rest are read back from the store when asked for)", registry=r)
        self.memory_adapter_bytes = Gauge("loraplex_memory_adapter_bytes", "bytes of those weights, as held",
                                          registry=r)
        self.adapter_loads = Counter("loraplex_adapter_slot_misses", "adapter loads into a device slot", registry=r)
        self.adapter_hits = Counter("loraplex_adapter_slot_hits", "requests whose adapter was already resident", registry=r)
        self.cover_builds = Counter("loraplex_lora_cover_builds", "concatenated adapter sets built (a step "
                                    "waits for each)", registry=r)
        self.cover_build_seconds = Counter("loraplex_lora_cover_build_seconds", "time spent building them",
                                           registry=r)
        self.prefix_hit_tokens = Counter("loraplex_prefix_cache_hit_tokens",
                                         "prompt tokens whose KV came from the prefix cache", registry=r)
        self.prefix_bytes = Gauge("loraplex_prefix_cache_bytes", "KV held by the prefix cache", registry=r)
        self.base_weight_bytes = Gauge("loraplex_base_weight_bytes", "bytes of base weights resident (in their "
                                       "served format)", registry=r)
        self.rejected = Counter("loraplex_rejected_requests", "requests refused by a limit", ["reason"], registry=r)

    def observe_gc(self, generation: int, seconds: float) -> None:
        """A `server.heap.CollectionTimer` observer."""
        self.gc_pause.labels(str(generation)).observe(seconds)


def adapter_label(name: str | None) -> str:
    return name or BASE_LABEL


def exposition(registry: CollectorRegistry, adapters: frozenset[str] | None = None) -> bytes:
    """The text format; with an allow-list (a tenant's key), only its adapters' series, the base's and
    those not about one adapter: another tenant's adapter names are theirs to keep."""
    if adapters is None:
        return generate_latest(registry)
    shown = adapters | {BASE_LABEL}
    return generate_latest(_OnlyAdapters(registry, shown))


class _OnlyAdapters:
    def __init__(self, registry: CollectorRegistry, shown: frozenset[str]):
        self.registry = registry
        self.shown = shown

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if s.labels.get("adapter", BASE_LABEL) in self.shown]
            yield family
