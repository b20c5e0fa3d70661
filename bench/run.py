"""`python -m bench.run [--quick]`: the whole benchmark, one thing measured at a time.

Order: in-process micro-benchmarks (fresh process each), then a real server per LoRA mode driven over
127.0.0.1 (nothing else computes meanwhile), a restart over the stored adapters, then the
transformers/PEFT baselines (fresh process, after the last server stopped). Prints a table of ratios and
targets; writes JSON, text and a PNG to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import baselines, cold_adapter, constrained, llamacpp, micro, quantized, report, steadiness, targets
from bench.targets import AGAIN, MIX_WORKLOAD
from bench.fixtures import (ALL_R16, NEW_TOKENS, PROMPT, QV_R8, SMOLLM2_SHAPES, adapter_names, folder_files,
                            write_adapters)
from bench.load import request_body, run_streams, session, stream_request
from bench.serving import BenchServer, counters_delta
from bench.table import render
from server.model.loader import resolve_model

RESULTS_DIR = Path(__file__).parent / "results"
_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


LONE_REQUESTS = 8  # the TTFT target's denominator is their median: a few can read twice the usual


@dataclass
class Workload:
    name: str
    streams: int
    pick: Callable[[int, int], str | dict[str, float] | None]  # a name, a 50/50 mix {name: weight}, None: base


def zipf_picker(names: list[str], streams: int, rounds: int, seed: int = 0) -> Callable[[int, int], str]:
    """Adapter k (1-based rank) drawn with probability proportional to 1/k, fixed per (stream, request)."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(len(names))]
    draws = {(i, r): rng.choices(names, weights)[0] for i in range(streams) for r in range(rounds + 1)}
    return lambda i, r: draws[(i, r)]


def auto_workloads(qv: list[str], wide: list[str], zipf: list[str], stream_counts: list[int],
                   rounds: int) -> list[Workload]:
    base16 = Workload("base-16", 16, lambda i, r: None)
    mixed8 = Workload("mixed8-16", 16, lambda i, r: qv[(i + r) % 8])
    all8 = Workload("all8-16", 16, lambda i, r: wide[(i + r) % 8])
    mix2 = Workload(MIX_WORKLOAD, 16, lambda i, r: {qv[(i + r) % 8]: 0.5, qv[(i + r + 1) % 8]: 0.5})
    # The targets' workloads twice, the second time in mirror order right after the first: each ratio to the
    # base takes the mean of both runs of each side, centred on the same moment, so a steady drift cancels,
    # and the block is short, so little unsteady drift falls in it (docs/decisions.md).
    targets = [base16, mixed8, mix2, all8]
    loads = [Workload("lone", 1, lambda i, r: None), *targets,
             *(Workload(f"{w.name}{AGAIN}", w.streams, w.pick) for w in reversed(targets))]
    for n in stream_counts:
        loads += [*([] if n == 16 else [Workload(f"base-{n}", n, lambda i, r: None),
                                         Workload(f"mixed8-{n}", n, lambda i, r: qv[(i + r) % 8])]),
                  Workload(f"zipf100-{n}", n, zipf_picker(zipf, n, rounds))]
    return loads + [Workload("single-16", 16, lambda i, r: qv[0])]


def mode_workloads(qv: list[str], single_again: bool = False) -> list[Workload]:
    """`single_again` runs the single adapter a second time before the last base run: base, single, ...,
    single, base puts both figures' mean at the same moment, so a steady drift cancels out of their ratio."""
    single = Workload("single-16", 16, lambda i, r: qv[0])
    return [Workload("base-16", 16, lambda i, r: None), single,
            Workload("mixed8-16", 16, lambda i, r: qv[(i + r) % 8]),
            *([Workload(f"single-16{AGAIN}", 16, single.pick)] if single_again else []),
            Workload(f"base-16{AGAIN}", 16, lambda i, r: None)]


def run_workloads(server: BenchServer, workloads: list[Workload], rounds: int) -> dict[str, dict]:
    results = {}
    for w in workloads:
        started = time.perf_counter()
        before = server.engine_counters()
        r = asyncio.run(run_streams(server.url, w.name, w.streams, rounds if w.streams > 1 else LONE_REQUESTS,
                                    w.pick, NEW_TOKENS, PROMPT, server.pid))
        results[w.name] = {**r.as_dict(), "engine": counters_delta(before, server.engine_counters())}
        log(f"  {server.label:8s} {w.name:12s} {r.tokens_per_s:7.1f} tok/s  TTFT p99 {r.ttft_p99 * 1e3:6.0f} ms"
            f"  ({time.perf_counter() - started:.0f}s)")
    return results


async def _one_request(url: str, adapter: str | None, new_tokens: int):
    async with session() as client:
        return await stream_request(client, url, request_body(adapter, new_tokens, PROMPT))


def upload_to_ready(server: BenchServer, name: str, folder: Path) -> dict:
    """Seconds from starting the upload to the first token of the first request that uses the adapter."""
    upload_s = server.upload(name, folder)
    first = asyncio.run(_one_request(server.url, name, 1))
    return {"upload_s": upload_s, "first_token_s": first.ttft, "total_s": upload_s + first.ttft}


def serve_auto(store: Path, folders: dict[str, dict[str, Path]], stream_counts: list[int], rounds: int) -> dict:
    qv, wide = list(folders["qv"]), list(folders["all"])
    with BenchServer(store, "auto") as server:
        log(f"auto server healthy in {server.start_s:.1f}s (empty store)")
        asyncio.run(_one_request(server.url, None, 4))  # first forward pays one-off kernel set-up
        rss_before = server.rss_mb()
        ready = upload_to_ready(server, qv[0], folders["qv"][qv[0]])
        everything = {**folders["qv"], **folders["all"]}
        for name, folder in everything.items():
            if name != qv[0]:
                server.upload(name, folder)
        uploaded = sum(len(data) for folder in everything.values() for data in folder_files(folder).values())
        rss_after = server.rss_mb()
        log(f"uploaded {len(everything)} adapters; RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
        workloads = run_workloads(server, auto_workloads(qv[:8], wide, qv, stream_counts, rounds), rounds)
        return {"start_s": server.start_s, "upload_to_ready": ready, "workloads": workloads,
                "rss_before_uploads_mb": rss_before, "rss_after_uploads_mb": rss_after,
                "uploaded_adapters": len(everything), "uploaded_file_bytes": uploaded}


def serve_mode(store: Path, mode: str, qv: dict[str, Path], rounds: int, label: str | None = None,
               extra_args: tuple[str, ...] = (), single_again: bool = False) -> dict:
    with BenchServer(store, mode, extra_args=extra_args, label=label) as server:
        log(f"{server.label} server healthy in {server.start_s:.1f}s")
        for name, folder in qv.items():
            server.upload(name, folder)
        asyncio.run(_one_request(server.url, None, 4))
        workloads = run_workloads(server, mode_workloads(list(qv), single_again), rounds)
        return {"start_s": server.start_s, "workloads": workloads}


def restart(store: Path) -> dict:
    stored = sum(1 for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))
    with BenchServer(store, "auto") as server:
        log(f"restart over {stored} stored adapters: healthy in {server.start_s:.1f}s")
        return {"start_s": server.start_s, "stored_adapters": stored}


def batch16_reading(when: str, model_dir: str, qv8: dict[str, Path], quick: bool) -> dict:
    log(f"baselines: transformers and PEFT mixed-batch generate b16, {when}")
    return in_fresh_process(baselines.batch16, model_dir, qv8, quick)


def probe_contention(load_average: float, earlier: dict[str, dict]) -> dict:
    """A contention probe, judged against the run's `earlier` probes too (by name)."""
    result = in_fresh_process(micro.contention_probe)
    if not steadiness.free_at({**earlier, "now": result})["now"]:
        log(f"warning: the cores look shared ({steadiness.gemm(result)}; load average {load_average:.2f}): "
            "figures will be skewed")
    return result


def wait_until_quiet(minutes: float, in_a_row: int = 3, every_s: float = 15) -> None:
    """On a shared VM a neighbour's spell can last many minutes; a run inside one measures the neighbour."""
    deadline, quiet, one_best = time.monotonic() + 60 * minutes, 0, 0.0
    while quiet < in_a_row and time.monotonic() < deadline:
        result = in_fresh_process(micro.contention_probe)
        one_best = max(one_best, result["one_thread_gflops"])
        quiet = quiet + 1 if steadiness.cores_look_free(result, one_best) else 0
        log(f"waiting for quiet cores: {steadiness.gemm(result)} ({quiet} of {in_a_row} free in a row)")
        if quiet < in_a_row:
            time.sleep(every_s)
    if quiet < in_a_row:
        log(f"the cores did not look free {in_a_row} times in a row within {minutes:g} min: starting anyway")


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 streams only, fewer rounds and repeats (~5 min)")
    parser.add_argument("--rounds", type=int, default=None, help="measured requests per stream (default 2; quick 1)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON, text and PNG go")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="MINUTES",
                        help="before starting, probe every 15 s until three probes in a row find the cores free, "
                             "for at most this long (default 0: start at once)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keeps the generated adapter folders between runs (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the `with` blocks stop the servers and remove the temp stores.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.wait_quiet:
        wait_until_quiet(args.wait_quiet)
    run_started = time.perf_counter()
    rounds = args.rounds or (1 if args.quick else 2)
    stream_counts = [16] if args.quick else [16, 64]
    started = time.strftime("%Y-%m-%d %H:%M")
    load_start = os.getloadavg()[0]
    probes = {"contention_probe_start": probe_contention(load_start, {})}
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as tmp:
        work, stores = args.work_dir or Path(tmp), Path(tmp)
        folders = {"qv": write_adapters(QV_R8, 100, work / "adapters"),
                   "all": write_adapters(ALL_R16, 8, work / "adapters")}
        qv8 = {n: folders["qv"][n] for n in adapter_names(QV_R8, 8)}
        log("micro-benchmarks: model")
        results: dict = {"micro": in_fresh_process(micro.run_model_micro, qv8, folders["all"], args.quick)}
        log("quantized base (QLoRA) against fp32, engines in-process")
        results["quantized"] = in_fresh_process(quantized.run, ["gguf"], 2 if args.quick else 3, qv8)
        log("structured output: half of 16 streams JSON-constrained against all free")
        results["constrained"] = in_fresh_process(constrained.run, 2 if args.quick else 3)
        if llamacpp.available():
            log("baseline: llama.cpp on the same GGUF (optional, `pip install -e '.[llamacpp]'`)")
            results["llamacpp"] = in_fresh_process(llamacpp.run, 2 if args.quick else 3)
        log("micro-benchmarks: registry memory and load_stored")
        counts = [100] if args.quick else [100, 1000]
        results["registry"] = in_fresh_process(micro.run_registry_micro, folders["qv"]["qv-0000"], counts,
                                               SMOLLM2_SHAPES)
        model_dir = str(resolve_model(None).path)
        batch16 = [batch16_reading("before the servers", model_dir, qv8, args.quick)]
        results["servers"] = {"auto": serve_auto(stores / "store-auto", folders, stream_counts, rounds)}
        probes["contention_probe_between"] = probe_contention(os.getloadavg()[0], probes)
        batch16.append(batch16_reading("between the servers", model_dir, qv8, args.quick))
        for mode in ("merged", "unmerged"):
            # hot-swap is what these measure: on the fp32 base, where merging pays (a quantized base is
            # served unmerged by auto, and `auto` above serves the quantized default)
            results["servers"][mode] = serve_mode(stores / f"store-{mode}", mode, qv8, rounds,
                                                  extra_args=("--quantization", "none"),
                                                  single_again=mode == "merged")  # the merged-vs-base target
        # every bench request sends the same prompt, so the prefix cache computes it once per adapter: this
        # server shows what the same traffic costs when each prompt is computed in full
        results["servers"]["nocache"] = serve_mode(stores / "store-nocache", "auto", qv8, rounds, label="nocache",
                                                   extra_args=("--prefix-cache-mb", "0", "--quantization", "none"))
        log("cold adapters: 16 streams with and without requests for adapters read back from the store")
        results["servers"]["cold"] = cold_adapter.run(stores / "store-cold", folders["qv"], rounds)
        results["restart"] = restart(stores / "store-auto")
        log("baselines: transformers and PEFT (in-process)")
        fresh = write_adapters(QV_R8, 101, work / "adapters")["qv-0100"]
        results["baselines"] = baselines.pooled(
            batch16, in_fresh_process(baselines.run_all, model_dir, qv8, fresh, args.quick))
        log("baseline: transformers generate b16 with its weights in huge pages, as the server keeps its own")
        results["baselines"]["hf_huge_pages"] = in_fresh_process(baselines.hf_batch16_in_huge_pages, model_dir,
                                                                 args.quick)
    probes["contention_probe_end"] = probe_contention(os.getloadavg()[0], probes)
    results["targets"] = [t.as_dict() for t in targets.evaluate(results)]
    served = results["quantized"].get("gguf", results["quantized"]["none"])["weight_format"]  # what auto served
    results["meta"] = {"model": "SmolLM2-135M-Instruct", "dtype": served, "new_tokens": NEW_TOKENS,
                       "rounds": rounds, "quick": args.quick, "started": started,
                       "threads": results["micro"]["threads"], "seconds": time.perf_counter() - run_started,
                       "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
                       **probes, **machine()}
    results["host_unsteady"] = steadiness.findings(results)
    table = render(results)
    print(table)
    paths = report.write(results, table, args.out, "quick" if args.quick else "latest")
    log(f"wrote {', '.join(str(p) for p in paths)}")
    return results


if __name__ == "__main__":
    main()
