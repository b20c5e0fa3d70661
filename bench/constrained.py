"""`python -m bench.constrained [--rounds 3]`: what structured output costs a batch, as a ratio in one run
(also a step of `make bench`).

16 streams at once on the served default (one engine, in-process): every stream free, then half of them
held to a JSON schema (llguidance masks, server/engine/constraint.py), in turns round after round; the
tokens per second of each turn's wall time, medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.quantized import decode_rate
from server.engine.request import SamplingParams
from server.runtime import Runtime
from server.settings import Settings

STREAMS = 16
TOKENS = 64
PROMPT = "Describe a ship and its crew."
# at least 16 crew members: a constrained reply outlasts TOKENS, so both turns decode 16 rows throughout and
# the ratio is the masks' cost, not shorter replies leaving a smaller batch
MEMBER = {"type": "object", "properties": {"name": {"type": "string"}, "role": {"type": "string"}},
          "required": ["name", "role"]}
SCHEMA = {"type": "object", "required": ["ship", "crew"], "properties": {
    "ship": {"type": "string"}, "crew": {"type": "array", "minItems": 16, "items": MEMBER}}}


def run(rounds: int) -> dict:
    """Medians of 16 free streams and of 16 with half JSON-constrained, read in turns."""
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-") as store:
        rt = Runtime(Settings(store_dir=Path(store), max_batch=STREAMS, max_seq_len=512, prefix_cache_mb=0))
        try:
            free = SamplingParams(max_new_tokens=TOKENS, temperature=0.8, seed=0)
            held = replace(free, grammar=rt.grammars.json_schema(SCHEMA))
            turns = {"free": [free] * STREAMS, "half_constrained": [free, held] * (STREAMS // 2)}
            readings = {name: [] for name in turns}
            for round_ in range(rounds + 1):  # round 0 warms up
                for name, params in turns.items():
                    tps = decode_rate(rt, PROMPT, [(p, None) for p in params])
                    if round_:
                        readings[name].append(tps)
        finally:
            rt.stop()
    return {"weight_format": rt.weight_format, "streams": STREAMS,
            **{name: statistics.median(values) for name, values in readings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.constrained", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    result = run(parser.parse_args().rounds)
    print(f"{result['weight_format']}, {STREAMS} streams: free {result['free']:.0f} tok/s, half JSON-constrained "
          f"{result['half_constrained']:.0f} tok/s = {result['half_constrained'] / result['free']:.2f}x")


if __name__ == "__main__":
    main()
