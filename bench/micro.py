"""In-process micro-benchmarks (no HTTP), each against a baseline taken in the same process.

- the matmul ceiling: fp32 GEMM throughput of a [64,576]x[576,1536] product through the server's own
  `Linear` (oneDNN when available), the yardstick for the model's achieved FLOP/s;
- decode-step time of the serving model, bare vs with a LoraSlots plan (one adapter, 8 mixed), at batch
  1, 16 and 64;
- a decode step with one adapter merged vs the bare base (the hot-swap itself is timed in turns with
  PEFT's, by bench.baselines);
- the registry: resident memory added per registered adapter, and load_stored time.

Run each of `run_model_micro` and `run_registry_micro` in a fresh process (bench.run does), so RSS deltas
and thread pools belong to that benchmark alone.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoTokenizer

from adapters import AdapterLimits, AdapterRegistry, AdapterStore, read_peft_folder
from bench.fixtures import NEW_TOKENS, PROMPT, folder_files
from server.engine.kv_cache import KVCache
from server.heap import keep_freed_memory
from server.lora.layers import LoraSlots
from server.lora.merge import merge_into_base, restore_base
from server.model.backend import Backend, resolve_backend
from server.model.context import build_step
from server.model.geometry import parse_module_key, projection_rows, site_layouts
from server.model.linear import Linear
from server.model.loader import resolve_model
from server.model.weights import LoadedModel


def _median_seconds(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_ceiling_gflops(backend: Backend, reps: int) -> float:
    m, k, n = 64, 576, 1536
    linear = Linear(torch.randn(n, k), None, backend)
    x = torch.randn(m, k)
    with torch.inference_mode():
        for _ in range(3):
            linear(x)
        best = float("inf")
        for _ in range(reps):  # a ceiling: noise only ever slows a run down, so keep the best
            started = time.perf_counter()
            for _ in range(20):
                linear(x)
            best = min(best, (time.perf_counter() - started) / 20)
    return 2 * m * k * n / best / 1e9


def contention_probe() -> dict:
    """GEMM throughput on one thread and on all: when other processes hold the cores, torch's thread team
    waits on its descheduled members and all threads together fall far below one thread's rate. And the
    memory read rate on all threads, which a GEMM hardly notices: decode streams its weights, so a
    neighbour that takes memory bandwidth slows the server and not the compute-bound baselines."""
    threads = torch.get_num_threads()
    backend = resolve_backend(torch.device("cpu"), torch.float32)
    torch.set_num_threads(1)
    one = matmul_ceiling_gflops(backend, reps=5)
    torch.set_num_threads(threads)
    return {"one_thread_gflops": one, "all_threads_gflops": matmul_ceiling_gflops(backend, reps=5),
            "threads": threads, "read_gbps": read_gbps()}


def read_gbps(mib: int = 512, reps: int = 5) -> float:
    """GB/s of a `sum` over a buffer far larger than the caches, best of `reps` (noise only slows it)."""
    data = torch.ones(mib * 2**20 // 4)
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def params_per_token(loaded: LoadedModel) -> int:
    """Weights each generated token is multiplied through: every projection plus the (tied) lm_head."""
    model = loaded.transformer
    return sum(lin.out_features * lin.in_features for layer in model.layers for lin in layer.linears.values()) + \
        model.lm_head.out_features * model.lm_head.in_features


class DecodeBench:
    """Times one decode step of `batch` sequences, each `kv_len` tokens in, as the engine would run it."""

    def __init__(self, loaded: LoadedModel, max_batch: int, kv_len: int):
        self.model = loaded.transformer
        self.kv = KVCache(loaded.config, max_batch, kv_len + 8, self.model.device, self.model.dtype)
        self.kv.k.zero_()
        self.kv.v.zero_()
        self.kv_len = kv_len

    def step(self, batch: int, lora_plan):
        """A zero-argument callable running one decode step of `batch` rows with `lora_plan`."""
        ctx = build_step([self.kv_len - 1] * batch, [], self.model.device)
        ctx.lora = lora_plan
        ids = torch.randint(0, self.model.cfg.vocab_size, (batch,), generator=torch.Generator().manual_seed(0))
        return lambda: self.model.forward(ids, ctx, self.kv)


def interleaved_medians(steps: dict[str, object], reps: int) -> dict[str, float]:
    """Median seconds of each callable, timed in turns (a, b, c, a, b, c, ...) so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(reps + 2):
        for name, fn in steps.items():
            started = time.perf_counter()
            fn()
            if i >= 2:  # the first two turns warm up
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(ts) for name, ts in times.items()}


def plan_build_seconds(slots: LoraSlots, row_slots: list[int], reps: int) -> float:
    """What the engine pays whenever the rows' adapters change (a request joins, leaves or moves slot):
    plan() rebuilds when its key changes, so alternating two orders of the same rows rebuilds every call."""
    orders = [row_slots, row_slots[1:] + row_slots[:1]]
    calls = iter(range(10**9))
    return _median_seconds(lambda: slots.plan(orders[next(calls) % 2]), reps)


def lora_overhead(loaded: LoadedModel, qv: list, wide: list, batches: list[int], prompt_tokens: int,
                  reps: int) -> list[dict]:
    cfg = loaded.config
    model = loaded.transformer
    slots = LoraSlots(cfg.num_layers, site_layouts(cfg), len(qv) + len(wide), model.backend)
    for slot, adapter in enumerate(qv + wide):
        slots.set_lora(slot, adapter)
    bench = DecodeBench(loaded, max(batches), kv_len=prompt_tokens + NEW_TOKENS // 2)
    rows = []
    for batch in batches:
        variants = {"base": None, "qv_single": [0] * batch, "qv_mixed8": [i % len(qv) for i in range(batch)],
                    "all_mixed8": [len(qv) + i % len(wide) for i in range(batch)]}
        steps = {label: bench.step(batch, slots.plan(row_slots) if row_slots else None)
                 for label, row_slots in variants.items()}
        medians = interleaved_medians(steps, reps)
        row = {"batch": batch, "base_step_s": medians["base"]}
        for label in ("qv_single", "qv_mixed8", "all_mixed8"):
            row[f"{label}_step_s"] = medians[label]
            row[f"{label}_ratio"] = medians[label] / medians["base"]
            row[f"{label}_plan_s"] = plan_build_seconds(slots, variants[label], reps)
        rows.append(row)
    return rows


class SwapCycle:
    """One hot-swap, merge_into_base + restore_base of `adapter`, as a zero-argument callable; `exact()`
    says whether every weight it touched computes with the bits it had when this was made. bench.baselines
    times it in turns with PEFT's merge + unmerge, in the same process."""

    def __init__(self, loaded: LoadedModel, adapter):
        self.loaded, self.adapter = loaded, adapter
        model = loaded.transformer
        self.touched = {}
        for key in adapter.weights:
            layer, proj = parse_module_key(key)
            linear = model.linear(layer, projection_rows(model.cfg, proj)[0])
            self.touched[id(linear)] = linear
        self.before = {key: lin.effective_weight().clone() for key, lin in self.touched.items()}

    def __call__(self) -> None:
        restore_base(merge_into_base(self.loaded.transformer, self.adapter, self.loaded.checkpoint))

    def exact(self) -> bool:
        return all(torch.equal(lin.effective_weight(), self.before[key]) for key, lin in self.touched.items())


def merged_step(loaded: LoadedModel, adapter, batch: int, kv_len: int, reps: int) -> dict:
    """A decode step with `adapter` merged into the base vs the bare base step, timed in turns (merging and
    restoring between them, untimed): what merged mode costs per step, without the server's noise."""
    bench = DecodeBench(loaded, batch, kv_len)
    step = bench.step(batch, None)
    times: dict[str, list[float]] = {"base": [], "merged": []}
    for i in range(reps + 2):
        for label in times:
            merged = merge_into_base(loaded.transformer, adapter, loaded.checkpoint) if label == "merged" else None
            started = time.perf_counter()
            step()
            if i >= 2:
                times[label].append(time.perf_counter() - started)
            if merged is not None:
                restore_base(merged)
    base, with_adapter = statistics.median(times["base"]), statistics.median(times["merged"])
    return {"batch": batch, "base_step_s": base, "merged_step_s": with_adapter, "ratio": with_adapter / base}


def run_model_micro(qv_folders: dict[str, Path], wide_folders: dict[str, Path], quick: bool) -> dict:
    keep_freed_memory()  # as the server's Runtime does
    device, dtype = torch.device("cpu"), torch.float32
    backend = resolve_backend(device, dtype)
    folder = resolve_model(None)
    loaded = LoadedModel(folder, backend)
    prompt_tokens = len(AutoTokenizer.from_pretrained(str(folder.path))(PROMPT).input_ids)
    qv = [read_peft_folder(folder, name) for name, folder in qv_folders.items()]
    wide = [read_peft_folder(folder, name) for name, folder in wide_folders.items()]
    reps = 5 if quick else 15
    return {
        "backend": backend.linear,
        "threads": torch.get_num_threads(),
        "params_per_token": params_per_token(loaded),
        "matmul_ceiling_gflops": matmul_ceiling_gflops(backend, reps),
        "lora_overhead": lora_overhead(loaded, qv, wide, [1, 16, 64], prompt_tokens, reps),
        "merged_step": merged_step(loaded, qv[0], 16, prompt_tokens + NEW_TOKENS // 2, reps),
    }


def run_registry_micro(folder: Path, counts: list[int], shapes: dict) -> dict:
    """Registers copies of one adapter folder through the upload path (parse, validate, store), measuring
    the resident memory they add; then times a fresh registry's load_stored over the same store."""
    files = folder_files(folder)
    file_bytes = sum(len(data) for data in files.values())
    process = psutil.Process()
    limits = AdapterLimits(max_adapters=max(counts))
    out = {"file_bytes": file_bytes, "counts": []}
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-store-") as root:
        registry = AdapterRegistry(AdapterStore(Path(root)), shapes, limits)
        gc.collect()
        rss0 = process.memory_info().rss
        started = time.perf_counter()
        for count in counts:
            while len(registry) < count:
                registry.register_upload(f"copy-{len(registry):05d}", files)
            gc.collect()
            added = process.memory_info().rss - rss0
            out["counts"].append({"adapters": count, "rss_added_bytes": added, "per_adapter_bytes": added / count,
                                  "per_adapter_vs_file": added / count / file_bytes,
                                  "upload_s_per_adapter": (time.perf_counter() - started) / count})
        del registry
        gc.collect()
        fresh = AdapterRegistry(AdapterStore(Path(root)), shapes, limits)
        started = time.perf_counter()
        loaded = fresh.load_stored()
        out["load_stored_s"] = time.perf_counter() - started
        out["load_stored_count"] = len(loaded)
    return out
