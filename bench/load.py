"""Async load generator: N closed-loop streams of SSE /generate requests, and the statistics of a run.

Every request asks for the same number of tokens, so N streams started together would stay in lock-step
forever (all prefill at once, all finish at once) and every request would queue behind N prefills. Real
traffic is not like that, so each stream first sends one unmeasured request of (i+1)/N of the length:
after it, the streams are evenly spread over a request's lifetime, and the measured requests arrive one by
one into a running batch. Throughput counts the tokens received while every stream was busy (from when
all streams had their first token to when the first stream finished), so the start-up burst and the
draining tail are left out. When that window does not exist (some stream got its first token only after
another stream had finished, as when merged mode serves one adapter at a time), tok/s is over the whole run.

The client is aiohttp (as vLLM's benchmark_serving), not httpx: it shares the cores with the server under
test, and httpx's client takes about three times its CPU per request (docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import aiohttp
import numpy as np
import psutil


@dataclass
class RequestResult:
    started: float
    ttft: float | None = None        # seconds to the first SSE event carrying text
    latency: float = 0.0             # seconds to the final event
    token_times: list[float] = field(default_factory=list)  # arrival time of each generated token
    error: str | None = None


@dataclass
class LoadResult:
    name: str
    streams: int
    requests: int
    errors: int
    tokens_per_s: float
    ttft_p50: float
    ttft_p99: float
    latency_p50: float
    latency_p99: float
    peak_rss_mb: float
    window_s: float
    steady: bool                     # False: never were all streams busy at once; tok/s is over the whole run
    ttfts: list[float] = field(default_factory=list)  # each measured request's, to pool runs for a tail percentile
    itl_p50: float = float("nan")    # seconds between a measured request's consecutive tokens
    itl_p99: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def session(connections: int = 4) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=600))


async def stream_request(client: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    result = RequestResult(started=time.perf_counter())
    async with client.post(f"{url}/generate", json={**body, "stream": True}) as response:
        if response.status != 200:
            result.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
            return result
        async for line in response.content:  # one SSE line at a time
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            now = time.perf_counter()
            if event.get("finish_reason"):
                # The detokenizer may hold a token back (partial UTF-8) and send it with the next one.
                missing = event["usage"]["completion_tokens"] - len(result.token_times)
                result.token_times.extend([now] * max(0, missing))
                result.latency = now - result.started
                return result
            if event.get("text"):
                if result.ttft is None:
                    result.ttft = now - result.started
                result.token_times.append(now)
    result.error = "stream ended without a final event"
    return result


class RssSampler:
    """Peak resident memory of a process, polled in the background while a workload runs."""

    def __init__(self, pid: int, every_s: float = 0.05):
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            try:
                await asyncio.wait_for(stop.wait(), self.every_s)
            except asyncio.TimeoutError:
                pass
        self.peak = max(self.peak, self.process.memory_info().rss)


def request_body(adapter: str | dict[str, float] | None, new_tokens: int, prompt: str) -> dict:
    """`adapter`: a name, None for the base, or {name: weight} for a weighted mix."""
    chosen = {"adapters": [{"name": name, "weight": weight} for name, weight in adapter.items()]} \
        if isinstance(adapter, dict) else {"adapter": adapter}
    return {"prompt": prompt, **chosen, "max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}


async def run_streams(url: str, name: str, streams: int, rounds: int,
                      pick_adapter: Callable[[int, int], str | dict[str, float] | None],
                      new_tokens: int, prompt: str, server_pid: int) -> LoadResult:
    """`streams` closed-loop clients, each sending one spreading request then `rounds` measured ones;
    pick_adapter(stream, request) names each request's adapter."""
    async with session(streams + 4) as client:
        async def stream(i: int) -> tuple[RequestResult, list[RequestResult]]:
            spread_tokens = max(1, round(new_tokens * (i + 1) / streams))
            first = await stream_request(client, url, request_body(pick_adapter(i, 0), spread_tokens, prompt))
            measured = [await stream_request(client, url, request_body(pick_adapter(i, r + 1), new_tokens, prompt))
                        for r in range(rounds)]
            return first, measured

        sampler, stop = RssSampler(server_pid), asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop))
        per_stream = await asyncio.gather(*(stream(i) for i in range(streams)))
        stop.set()
        await sampling
    return summarize(name, streams, per_stream, sampler.peak)


def summarize(name: str, streams: int, per_stream: list[tuple[RequestResult, list[RequestResult]]],
              peak_rss: int) -> LoadResult:
    everything = [r for first, measured in per_stream for r in (first, *measured)]
    measured = [r for _, rs in per_stream for r in rs]
    errors = [r for r in everything if r.error]
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} requests failed, first: {errors[0].error}")
    busy_from = max(first.token_times[0] for first, _ in per_stream)
    busy_to = min(rs[-1].started + rs[-1].latency for _, rs in per_stream)
    steady = busy_to > busy_from
    if not steady:  # some stream waited longer than another's whole run (e.g. merged mode serializing adapters)
        busy_from = min(first.started for first, _ in per_stream)
        busy_to = max(rs[-1].started + rs[-1].latency for _, rs in per_stream)
    times = np.concatenate([r.token_times for r in everything])
    gaps = np.concatenate([np.diff(r.token_times) for r in measured])
    window = busy_to - busy_from
    tokens = int(((times >= busy_from) & (times <= busy_to)).sum())
    return LoadResult(
        name=name, streams=streams, requests=len(measured), errors=0, steady=steady,
        tokens_per_s=tokens / window,
        ttft_p50=percentile([r.ttft for r in measured], 50), ttft_p99=percentile([r.ttft for r in measured], 99),
        latency_p50=percentile([r.latency for r in measured], 50),
        latency_p99=percentile([r.latency for r in measured], 99),
        peak_rss_mb=peak_rss / 2**20, window_s=window, ttfts=[r.ttft for r in measured],
        itl_p50=percentile(gaps.tolist(), 50), itl_p99=percentile(gaps.tolist(), 99))
