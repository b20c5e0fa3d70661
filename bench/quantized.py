"""`python -m bench.quantized [--formats gguf int4] [--rounds 3]`: the served model's decode speed per base
weight format, as ratios against fp32 measured in the same run.

One engine (Runtime) per format, all loaded at once and timed in turns (fp32, then each format, round after
round), so a slow spell of the host hits every format alike: greedy requests of TOKENS tokens, 1 stream and
16 at once, the tokens per second of each turn's wall time, and the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from server.engine.request import SamplingParams
from server.runtime import Runtime
from server.settings import Settings

TOKENS = 48
PROMPT = "Tell me a long story about the sea."


def tokens_per_second(rt: Runtime, streams: int) -> float:
    prompt = rt.encode(messages=[{"role": "user", "content": PROMPT}])
    params = SamplingParams(max_new_tokens=TOKENS, temperature=0.0, ignore_eos=True)

    async def one() -> int:
        return sum([len(event.token_ids) async for event in rt.engine.stream(prompt, params, None)])

    async def all_streams() -> list[int]:
        return await asyncio.gather(*(one() for _ in range(streams)))

    started = time.perf_counter()
    produced = sum(asyncio.run(all_streams()))
    return produced / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quantized", description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["gguf", "int4"], choices=("gguf", "int4", "int8"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    formats = ["none", *args.formats]
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as store:
        runtimes = {fmt: Runtime(Settings(store_dir=Path(store) / fmt, max_batch=16, max_seq_len=512,
                                          quantization=fmt, prefix_cache_mb=0)) for fmt in formats}
        try:
            for rt in runtimes.values():
                tokens_per_second(rt, 1)  # warm-up
            readings = {(fmt, n): [] for fmt in formats for n in (1, 16)}
            for _ in range(args.rounds):
                for fmt, rt in runtimes.items():
                    for n in (1, 16):
                        readings[fmt, n].append(tokens_per_second(rt, n))
        finally:
            for rt in runtimes.values():
                rt.stop()
    print(f"{'format':<16} {'base MiB':>9} {'1 stream':>9} {'vs fp32':>8} {'16 streams':>11} {'vs fp32':>8}")
    for fmt in formats:
        one, sixteen = (statistics.median(readings[fmt, n]) for n in (1, 16))
        base_one, base_sixteen = (statistics.median(readings["none", n]) for n in (1, 16))
        rt = runtimes[fmt]
        print(f"{rt.weight_format:<16} {rt.base_weight_bytes >> 20:>9} {one:>9.1f} {one / base_one:>7.2f}x "
              f"{sixteen:>11.1f} {sixteen / base_sixteen:>7.2f}x")


if __name__ == "__main__":
    main()
