"""Incremental text for streaming: new text per token, stop strings, and no half-written characters.

Each token decodes a short window (the tokens since the text last grew, and the few before them for
context), as TGI's and vLLM's incremental detokenizers do: decoding the whole output again for every
token costs in proportion to the output's length, on the engine thread, per sequence
(`python -m bench.micro_detokenizer`; figures in docs/decisions.md).
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""          # text released to the client so far
        self._decoded = ""      # text decoded so far: released, or held back for a possible stop string
        self._ids: list[int] = []
        self._prefix = 0        # ids[_prefix:_read]: context that new tokens are decoded after
        self._read = 0          # ids before this are in _decoded

    def add(self, token_id: int) -> tuple[str, bool]:
        """Appends a token; returns (newly released text, whether a stop string was reached)."""
        self._ids.append(token_id)
        self._decoded += self._new_text(final=False)
        for s in self.stop:
            at = self._decoded.find(s, max(0, len(self.text) - len(s)))
            if at != -1:
                return self._release(self._decoded[:at]), True
        # hold back a tail that could be the start of a stop string
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._release(self._decoded[: len(self._decoded) - hold] if hold else self._decoded), False

    def flush(self) -> str:
        self._decoded += self._new_text(final=True)
        return self._release(self._decoded)

    def _new_text(self, final: bool) -> str:
        """Text the tokens after `_read` add, once it is whole (a multi-byte character may span tokens)."""
        context = self.tokenizer.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        window = self.tokenizer.decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(window) <= len(context) or (window.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(context) :]

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta
