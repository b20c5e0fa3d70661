"""What the client returns: small dataclasses mirroring the server's JSON (unknown fields are ignored)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypedDict


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerationParams(TypedDict, total=False):
    """Sampling parameters of POST /generate; a parameter left out takes the server's default."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    ignore_eos: bool
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: dict[int, float]
    json_schema: dict  # the output is JSON that validates against it
    regex: str         # the output matches it
    n: int             # choices for the one prompt (GenerateResult.choices); seeded: choice i uses seed + i


def _known_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class GenerateResult:
    """The reply; with n > 1, `text` and `finish_reason` are the first choice's and `choices` holds all n."""

    text: str
    adapter: str | None
    finish_reason: str
    usage: Usage
    choices: tuple[Choice, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerateResult:
        choices = tuple(Choice(**_known_fields(Choice, c)) for c in data.get("choices") or ())
        return cls(text=data["text"], adapter=data.get("adapter"), finish_reason=data["finish_reason"],
                   usage=Usage(**_known_fields(Usage, data["usage"])), choices=choices)


@dataclass(frozen=True)
class StreamChunk:
    """One server-sent event; the last chunk of a stream has `finish_reason` and `usage` set and usually no text."""

    text: str
    adapter: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    index: int = 0  # the choice it belongs to (n > 1); each choice has its own final chunk

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamChunk:
        usage = data.get("usage")
        return cls(text=data.get("text", ""), adapter=data.get("adapter"), finish_reason=data.get("finish_reason"),
                   usage=Usage(**_known_fields(Usage, usage)) if usage else None, index=data.get("index", 0))

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    card: str | None = None  # the adapter's README.md: from get_adapter only
    chat_template: str | None = None  # its own chat template (None: the base's): from get_adapter only

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterInfo:
        return cls(**_known_fields(cls, data))


@dataclass(frozen=True)
class Health:
    status: str
    # the rest only when the server knows the caller's key (or runs without keys)
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    lora_mode: str | None = None
    weight_format: str | None = None
    base_weight_bytes: int | None = None
    adapters: int | None = None
    resident_adapters: int | None = None
    running: int | None = None
    waiting: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Health:
        return cls(**_known_fields(cls, data))
