"""Incremental text for streaming: new text per token, stop strings, and no half-written characters."""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""          # text released to the client so far
        self._ids: list[int] = []

    def add(self, token_id: int) -> tuple[str, bool]:
        """Appends a token; returns (newly released text, whether a stop string was reached)."""
        self._ids.append(token_id)
        full = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return "", False
        for s in self.stop:
            at = full.find(s, max(0, len(self.text) - len(s)))
            if at != -1:
                return self._release(full[:at]), True
        # hold back a tail that could be the start of a stop string
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._release(full[: len(full) - hold] if hold else full), False

    def flush(self) -> str:
        full = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        return self._release(full)

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta
