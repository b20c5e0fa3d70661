"""`python -m bench.quantized [--formats gguf int4] [--rounds 3] [--mixed 8]`: the served model's decode speed
per base weight format, as ratios against fp32 measured in the same run (also a step of `make bench`).

One engine (Runtime) per format, each in its own process, all loaded at once and timed in turns (fp32, then
each format, round after round), so a slow spell of the host hits every format alike: greedy requests of
TOKENS tokens, 1 stream and 16 at once, the tokens per second of each turn's wall time, and the median of the rounds. On the first
quantized format, 16 streams spread over `--mixed` q/v r=8 adapters (unmerged), against its own base.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from adapters import read_peft_folder
from bench.fixtures import QV_R8, adapter_names, write_adapters
from server.engine.request import SamplingParams
from server.runtime import Runtime
from server.settings import Settings

TOKENS = 48
PROMPT = "Tell me a long story about the sea."


def tokens_per_second(rt: Runtime, streams: int, adapters: list[str | None] | None = None) -> float:
    """Tokens per second of `streams` greedy requests at once; stream i asks for adapters[i % len]."""
    params = SamplingParams(max_new_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    names = adapters or [None]
    picked = [names[i % len(names)] for i in range(streams)]
    return decode_rate(rt, PROMPT, [(params, rt.registry.get(n) if n else None) for n in picked])


def decode_rate(rt: Runtime, prompt: str, requests: list[tuple[SamplingParams, object]]) -> float:
    """Tokens per second of the wall time of `requests` ((params, adapter or None) each) run at once, all
    asking `prompt` as a user message."""
    prompt_ids = rt.encode(messages=[{"role": "user", "content": prompt}])

    async def one(params: SamplingParams, adapter) -> int:
        return sum([len(event.token_ids) async for event in rt.engine.stream(prompt_ids, params, adapter)])

    async def all_streams() -> list[int]:
        return await asyncio.gather(*(one(params, adapter) for params, adapter in requests))

    started = time.perf_counter()
    produced = sum(asyncio.run(all_streams()))
    return produced / (time.perf_counter() - started)


_runtime: Runtime | None = None  # the engine of a format's own process (see `run`)


def _start(fmt: str, store: str, adapters: dict[str, Path] | None) -> None:
    global _runtime
    _runtime = Runtime(Settings(store_dir=Path(store), max_batch=16, max_seq_len=512, quantization=fmt,
                                prefix_cache_mb=0))
    for name, folder in (adapters or {}).items():
        _runtime.registry.add(read_peft_folder(folder, name), persist=False)


def _reading(streams: int, names: list[str] | None) -> float:
    return tokens_per_second(_runtime, streams, names)


def _describe_and_stop() -> dict:
    _runtime.stop()
    return {"weight_format": _runtime.weight_format, "base_weight_bytes": _runtime.base_weight_bytes}


def run(formats: list[str], rounds: int, adapters: dict[str, Path] | None = None) -> dict:
    """Readings per format ("none" is fp32, always measured): tok/s at 1 and 16 streams, base bytes, and,
    given `adapters` (name -> PEFT folder), 16 streams spread over them on the first quantized format.

    Each format's engine lives in its own process, all started at once and read in turns: engines sharing
    a process slow each other's one-stream decode (libgomp wakes a team's workers from futex sleep, not
    spinning, once its threads outnumber the cores; bench/README.md), which one server never meets."""
    formats = ["none", *[f for f in formats if f != "none"]]
    mixed_on = formats[1] if adapters and len(formats) > 1 else None
    turns = [(fmt, n, None) for fmt in formats for n in (1, 16)]
    turns += [(mixed_on, 16, list(adapters))] if mixed_on else []
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as store, contextlib.ExitStack() as stack:
        engines = {fmt: stack.enter_context(ProcessPoolExecutor(
            1, mp_context=spawn, initializer=_start,
            initargs=(fmt, str(Path(store) / fmt), adapters if fmt == mixed_on else None))) for fmt in formats}
        readings = {(fmt, n, bool(names)): [] for fmt, n, names in turns}
        for round_ in range(rounds + 1):  # round 0 warms up, each adapter into its slot
            for fmt, n, names in turns:
                tps = engines[fmt].submit(_reading, n, names).result()
                if round_:
                    readings[fmt, n, bool(names)].append(tps)
        described = {fmt: engine.submit(_describe_and_stop).result() for fmt, engine in engines.items()}
    result = {fmt: described[fmt] | {"streams_1": statistics.median(readings[fmt, 1, False]),
                                     "streams_16": statistics.median(readings[fmt, 16, False])} for fmt in formats}
    if mixed_on:
        result[mixed_on]["mixed_16"] = statistics.median(readings[mixed_on, 16, True])
        result[mixed_on]["mixed_adapters"] = len(adapters)
    return result


def render(result: dict) -> str:
    fp32 = result["none"]
    lines = [f"{'format':<16} {'base MiB':>9} {'1 stream':>9} {'vs fp32':>8} {'16 streams':>11} {'vs fp32':>8} "
             f"{'16 mixed':>9} {'vs own base':>11}"]
    for reading in result.values():
        mixed = reading.get("mixed_16")
        lines.append(f"{reading['weight_format']:<16} {reading['base_weight_bytes'] >> 20:>9} "
                     f"{reading['streams_1']:>9.1f} {reading['streams_1'] / fp32['streams_1']:>7.2f}x "
                     f"{reading['streams_16']:>11.1f} {reading['streams_16'] / fp32['streams_16']:>7.2f}x "
                     + (f"{mixed:>9.1f} {mixed / reading['streams_16']:>10.2f}x" if mixed else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quantized", description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["gguf", "int4"], choices=("gguf", "int4", "int8"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mixed", type=int, default=8, help="q/v r=8 adapters for the mixed reading (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-adapters-") as work:
        adapters = None
        if args.mixed:
            folders = write_adapters(QV_R8, args.mixed, Path(work))
            adapters = {name: folders[name] for name in adapter_names(QV_R8, args.mixed)}
        print(render(run(args.formats, args.rounds, adapters)))


if __name__ == "__main__":
    main()
