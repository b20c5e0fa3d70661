"""The wire format of the native API, defined once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# what torch.Generator.manual_seed takes: a signed or unsigned 64-bit integer
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_LOGIT_BIAS = 300  # entries per request: each is applied on every step


MAX_REGEX_CHARS = 4096
MAX_CHOICES = 8  # n: each choice holds a KV slot of the batch


class PenaltyFields(BaseModel):
    """Shared by the native and OpenAI requests (OpenAI's ranges; repetition_penalty and min_p as vLLM's)."""

    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="vLLM extension")
    logit_bias: dict[int, float] | None = Field(None, max_length=MAX_LOGIT_BIAS,
                                                description="token id -> bias added to its logit, -100..100")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM extension")

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v):
        if v and any(not -100 <= b <= 100 or token < 0 for token, b in v.items()):
            raise ValueError("logit_bias maps token ids (>= 0) to values in -100..100")
        return v

    def penalty_params(self) -> dict:
        """The SamplingParams fields these set."""
        return {"presence_penalty": self.presence_penalty or 0.0, "frequency_penalty": self.frequency_penalty or 0.0,
                "repetition_penalty": self.repetition_penalty or 1.0, "min_p": self.min_p or 0.0,
                "logit_bias": tuple(sorted((self.logit_bias or {}).items()))}


class AdapterWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    weight: float = Field(1.0, allow_inf_nan=False, description="scales the adapter's update; the server "
                          "bounds |weight| (--max-adapter-weight)")


class AdapterMixField(BaseModel):
    """`adapters`: a weighted mix, h = W0·x + sum_i weight_i·(alpha_i/r_i)·B_i·A_i·x, computed as side
    branches; one entry is a per-request scale. Shared by the native and OpenAI requests."""

    adapters: list[AdapterWeight] | None = Field(None, min_length=1, description="adapters mixed with weights "
                                                 "(at most --max-adapters-per-request); one entry scales one adapter")

    def mix(self) -> list[tuple[str, float]] | None:
        return [(a.name, a.weight) for a in self.adapters] if self.adapters is not None else None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(PenaltyFields, AdapterMixField):
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
    json_schema: dict | None = Field(None, description="the output is JSON that validates against this schema")
    regex: str | None = Field(None, max_length=MAX_REGEX_CHARS, description="the output matches this regex")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description=f"choices for the one prompt, up to {MAX_CHOICES}; a "
                   "seeded request's choice i samples with seed + i")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.json_schema is not None and self.regex is not None:
            raise ValueError("give `json_schema` or `regex`, not both")
        if self.adapter is not None and self.adapters is not None:
            raise ValueError("give `adapter` or `adapters`, not both")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    completion_tokens: int


class GenerateResponse(BaseModel):
    text: str  # of the first choice, as finish_reason
    adapter: str | None
    adapters: list[AdapterWeight] | None = None  # the mix asked for, if one was
    finish_reason: str
    usage: Usage  # the prompt counted once, the completion tokens of every choice
    choices: list[GenerateChoice] | None = None  # with n > 1: every choice in order


class AdapterInfo(BaseModel):
    name: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int


class AdapterDetail(AdapterInfo):
    card: str | None = None  # the README.md uploaded or found with the adapter
    chat_template: str | None = None  # its own chat template, used for its chat requests; None: the base's


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
