"""OpenAI-compatible routes: `model` names an adapter (or the base model's id for none).

Unmodified OpenAI clients work against these; vLLM's runtime adapter endpoints are here too.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.engine.constraint import Grammar
from server.engine.engine import TokenEvent
from server.engine.request import SamplingParams
from adapters.confined import read_adapter_folder
from server.errors import Forbidden, GenerationFailed, InvalidRequest
from server.auth import Principal
from server.routes.generation import merged, output_grammar, raise_if_failed, start_generations, until_disconnected
from server.routes.security import admin, caller, check_may_manage, check_may_see
from server.tool_calls import call_grammar, parse_call
from server.schemas_openai import ChatCompletionRequest, CompletionRequest, LoadLoraRequest, UnloadLoraRequest

router = APIRouter(prefix="/v1")

DEFAULT_MAX_TOKENS = 256


@router.get("/models")
async def list_models(request: Request, principal: Principal = Depends(caller)):
    rt = request.app.state.runtime
    created = int(rt.started_at)
    bases = [{"id": name, "object": "model", "created": created, "owned_by": "loraplex", "root": rt.model_id,
              "parent": None} for name in rt.model_names]
    adapters = [{"id": a.name, "object": "model", "created": created, "owned_by": "loraplex", "root": a.name,
                 "parent": rt.model_id} for a in rt.registry.list() if principal.may_use(a.name)]
    return {"object": "list", "data": [*bases, *adapters]}


def _adapter_of(rt, req) -> str | None:
    adapter = None if req.model in rt.model_names else req.model
    if adapter is not None and req.adapters is not None:
        raise InvalidRequest(f"`model` names the adapter {adapter!r} and `adapters` a mix: with `adapters`, "
                             f"`model` is the base model ({rt.model_id!r})")
    return adapter


def _params(req, max_tokens: int | None, logprobs: int | None, grammar: Grammar | None = None) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_tokens or DEFAULT_MAX_TOKENS, temperature=req.temperature,
                          top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=tuple(req.stop),
                          ignore_eos=req.ignore_eos, logprobs=logprobs, grammar=grammar, **req.penalty_params())


async def _response_grammar(rt, response_format) -> Grammar | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return await output_grammar(rt, any_json=True)
    return await output_grammar(rt, response_format.json_schema.schema_ or {})


def _usage(event: TokenEvent) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _stream_error(event: TokenEvent) -> str:
    # as vLLM: a stream that fails after it started ends with an error object, then [DONE]
    return _sse({"error": {"message": event.error, "type": "server_error", "param": None,
                           "code": GenerationFailed.code}})


def _streaming(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Logprobs:
    """Collects per-token logprobs in either of OpenAI's two layouts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat_entry(self, lp) -> dict:
        def one(tid, value):
            text = self.token_text(tid)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}
        return {**one(lp.token_id, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top]}

    def completion_block(self, lps: list, offset: int = 0) -> dict:
        tokens = [self.token_text(lp.token_id) for lp in lps]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.token_text(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}


# ---- /v1/completions

@router.post("/completions")
async def completions(req: CompletionRequest, request: Request, principal: Principal = Depends(caller)):
    rt = request.app.state.runtime
    params = _params(req, req.max_tokens or 16, req.logprobs)
    streams = await start_generations(rt, principal, _adapter_of(rt, req), req.prompt, None, params, req.mix(), req.n)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    lp = _Logprobs(rt.tokenizer) if req.logprobs is not None else None
    head = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
    if req.stream:
        return _streaming(_completion_chunks(merged(streams), head, lp, req.stream_options, len(streams)))
    text, lps, choices, usage = [[] for _ in streams], [[] for _ in streams], [], None
    async for index, event in until_disconnected(merged(streams), request):
        text[index].append(event.text)
        if event.logprob is not None:
            lps[index].append(event.logprob)
        if event.finished:
            raise_if_failed(event)
            choices.append({"index": index, "text": "".join(text[index]), "finish_reason": event.finish_reason,
                            "logprobs": lp.completion_block(lps[index]) if lp else None})
            usage = _add_usage(usage, event)
    if len(choices) < len(streams):
        return Response(status_code=499)  # the client went away; nobody reads this
    return {**head, "choices": sorted(choices, key=lambda c: c["index"]), "usage": usage}


def _add_usage(usage: dict | None, event: TokenEvent) -> dict:
    """One prompt, n completions: OpenAI counts the prompt once and every choice's tokens."""
    if usage is None:
        return _usage(event)
    completion = usage["completion_tokens"] + event.completion_tokens
    return {**usage, "completion_tokens": completion, "total_tokens": usage["prompt_tokens"] + completion}


async def _completion_chunks(events, head: dict, lp: _Logprobs | None, options, choices: int) -> AsyncIterator[str]:
    offsets, usage, finished = [0] * choices, None, 0
    async for index, event in events:
        if event.error:
            yield _stream_error(event)
        elif event.finished:
            yield _sse({**head, "choices": [{"index": index, "text": "", "finish_reason": event.finish_reason,
                                             "logprobs": None}]})
            usage, finished = _add_usage(usage, event), finished + 1
            if options and options.include_usage and finished == choices:
                yield _sse({**head, "choices": [], "usage": usage})
        elif event.text or event.logprob is not None:
            logprobs = lp.completion_block([event.logprob], offsets[index]) if lp and event.logprob else None
            offsets[index] += len(event.text)
            yield _sse({**head, "choices": [{"index": index, "text": event.text, "finish_reason": None,
                                             "logprobs": logprobs}]})
    yield _sse("[DONE]")


# ---- /v1/chat/completions

@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, principal: Principal = Depends(caller)):
    rt = request.app.state.runtime
    top = (req.top_logprobs or 0) if req.logprobs else None
    mode, named = req.tool_mode()
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if mode != "none" else None
    # structured: the template that renders them (an adapter's own or the base's) decides how tools are shown
    messages = [m.as_template_message() for m in req.messages]
    if mode in ("required", "named"):
        grammar = await run_in_threadpool(call_grammar, rt.grammars, tools, named)
    else:
        grammar = await _response_grammar(rt, req.response_format)
    params = _params(req, req.max_completion_tokens or req.max_tokens, top, grammar)
    streams = await start_generations(rt, principal, _adapter_of(rt, req), None, messages, params, req.mix(), req.n,
                                      tools)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    lp = _Logprobs(rt.tokenizer) if req.logprobs else None
    head = {"id": rid, "created": created, "model": req.model, "system_fingerprint": None}
    if req.stream:
        return _streaming(_chat_chunks(merged(streams), {**head, "object": "chat.completion.chunk"}, lp,
                                       req.stream_options, len(streams), tools))
    text, entries, choices, usage = [[] for _ in streams], [[] for _ in streams], [], None
    async for index, event in until_disconnected(merged(streams), request):
        text[index].append(event.text)
        if lp and event.logprob is not None:
            entries[index].append(lp.chat_entry(event.logprob))
        if event.finished:
            raise_if_failed(event)
            message, finish = _reply("".join(text[index]), event.finish_reason, tools)
            choices.append({"index": index, "message": {"role": "assistant", **message}, "finish_reason": finish,
                            "logprobs": {"content": entries[index]} if lp else None})
            usage = _add_usage(usage, event)
    if len(choices) < len(streams):
        return Response(status_code=499)  # the client went away; nobody reads this
    return {**head, "object": "chat.completion", "choices": sorted(choices, key=lambda c: c["index"]),
            "usage": usage}


def _reply(text: str, finish_reason: str, tools: list[dict] | None) -> tuple[dict, str]:
    """A choice's message (text, or a tool call where the reply is one) and its finish reason."""
    call = parse_call(text, tools) if tools else None
    if call is None:
        return {"content": text}, finish_reason
    finish = "tool_calls" if finish_reason == "stop" else finish_reason
    return {"content": None, "tool_calls": [{"index": 0, **call}]}, finish


async def _chat_chunks(events, head: dict, lp: _Logprobs | None, options, choices: int,
                       tools: list[dict] | None = None) -> AsyncIterator[str]:
    """With tools, a choice's text is held until it ends: only then is it known to be a call or text."""
    for index in range(choices):
        yield _sse({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
    usage, finished, held = None, 0, [[] for _ in range(choices)]
    async for index, event in events:
        if event.error:
            yield _stream_error(event)
        elif event.finished:
            finish = event.finish_reason
            if tools:
                delta, finish = _reply("".join(held[index]) + event.text, event.finish_reason, tools)
                yield _sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                                 "finish_reason": None}]})
            yield _sse({**head, "choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}]})
            usage, finished = _add_usage(usage, event), finished + 1
            if options and options.include_usage and finished == choices:
                yield _sse({**head, "choices": [], "usage": usage})
        elif tools:
            held[index].append(event.text)
        elif event.text or event.logprob is not None:
            logprobs = {"content": [lp.chat_entry(event.logprob)]} if lp and event.logprob else None
            yield _sse({**head, "choices": [{"index": index, "delta": {"content": event.text}, "logprobs": logprobs,
                                             "finish_reason": None}]})
    yield _sse("[DONE]")


# ---- vLLM-compatible runtime adapter loading (server-side paths, for operators)

@router.post("/load_lora_adapter")
async def load_lora_adapter(req: LoadLoraRequest, request: Request, principal: Principal = Depends(admin)):
    rt = request.app.state.runtime
    check_may_manage(principal, req.lora_name)
    if not rt.settings.adapter_roots:
        raise Forbidden("loading adapters from server-side paths is off: start the server with --adapter-root DIR")
    files = await run_in_threadpool(read_adapter_folder, req.lora_path, rt.settings.adapter_roots,
                                    rt.settings.max_adapter_bytes)
    adapter = await run_in_threadpool(rt.registry.register_upload, req.lora_name, files)
    return JSONResponse({"status": "ok", "lora_name": adapter.name}, status_code=200)


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadLoraRequest, request: Request, principal: Principal = Depends(admin)):
    check_may_see(principal, req.lora_name)
    await run_in_threadpool(request.app.state.runtime.registry.remove, req.lora_name)
    return {"status": "ok", "lora_name": req.lora_name}
