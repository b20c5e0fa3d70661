"""`python -m bench.micro_detokenizer`: streaming detokenization per token, as a ratio.

Times `server.engine.detokenizer.Detokenizer` (a short window decoded per token) against decoding the whole
output again for every token (the simplest correct method) in the same run, with the default model's
tokenizer, at several output lengths. The cost is per token and per running sequence, on the engine thread.
"""

from __future__ import annotations

import time

from transformers import AutoTokenizer

from server.engine.detokenizer import Detokenizer
from server.model.loader import resolve_model

TEXT = "The lighthouse keeper wrote in her log every night; the lamp was steady, 🙂 and the sea was calm. "
TIMED = 50  # the last tokens of each output, where the cost of a length shows


def whole_output_per_token(tokenizer, ids: list[int]) -> float:
    """Seconds per token for the last TIMED tokens, decoding everything so far at each."""
    start = time.perf_counter()
    for end in range(len(ids) - TIMED + 1, len(ids) + 1):
        tokenizer.decode(ids[:end], skip_special_tokens=True)
    return (time.perf_counter() - start) / TIMED


def windowed(tokenizer, ids: list[int]) -> float:
    """Seconds per token for the last TIMED tokens through the server's Detokenizer, fed the rest first."""
    detok = Detokenizer(tokenizer, ())
    for token in ids[:-TIMED]:
        detok.add(token)
    start = time.perf_counter()
    for token in ids[-TIMED:]:
        detok.add(token)
    return (time.perf_counter() - start) / TIMED


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None).path))
    ids = tokenizer(TEXT * 60).input_ids
    print(f"{'output tokens':>13} {'whole output us/token':>22} {'window us/token':>16} {'speed-up':>9}")
    for length in (64, 256, 1000):
        full = min(whole_output_per_token(tokenizer, ids[:length]) for _ in range(5))
        window = min(windowed(tokenizer, ids[:length]) for _ in range(5))
        print(f"{length:13d} {full * 1e6:22.0f} {window * 1e6:16.0f} {full / window:8.1f}x")


if __name__ == "__main__":
    main()
