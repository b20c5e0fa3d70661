"""POST /generate: validate, hand to the engine, return or stream the text (of each of `n` choices)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from server.auth import Principal
from server.engine.engine import TokenEvent
from server.engine.request import SamplingParams
from server.routes.generation import merged, output_grammar, raise_if_failed, start_generations, until_disconnected
from server.routes.security import caller
from server.schemas import GenerateChoice, GenerateRequest, GenerateResponse, Usage

router = APIRouter()


@router.post("/generate", response_model=GenerateResponse,
             responses={404: {"description": "unknown adapter"}, 422: {"description": "invalid parameters"}})
async def generate(req: GenerateRequest, request: Request, principal: Principal = Depends(caller)):
    grammar = await output_grammar(request.app.state.runtime, req.json_schema, req.regex)
    params = SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                            top_k=req.top_k, seed=req.seed, stop=tuple(req.stop), ignore_eos=req.ignore_eos,
                            grammar=grammar, **req.penalty_params())
    messages = [m.model_dump() for m in req.messages] if req.messages is not None else None
    streams = await start_generations(request.app.state.runtime, principal, req.adapter, req.prompt, messages,
                                      params, req.mix(), req.n)
    if req.stream:
        return StreamingResponse(_sse(merged(streams), req.adapter, req.n > 1), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text: list[list[str]] = [[] for _ in streams]
    choices: list[GenerateChoice] = []
    prompt_tokens = 0
    async for index, event in until_disconnected(merged(streams), request):
        text[index].append(event.text)
        if event.finished:
            raise_if_failed(event)
            prompt_tokens = event.prompt_tokens
            choices.append(GenerateChoice(index=index, text="".join(text[index]), finish_reason=event.finish_reason,
                                          completion_tokens=event.completion_tokens))
    if len(choices) < len(streams):
        return Response(status_code=499)  # the client went away; nobody reads this
    choices.sort(key=lambda c: c.index)
    # the prompt is counted once, as OpenAI counts it for n choices
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(c.completion_tokens for c in choices))
    return GenerateResponse(text=choices[0].text, adapter=req.adapter, adapters=req.adapters,
                            finish_reason=choices[0].finish_reason, usage=usage,
                            choices=choices if req.n > 1 else None)


async def _sse(events: AsyncIterator[tuple[int, TokenEvent]], adapter: str | None, indexed: bool) -> AsyncIterator[str]:
    """`indexed` (n > 1): each event names its choice; every choice ends with its own final event."""
    async for index, event in events:
        choice = {"index": index} if indexed else {}
        if event.finished:
            final = {"text": "", "adapter": adapter, **choice, "finish_reason": event.finish_reason,
                     "usage": {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}}
            if event.error:
                final["error"] = event.error
            yield f"data: {json.dumps(final)}\n\n"
        elif event.text:
            yield f"data: {json.dumps({'text': event.text, 'adapter': adapter, **choice})}\n\n"
