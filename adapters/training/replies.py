"""Greedy replies from the serving engine itself, many at once: the dataset generator asks the base model
for content to rewrite, and the evaluation compares adapters with the base through the same code path a
client's request takes."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from server.engine.request import SamplingParams
from server.runtime import Runtime
from server.settings import Settings


@dataclass(frozen=True)
class Job:
    user: str
    adapter: str | None  # None: the bare base model
    max_new_tokens: int


@contextmanager
def serving_runtime(preload_dir: Path | None = None, quantization: str = "auto") -> Iterator[Runtime]:
    """A Runtime with an empty throwaway store; `preload_dir` adapters are registered by folder name."""
    with tempfile.TemporaryDirectory(prefix="loraplex-replies-") as store:
        # 512 tokens cover every prompt + reply here and keep the KV cache at ~1.5 GB instead of ~6 GB.
        rt = Runtime(Settings(store_dir=Path(store), preload_dir=preload_dir, max_seq_len=512,
                              quantization=quantization))
        try:
            yield rt
        finally:
            rt.stop()


def greedy_replies(rt: Runtime, jobs: list[Job]) -> list[str]:
    """Runs the jobs concurrently (the engine batches them, mixing adapters) and returns replies in order."""
    # A full batch in flight keeps every KV slot busy; more would only queue, up to the 429 bound.
    in_flight = asyncio.Semaphore(rt.settings.max_batch)

    async def reply(job: Job) -> str:
        ids = rt.encode(messages=[{"role": "user", "content": job.user}])
        adapter = rt.registry.get(job.adapter) if job.adapter else None
        params = SamplingParams(max_new_tokens=job.max_new_tokens, temperature=0)
        async with in_flight:
            return "".join([event.text async for event in rt.engine.stream(ids, params, adapter)])

    async def run_all() -> list[str]:
        return await asyncio.gather(*(reply(job) for job in jobs))

    return asyncio.run(run_all())
