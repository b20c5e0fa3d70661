"""The OpenAI-compatible wire format (the subset loraplex serves), defined once.

Every field OpenAI defines either works or is refused naming it (400): a client that asked for JSON output,
tools or penalties must learn that from an error, not from free text under a 200. Fields not served yet are
accepted only at OpenAI's own default (`_AT_DEFAULT_ONLY`); unknown fields are refused, except the
documented extensions (vLLM's `top_k`, `ignore_eos`; loraplex's `adapters`, a weighted mix applied to the
base model named in `model`).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from server.schemas import MAX_CHOICES, SEED_MAX, SEED_MIN, AdapterMixField, PenaltyFields




class StreamOptions(BaseModel):
    include_usage: bool = False


# a field not served yet -> the values that mean "not asked for" (OpenAI's defaults)
_AT_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "functions": (None, []), "function_call": (None, "none"), "best_of": (None, 1), "suffix": (None,),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,), "store": (None, False),
}


def _refuse_unless_default(value, info: ValidationInfo):
    if value not in _AT_DEFAULT_ONLY[info.field_name]:
        raise ValueError(f"`{info.field_name}` is not supported by this server yet; leave it out")
    return value


class _SamplingFields(PenaltyFields, AdapterMixField):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension, as in vLLM")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description=f"choices for the one prompt, up to {MAX_CHOICES}")
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="as vLLM: any 64-bit integer")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS")
    # the caller's own bookkeeping: no effect on the output
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # not served (see _AT_DEFAULT_ONLY)
    store: bool | None = None

    _not_served = field_validator("store")(_refuse_unless_default)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("stop takes up to 8 non-empty strings")
        return stops


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    _not_served_here = field_validator("best_of", "suffix")(_refuse_unless_default)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("one prompt per request")
            return v[0]
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class JsonSchemaFormat(BaseModel):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None  # the output always follows the schema here


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` goes with type json_schema, and only with it")
        return self


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # calls always follow the parameters' schema here when constrained


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionCallIn(BaseModel):
    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _a_json_object(cls, arguments: str) -> str:
        try:
            parsed = json.loads(arguments or "{}")
        except ValueError as exc:
            raise ValueError(f"a tool call's arguments are a JSON object as a string: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ValueError("a tool call's arguments are a JSON object as a string")
        return arguments or "{}"


class ToolCallIn(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: dict[Literal["name"], str]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # a participant's name: OpenAI's templates do not show it either
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None             # a tool message: the call it answers

    def as_template_message(self) -> dict:
        """The message as a chat template takes it, earlier calls as structured `tool_calls` (arguments as an
        object, as transformers asks); a template without a tool format gets them written into the text
        (server.tool_calls.for_template, in Runtime.encode)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=64)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # only says something together with tools
    functions: list | None = None
    function_call: str | dict | None = None
    modalities: list[str] | None = None
    audio: dict | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    web_search_options: dict | None = None

    _not_served_here = field_validator("functions", "function_call",
                                       "modalities", "audio", "prediction", "reasoning_effort",
                                       "web_search_options")(_refuse_unless_default)


    @model_validator(mode="after")
    def _choice_among_the_tools(self):
        names = {t.function.name for t in self.tools or []}
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.get("name") not in names:
            raise ValueError("tool_choice names a function that is not in `tools`")
        if choice == "required" and not names:
            raise ValueError("tool_choice `required` needs `tools`")
        if names and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("give `tools` or a JSON `response_format`, not both")
        return self

    def tool_mode(self) -> tuple[str, str | None]:
        """("none" | "auto" | "required" | "named", the named function): OpenAI's default is auto with tools."""
        if not self.tools or self.tool_choice == "none":
            return "none", None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named", self.tool_choice.function["name"]
        return self.tool_choice or "auto", None


class LoadLoraRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    lora_name: str
