"""Starting generations for the routes (native and OpenAI alike): the cheap limits checked first, the adapter
or mix resolved, the prompt tokenized, the requests queued; then their events read as the routes need them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from adapters.mix import check_weights
from server.auth import Principal
from server.engine.constraint import Grammar
from server.engine.engine import TokenEvent
from server.engine.request import SamplingParams
from server.errors import AdapterNotFound, DeadlineExceeded, GenerationFailed, InvalidRequest
from server.routes.security import check_may_see
from server.schemas import SEED_MAX, SEED_MIN
from server.tool_calls import for_template

# Prompts up to this many characters (a message's template costs about MESSAGE_CHARS more) are tokenized on
# the event loop (under 1 ms); longer ones in a worker thread so one large prompt does not stall every
# stream's writes. A thread hop per request costs more than a short prompt's tokenization when the engine
# thread holds the GIL.
INLINE_ENCODE_CHARS = 2048
MESSAGE_CHARS = 32


def _prompt_chars(prompt: str | None, messages: list[dict] | None, tools: list[dict] | None) -> int:
    """Tools and earlier calls count as a template without a tool format is shown them, whichever template
    renders them: the bound does not depend on the template."""
    if messages is None:
        return len(prompt or "")
    shown, _ = for_template(messages, tools, native=False)
    return sum(len(str(m.get("content") or "")) for m in shown)


def check_prompt_shape(settings, prompt: str | None, messages: list[dict] | None, params: SamplingParams,
                       vocab_size: int, tools: list[dict] | None = None) -> int:
    """The limits that cost nothing to check, checked before the costly templating and tokenizing; returns
    the prompt's characters."""
    if messages is not None and len(messages) > settings.max_messages:
        raise InvalidRequest(f"{len(messages)} messages; the limit is {settings.max_messages}")
    chars = _prompt_chars(prompt, messages, tools)
    if chars > settings.max_prompt_chars:
        raise InvalidRequest(f"the prompt has {chars} characters; the limit is {settings.max_prompt_chars}")
    if any(len(stop) > settings.max_stop_chars for stop in params.stop):
        raise InvalidRequest(f"a stop string is longer than the limit of {settings.max_stop_chars} characters")
    if params.logit_bias and params.logit_bias[-1][0] >= vocab_size:
        raise InvalidRequest(f"logit_bias names token {params.logit_bias[-1][0]}; the vocabulary has {vocab_size}")
    return chars


async def resolve_adapter(rt, principal: Principal, adapter_name: str | None, mix: list[tuple[str, float]] | None):
    """The Adapter a request runs with: a registered one by name, a weighted mix of them (see adapters.mix)
    or None for the base. A name unknown or hidden from the caller fails as it does alone."""
    if mix is None:
        if adapter_name is None:
            return None
        check_may_see(principal, adapter_name)
        return await find_adapter(rt, adapter_name)
    check_weights([weight for _, weight in mix], rt.settings.max_adapters_per_request, rt.settings.max_adapter_weight)
    members = []
    for name, weight in mix:
        check_may_see(principal, name)
        members.append((await find_adapter(rt, name), weight))
    # a new mix copies its members' weights: off the event loop, as large prompts are tokenized
    return rt.mixes.find(members) or await run_in_threadpool(rt.mixes.get, members)


async def find_adapter(rt, name: str):
    """A registered adapter, else one registered now from an --adapter-dir. Files are read off the event loop
    (an adapter read back from the store, a folder registered), so only this request waits for them."""
    try:
        return rt.registry.get_resident(name) or await run_in_threadpool(rt.registry.get, name)
    except AdapterNotFound:
        if not rt.adapter_dirs.dirs:
            raise
    return await run_in_threadpool(rt.adapter_dirs.resolve, name)


async def start_generations(rt, principal: Principal, adapter_name: str | None, prompt: str | None,
                            messages: list[dict] | None, params: SamplingParams,
                            mix: list[tuple[str, float]] | None = None, copies: int = 1,
                            tools: list[dict] | None = None) -> list[AsyncIterator]:
    """`copies` requests for one prompt (OpenAI's n), tokenized once and queued all together or not at all; a
    seeded request's copy i samples with seed + i, so the choices differ as OpenAI's do. `tools` go to the
    template with the messages (Runtime.encode shows them as that template can)."""
    adapter = await resolve_adapter(rt, principal, adapter_name, mix)
    chars = check_prompt_shape(rt.settings, prompt, messages, params, rt.loaded.config.vocab_size, tools)
    template_chars = MESSAGE_CHARS * len(messages) if messages is not None else 0
    template = adapter.chat_template if adapter is not None else None  # an adapter's own, else the base's
    if chars + template_chars <= INLINE_ENCODE_CHARS:
        prompt_ids = rt.encode(prompt, messages, tools, template)
    else:
        prompt_ids = await run_in_threadpool(rt.encode, prompt, messages, tools, template)
    rt.check_length(len(prompt_ids), params.max_new_tokens)
    copies_params = [params if params.seed is None or i == 0 else replace(params, seed=nth_seed(params.seed, i))
                     for i in range(copies)]
    # prefix-cache hits are visible as a faster first token, so prompts are shared only within one API key
    return rt.engine.streams(prompt_ids, copies_params, adapter, cache_scope=principal.key_id)


def nth_seed(seed: int, i: int) -> int:
    """seed + i, wrapped into the 64-bit range seeds are validated to."""
    return (seed + i - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN


async def until_disconnected(events: AsyncIterator[TokenEvent], request: Request) -> AsyncIterator[TokenEvent]:
    """The events of a non-streaming request, ending early if its client goes away (closing `events` then
    aborts the request in the engine). A streaming response learns of a disconnect when its next write
    fails; a non-streaming one writes only at the end, so without this a client that gave up would keep
    its batch slot until the last token."""

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(client_gone())
    iterator = aiter(events)
    try:
        while True:
            nxt = asyncio.ensure_future(anext(iterator))
            await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()  # let the cancellation land before closing the generator it runs in
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
                return
            try:
                yield nxt.result()
            except StopAsyncIteration:
                return
    finally:
        watcher.cancel()
        await iterator.aclose()


async def output_grammar(rt, json_schema: dict | None = None, regex: str | None = None,
                         any_json: bool = False) -> Grammar | None:
    """The grammar a request's output is held to, compiled (off the event loop) before anything is queued; an
    unusable one is an InvalidRequest."""
    if json_schema is not None or any_json:
        return await run_in_threadpool(rt.grammars.json_schema, json_schema)
    if regex is not None:
        return await run_in_threadpool(rt.grammars.regex, regex)
    return None


def raise_if_failed(event: TokenEvent) -> None:
    if event.finish_reason == "timeout":
        raise DeadlineExceeded("the request ran past its deadline (request_timeout_s) and was stopped")
    if event.finish_reason == "error":
        raise GenerationFailed(event.error or "the server failed while computing this request")


async def merged(streams: list[AsyncIterator[TokenEvent]]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """The events of n choices as they come, each with its choice's index; closing this closes them all
    (aborting the requests still running)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, events: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in events:
                await queue.put((index, event))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, events)) for i, events in enumerate(streams)]
    running = len(tasks)
    try:
        while running:
            index, event = await queue.get()
            if event is None:
                running -= 1
            else:
                yield index, event
    finally:  # a cancelled pump leaves its request's event iterator by an exception, which aborts it
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
