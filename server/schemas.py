"""The wire format of the native API, defined once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# what torch.Generator.manual_seed takes: a signed or unsigned 64-bit integer
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    adapter: str | None = Field(None, description="registered adapter name; null for the bare base model")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="as vLLM: any 64-bit integer")
    stop: list[str] = Field(default_factory=list, max_length=8)
    ignore_eos: bool = False
    stream: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    text: str
    adapter: str | None
    finish_reason: str
    usage: Usage


class AdapterInfo(BaseModel):
    name: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class Health(BaseModel):
    status: Literal["ok"]
    # the rest only for a caller with a key (or in development mode)
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    lora_mode: str | None = None
    weight_format: str | None = None     # float32, bfloat16, int8, int4: how the base weights are held
    base_weight_bytes: int | None = None
    adapters: int | None = None
    resident_adapters: int | None = None
    running: int | None = None
    waiting: int | None = None


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
