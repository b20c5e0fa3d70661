"""POST /tokenize and /detokenize, as vLLM serves them: the base model's tokenizer and chat template."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from server.auth import Principal
from server.engine.request import SamplingParams
from server.errors import InvalidRequest
from server.routes.generation import check_prompt_shape
from server.routes.security import caller
from server.schemas_openai import ChatMessageIn

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 16)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request, principal: Principal = Depends(caller)):
    rt = request.app.state.runtime
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("give exactly one of `prompt` or `messages`")
    messages = [m.as_template_message() for m in req.messages] if req.messages is not None else None
    check_prompt_shape(rt.settings, req.prompt, messages, SamplingParams(), rt.loaded.config.vocab_size)
    if messages is not None:
        ids = await run_in_threadpool(rt.encode, None, messages)
    else:
        ids = (await run_in_threadpool(rt.tokenizer, req.prompt, add_special_tokens=req.add_special_tokens)).input_ids
    return {"count": len(ids), "max_model_len": rt.max_seq_len, "tokens": list(ids)}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request, principal: Principal = Depends(caller)):
    rt = request.app.state.runtime
    vocab = rt.loaded.config.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise InvalidRequest(f"token ids must lie in 0..{vocab - 1}")
    return {"prompt": await run_in_threadpool(rt.tokenizer.decode, req.tokens)}
