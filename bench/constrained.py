"""`python -m bench.constrained [--rounds 3]`: what structured output costs a batch, as a ratio in one run.

16 streams at once on the served default (one engine, in-process): every stream free, then half of them
held to a JSON schema (llguidance masks, server/engine/constraint.py), in turns round after round; the
tokens per second of each turn's wall time, medians. The constrained streams stop when their JSON closes,
so tokens are counted as produced, not asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from server.engine.request import SamplingParams
from server.runtime import Runtime
from server.settings import Settings

STREAMS = 16
TOKENS = 64
PROMPT = "Describe a ship and its crew."
SCHEMA = {"type": "object", "properties": {"ship": {"type": "string"}, "crew": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "role": {"type": "string"}},
    "required": ["name", "role"]}}}, "required": ["ship", "crew"]}


def tokens_per_second(rt: Runtime, params: list[SamplingParams]) -> float:
    prompt = rt.encode(messages=[{"role": "user", "content": PROMPT}])

    async def one(p: SamplingParams) -> int:
        return sum([len(event.token_ids) async for event in rt.engine.stream(prompt, p, None)])

    async def all_streams() -> list[int]:
        return await asyncio.gather(*(one(p) for p in params))

    started = time.perf_counter()
    produced = sum(asyncio.run(all_streams()))
    return produced / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.constrained", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as store:
        rt = Runtime(Settings(store_dir=Path(store), max_batch=STREAMS, max_seq_len=512, prefix_cache_mb=0))
        try:
            free = SamplingParams(max_new_tokens=TOKENS, temperature=0.8, seed=0)
            held = replace(free, grammar=rt.grammars.json_schema(SCHEMA))
            turns = {"free": [free] * STREAMS, "half constrained": [free, held] * (STREAMS // 2)}
            readings = {name: [] for name in turns}
            for round_ in range(args.rounds + 1):  # round 0 warms up
                for name, params in turns.items():
                    tps = tokens_per_second(rt, params)
                    if round_:
                        readings[name].append(tps)
        finally:
            rt.stop()
    print({name: [round(r) for r in values] for name, values in readings.items()})
    free_tps, held_tps = (statistics.median(readings[name]) for name in turns)
    print(f"{rt.weight_format}, {STREAMS} streams: free {free_tps:.0f} tok/s, half JSON-constrained "
          f"{held_tps:.0f} tok/s = {held_tps / free_tps:.2f}x")


if __name__ == "__main__":
    main()
