"""The loraplex server under test: a real `python -m server` process on 127.0.0.1, started by the bench.

Reuses the integration tests' ServerProcess (free loopback port, health polling, clean stop).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.fixtures import folder_files
from tests.integration.server_process import ServerProcess


class BenchServer:
    def __init__(self, store_dir: Path, lora_mode: str, max_batch: int = 64, log_dir: Path | None = None,
                 extra_args: tuple[str, ...] = (), label: str | None = None):
        self.lora_mode = lora_mode
        self.label = label or lora_mode
        log_path = (log_dir or store_dir.parent) / f"server-{self.label}-{store_dir.name}.log"
        self.process = ServerProcess(store_dir, "--lora-mode", lora_mode, "--max-batch", str(max_batch),
                                     *extra_args, log_path=log_path)
        self.start_s = float("nan")

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def __enter__(self) -> BenchServer:
        started = time.perf_counter()
        self.process.start(timeout=300)
        self.start_s = time.perf_counter() - started
        return self

    def __exit__(self, *exc) -> None:
        self.process.stop()

    def rss_mb(self) -> float:
        return psutil.Process(self.pid).memory_info().rss / 2**20

    def upload(self, name: str, folder: Path) -> float:
        """Uploads a PEFT folder under `name`; returns the seconds until the server answered 201."""
        parts = [("files", (file_name, data)) for file_name, data in folder_files(folder).items()]
        started = time.perf_counter()
        with httpx.Client(base_url=self.url, timeout=120) as client:
            response = client.post("/adapters", data={"name": name}, files=parts)
        if response.status_code != 201:
            raise RuntimeError(f"upload of {name} failed: {response.status_code} {response.text[:300]}")
        return time.perf_counter() - started

    def engine_counters(self) -> dict[str, float]:
        """The engine's running totals from /metrics: steps and their time by kind (and how many took over
        100 ms), merges, restores, cover builds and slot loads, garbage-collector pauses (and how many over 50
        ms). Two readings' difference says what a workload cost the engine, which its tokens/s and TTFT
        alone do not (a long step, a cover build or a collection behind a latency outlier)."""
        with httpx.Client(base_url=self.url, timeout=30) as client:
            text = client.get("/metrics").text
        totals = dict.fromkeys([f"{kind}_steps{part}" for kind in ("decode", "prefill")
                                for part in ("", "_s", "_within_100ms")]
                               + ["gc_pauses", "gc_pauses_s", "gc_pauses_within_50ms", *_ENGINE_TOTALS.values()], 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, sample.value
                if name in ("loraplex_step_seconds_count", "loraplex_step_seconds_sum"):
                    totals[f"{labels['kind']}_steps" + ("_s" if name.endswith("sum") else "")] = value
                elif name == "loraplex_step_seconds_bucket" and labels["le"] == "0.1":
                    totals[f"{labels['kind']}_steps_within_100ms"] = value
                elif name in ("loraplex_gc_pause_seconds_count", "loraplex_gc_pause_seconds_sum"):
                    key = "gc_pauses" + ("_s" if name.endswith("sum") else "")
                    totals[key] += value
                elif name == "loraplex_gc_pause_seconds_bucket" and labels["le"] == "0.05":
                    totals["gc_pauses_within_50ms"] += value
                elif name in _ENGINE_TOTALS:
                    totals[_ENGINE_TOTALS[name]] = value
        return totals


_ENGINE_TOTALS = {"loraplex_merges_total": "merges", "loraplex_restores_total": "restores",
                  "loraplex_merge_seconds_total": "merge_s", "loraplex_lora_cover_builds_total": "cover_builds",
                  "loraplex_lora_cover_build_seconds_total": "cover_build_s",
                  "loraplex_adapter_slot_misses_total": "slot_loads"}


def counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}
