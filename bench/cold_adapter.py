"""`python -m bench.cold_adapter [--rounds 2] [--gap-s 0.5]`: whether 16 streams keep their pace while
requests for cold adapters (weights evicted to the store by --max-resident-adapters) arrive among them, as
ratios in one run (also a step of `make bench`).

A real server (`python -m server`, the default model, 127.0.0.1) holds ADAPTERS q/v r8 adapters with
RESIDENT of them in memory. 16 closed-loop streams (bench.load) ask for 8 hot adapters, which stay the most
recently used and so in memory; beside them one more client sends a short request at a time, GAP_S after
the last one answered, for an adapter of its own. Three phases:

- `alone-16`: the 16 streams alone (the goal's baseline);
- `warm-16`: the extra client asks for a hot adapter (an extra request, no read);
- `cold-16`: it asks for the other adapters in turn; they outnumber the memory left, so each is the
  least recently used when asked for, read back from the store, loaded into a device slot and prefilled.

Every extra request starts with a number of its own, so none reuses a cached prompt and warm and cold
requests cost the batch the same prefill; the difference between them is the read. The phases run in
mirror order (none, warm, cold, cold, warm, none) and each pair is pooled, so a steady drift cancels.
Printed: the 16 streams' TTFT p99 and inter-token p99 per phase, cold over none (the goal: TTFT p99 <= 2x)
and cold over warm.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.fixtures import NEW_TOKENS, PROMPT, QV_R8, write_adapters
from bench.load import percentile, request_body, run_streams, session, stream_request
from bench.serving import BenchServer, counters_delta
from bench.targets import AGAIN

STREAMS = 16
HOT = 8
ADAPTERS = 64
RESIDENT = 16  # the hot 8, and 8 that the cold requests cycle through: 56 cold ones outnumber them
EXTRA_TOKENS = 8
PHASES = ("alone-16", "warm-16", "cold-16")


def log(message: str) -> None:
    print(f"[cold_adapter] {message}", file=sys.stderr, flush=True)


async def extra_requests(url: str, names: Iterator[str], gap_s: float, done: asyncio.Event) -> list[dict]:
    """One request at a time until `done`, each for the next of `names`, each prompt its own."""
    sent = []
    async with session(2) as client:
        while not done.is_set():
            name = next(names)
            body = request_body(name, EXTRA_TOKENS, f"Request {name} {len(sent)}. {PROMPT}")
            result = await stream_request(client, url, body)
            sent.append({"adapter": name, "ttft": result.ttft, "latency": result.latency, "error": result.error})
            try:
                await asyncio.wait_for(done.wait(), gap_s)
            except asyncio.TimeoutError:
                pass
    return sent


async def phase(server: BenchServer, name: str, hot: list[str], extra: Iterator[str] | None, rounds: int,
                gap_s: float) -> dict:
    done = asyncio.Event()
    background = asyncio.ensure_future(extra_requests(server.url, extra, gap_s, done)) if extra else None
    try:
        streams = await run_streams(server.url, name, STREAMS, rounds, lambda i, r: hot[(i + r) % len(hot)],
                                    NEW_TOKENS, PROMPT, server.pid)
    finally:
        done.set()
    sent = await background if background else []
    failed = [s for s in sent if s["error"]]
    if failed:
        raise RuntimeError(f"{name}: {len(failed)} extra requests failed, first: {failed[0]['error']}")
    ttfts = [s["ttft"] for s in sent]
    return {**streams.as_dict(), "extra_requests": len(sent),
            "extra_ttft_p50": percentile(ttfts, 50), "extra_ttft_p99": percentile(ttfts, 99)}


def summarize(workloads: dict) -> dict:
    """Per phase: the 16 streams' TTFT p99 over the phase's two runs pooled, their inter-token p99 (the mean of
    the two runs'), and the extra requests' own TTFT p50."""
    out = {}
    for name in PHASES:
        runs = [workloads[n] for n in (name, f"{name}{AGAIN}") if n in workloads]
        out[name] = {"ttft_p99": percentile([t for run in runs for t in run["ttfts"]], 99),
                     "itl_p99": statistics.mean(run["itl_p99"] for run in runs),
                     "requests": sum(run["requests"] for run in runs),
                     "extra_requests": sum(run["extra_requests"] for run in runs),
                     "extra_ttft_p50": statistics.median(run["extra_ttft_p50"] for run in runs)
                     if runs[0]["extra_requests"] else float("nan")}
    return out


def run(store: Path, folders: dict[str, Path], rounds: int, gap_s: float = 0.5) -> dict:
    """`folders`: name -> PEFT folder of at least ADAPTERS q/v r8 adapters (bench.fixtures.write_adapters)."""
    names = sorted(folders)[:ADAPTERS]
    hot, cold = names[:HOT], names[HOT:]
    with BenchServer(store, "auto", extra_args=("--max-resident-adapters", str(RESIDENT)),
                     label="cold") as server:
        log(f"server healthy in {server.start_s:.1f}s; uploading {len(names)} adapters, {RESIDENT} kept in memory")
        for name in names:
            server.upload(name, folders[name])
        asyncio.run(run_streams(server.url, "warm-up", STREAMS, 1, lambda i, r: hot[(i + r) % HOT], 8, PROMPT,
                                server.pid))
        # one cycle through the cold adapters over both cold runs: each request asks for the least recently used
        extra = {"alone-16": None, "warm-16": itertools.repeat(hot[0]), "cold-16": itertools.cycle(cold)}
        order = [*PHASES, *(f"{p}{AGAIN}" for p in reversed(PHASES))]
        workloads = {}
        for name in order:
            started, before = time.perf_counter(), server.engine_counters()
            reading = asyncio.run(phase(server, name, hot, extra[name.removesuffix(AGAIN)], rounds, gap_s))
            workloads[name] = {**reading, "engine": counters_delta(before, server.engine_counters())}
            e = workloads[name]["engine"]
            slow = sum(e[f"{k}_steps"] - e[f"{k}_steps_within_100ms"] for k in ("decode", "prefill"))
            log(f"{name:18s} TTFT p99 {reading['ttft_p99'] * 1e3:5.0f} ms  inter-token p99 "
                f"{reading['itl_p99'] * 1e3:4.0f} ms  {reading['extra_requests']:2d} extra requests; engine: "
                f"{slow:.0f} steps over 100 ms, {e['cover_builds']:.0f} cover builds in {e['cover_build_s']:.1f} s, "
                f"{e['slot_loads']:.0f} slot loads, {e['gc_pauses_s']:.1f} s in GC "
                f"({time.perf_counter() - started:.0f}s)")
    return {"start_s": server.start_s, "workloads": workloads, "adapters": len(names), "resident": RESIDENT,
            "hot": HOT, "gap_s": gap_s, "summary": summarize(workloads)}


def render(reading: dict) -> str:
    s = reading["summary"]
    none, warm, cold = (s[p] for p in PHASES)
    lines = [f"{STREAMS} streams over {reading['hot']} hot adapters, {reading['adapters']} registered, "
             f"{reading['resident']} in memory; one extra request at a time, {reading['gap_s']:g} s apart:",
             f"{'phase':14}{'TTFT p99 ms':>12}{'x alone':>9}{'inter-token p99 ms':>20}{'x alone':>9}"
             f"{'extra requests':>16}{'their TTFT p50 ms':>19}"]
    for name in PHASES:
        p = s[name]
        lines.append(f"{name:14}{p['ttft_p99'] * 1e3:>12.0f}{p['ttft_p99'] / none['ttft_p99']:>9.2f}"
                     f"{p['itl_p99'] * 1e3:>20.0f}{p['itl_p99'] / none['itl_p99']:>9.2f}{p['extra_requests']:>16}"
                     f"{p['extra_ttft_p50'] * 1e3:>19.0f}")
    lines.append(f"cold over warm: TTFT p99 {cold['ttft_p99'] / warm['ttft_p99']:.2f}x, inter-token p99 "
                 f"{cold['itl_p99'] / warm['itl_p99']:.2f}x (the read's share)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_adapter", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="measured requests per stream and phase run")
    parser.add_argument("--gap-s", type=float, default=0.5, help="seconds between an extra request's answer and "
                                                                   "the next one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as work:
        folders = write_adapters(QV_R8, ADAPTERS, Path(work) / "adapters")
        print(render(run(Path(work) / "store", folders, args.rounds, args.gap_s)))


if __name__ == "__main__":
    main()
