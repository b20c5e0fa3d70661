"""A request's output held to a grammar (a JSON schema, any JSON object, a regex) with llguidance: each step
a mask of the tokens the grammar allows next, then the chosen token consumed.

Why llguidance: it computes a row's mask from the grammar's lexer state in microseconds on CPU, so a
constrained request rides in the same mixed batch as the rest (`python -m bench.constrained` measures it).
"""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from server.errors import InvalidRequest


class Grammar:
    """A compiled grammar, immutable and shared; `matcher()` gives a request its own state."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, text: str, describes: str):
        self._tokenizer, self.text, self.describes = tokenizer, text, describes

    def matcher(self) -> Constraint:
        return Constraint(llguidance.LLMatcher(self._tokenizer, self.text), self._tokenizer.vocab_size)


class Constraint:
    def __init__(self, matcher: llguidance.LLMatcher, vocab: int):
        self._matcher, self.vocab = matcher, vocab

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)
        if self._matcher.is_error():
            raise RuntimeError(f"the output grammar failed: {self._matcher.get_error()}")

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the output grammar refused token {token}: {self._matcher.get_error()}")


def mask_disallowed(logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> torch.Tensor:
    """A copy of `logits` where each constrained row keeps only the tokens its grammar allows next (ids past
    the tokenizer's vocabulary, padding of the lm_head, are never allowed)."""
    logits = logits.clone()
    vocab = constraints[0].vocab
    bitmask = llguidance.torch.allocate_token_bitmask(len(rows), vocab)
    for i, constraint in enumerate(constraints):
        constraint.fill_mask(bitmask, i)
    picked = logits[rows, :vocab].contiguous()
    llguidance.torch.apply_token_bitmask_inplace(picked, bitmask)
    logits[rows, :vocab] = picked
    logits[rows, vocab:] = float("-inf")
    return logits


class Grammars:
    """Compiles requests' output constraints against the served tokenizer; invalid ones are refused
    (InvalidRequest) before anything is queued."""

    def __init__(self, hf_tokenizer):
        self._hf = hf_tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use (a third of a second)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf)
        return self._tokenizer

    def json_schema(self, schema: dict | bool | None) -> Grammar:
        """JSON that validates against `schema`; None: any JSON object (OpenAI's json_object)."""
        schema = {"type": "object"} if schema is None else schema
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides={"whitespace_flexible": False})
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"the JSON schema cannot be used: {exc}") from exc
        return self._checked(text, "a JSON schema")

    def regex(self, pattern: str) -> Grammar:
        return self._checked(llguidance.LLMatcher.grammar_from_regex(pattern), "a regex")

    def _checked(self, text: str, describes: str) -> Grammar:
        error = llguidance.LLMatcher.validate_grammar(text, self.tokenizer)
        if error:
            raise InvalidRequest(f"{describes} that cannot be used: {error}")
        return Grammar(self.tokenizer, text, describes)
