"""`python -m bench.grammar_engines [--rounds 5]`: the per-token cost of a JSON-schema mask in each grammar
engine installed (llguidance, which the server uses; xgrammar and outlines-core from the `grammars` extra),
as ratios to llguidance in one run.

The served default's tokenizer, bench.constrained's schema and one valid document of it, tokenized: each
engine compiles the schema once, then walks 1 and 16 matchers through the document's tokens, each step
filling every matcher's row of a token bitmask and advancing it by its token (what the sampler does per
constrained row). Medians of per-token times over rounds; compile time is reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from bench.constrained import SCHEMA
from server.model.loader import load_tokenizer, resolve_model

STREAMS = (1, 16)


def sample_document() -> str:
    """A compact document valid against SCHEMA (the server's grammars keep JSON whitespace compact)."""
    crew = [{"name": f"Sailor {i}", "role": "deckhand" if i % 2 else "cook"} for i in range(16)]
    return json.dumps({"ship": "The Grey Gull", "crew": crew}, separators=(",", ":"))


class Engine:
    """One grammar engine: `compile()` once, then `matchers(n)` gives n fresh matchers, each a pair of
    (fill its row of `bitmask`, advance by a token)."""

    def __init__(self, name: str, compile_: Callable[[], object],
                 matcher: Callable[[object], tuple[Callable, Callable]], allocate: Callable[[int], torch.Tensor]):
        self.name, self._compile, self._matcher, self.allocate = name, compile_, matcher, allocate

    def compiled(self) -> tuple[object, float]:
        start = time.perf_counter()
        grammar = self._compile()
        return grammar, time.perf_counter() - start

    def matchers(self, grammar: object, n: int) -> list[tuple[Callable, Callable]]:
        return [self._matcher(grammar) for _ in range(n)]


def llguidance_engine(tokenizer) -> Engine:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)

    def compile_():
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                             overrides={"whitespace_flexible": False})

    def matcher(grammar):
        m = llguidance.LLMatcher(ll_tokenizer, grammar)
        return (lambda mask, row: llguidance.torch.fill_next_token_bitmask(m, mask, row)), m.consume_token

    return Engine("llguidance", compile_, matcher,
                  lambda n: llguidance.torch.allocate_token_bitmask(n, ll_tokenizer.vocab_size))


def xgrammar_engine(tokenizer) -> Engine:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def matcher(compiled):
        m = xgrammar.GrammarMatcher(compiled)
        return (lambda mask, row: m.fill_next_token_bitmask(mask, row)), m.accept_token

    return Engine("xgrammar", lambda: compiler.compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")),
                  matcher, lambda n: xgrammar.allocate_token_bitmask(n, info.vocab_size))


def outlines_core_engine(tokenizer) -> Engine:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from outlines_core.kernels.torch import allocate_token_bitmask, fill_next_token_bitmask
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # outlines-core takes tokens as the bytes they stand for: undo the byte-level BPE alphabet
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    tokens: dict[bytes, list[int]] = {}
    for token, id_ in tokenizer.get_vocab().items():
        if id_ not in special:
            tokens.setdefault(bytes(byte_of[ch] for ch in token), []).append(id_)
    vocabulary = Vocabulary(tokenizer.eos_token_id, tokens)
    vocab_size = len(tokenizer)

    def matcher(index):
        guide = Guide(index)
        def fill(mask, row):  # its kernel takes a one-row mask: a row of the batch's is one
            fill_next_token_bitmask(guide, mask[row:row + 1])
        return fill, guide.advance

    return Engine("outlines-core", lambda: Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary),
                  matcher, lambda n: allocate_token_bitmask(vocab_size).repeat(n, 1))


ENGINES = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine, "outlines-core": outlines_core_engine}


def per_token_seconds(engine: Engine, grammar: object, tokens: list[int], streams: int) -> float:
    """Seconds per generated token of one row: a walk of `streams` matchers through `tokens`."""
    matchers = engine.matchers(grammar, streams)
    bitmask = engine.allocate(streams)
    start = time.perf_counter()
    for token in tokens:
        for row, (fill, advance) in enumerate(matchers):
            fill(bitmask, row)
            advance(token)
    return (time.perf_counter() - start) / (len(tokens) * streams)


def check_walk(engine: Engine, grammar: object, tokens: list[int]) -> float:
    """Every token of the document is allowed by the mask before it (else the timing means nothing); returns
    the seconds to the first mask of a fresh matcher (engines that compile lazily pay here)."""
    start = time.perf_counter()
    (fill, advance), = engine.matchers(grammar, 1)
    bitmask = engine.allocate(1)
    fill(bitmask, 0)
    first_mask_s = time.perf_counter() - start
    for i, token in enumerate(tokens):
        word = int(bitmask[0, token // 32]) & 0xFFFFFFFF
        if not (word >> (token % 32)) & 1:
            raise RuntimeError(f"{engine.name} refuses token {i} ({token}) of the sample document")
        advance(token)
        fill(bitmask, 0)
    return first_mask_s


def run(rounds: int, names: list[str]) -> dict[str, dict]:
    tokenizer = load_tokenizer(resolve_model(None))
    tokens = tokenizer.encode(sample_document(), add_special_tokens=False)
    results: dict[str, dict] = {}
    for name in names:
        try:
            engine = ENGINES[name](tokenizer)
        except ImportError as exc:
            results[name] = {"missing": str(exc)}
            continue
        grammar, compile_s = engine.compiled()
        first_mask_s = check_walk(engine, grammar, tokens)
        results[name] = {"compile_ms": compile_s * 1e3, "first_mask_ms": first_mask_s * 1e3, **{
            f"us_per_token_{n}": statistics.median(
                per_token_seconds(engine, grammar, tokens, n) for _ in range(rounds)) * 1e6 for n in STREAMS}}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grammar_engines", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    args = parser.parse_args()
    results = run(args.rounds, args.engines)
    base = results.get("llguidance", {})
    for name, r in results.items():
        if "missing" in r:
            print(f"{name}: not installed ({r['missing']}); pip install -e '.[grammars]'")
            continue
        cells = []
        for n in STREAMS:
            key = f"us_per_token_{n}"
            ratio = f" ({r[key] / base[key]:.2f}x llguidance)" if key in base else ""
            cells.append(f"{n} stream(s) {r[key]:.1f} us/token/row{ratio}")
        print(f"{name}: compile {r['compile_ms']:.0f} ms, first mask {r['first_mask_ms']:.1f} ms; " + "; ".join(cells))


if __name__ == "__main__":
    main()
