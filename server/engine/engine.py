"""The serving loop: one background thread steps the model; callers submit and receive tokens.

HTTP handlers never run a forward: they submit a Sequence and await events on an asyncio queue. The loop
thread drains submissions between steps, so requests join the running batch at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from server.engine.admission import AdmissionWait, Clock, SuccessorWait
from server.engine.detokenizer import Detokenizer
from server.engine.engine_metrics import EngineMetrics, EngineStats
from server.engine.request import SamplingParams, Sequence
from server.engine.runner import ModelRunner
from server.engine.sampler import TokenLogprob, logprobs_of, sample
from server.engine.scheduler import Scheduler
from server.errors import Overloaded
from server.lora.mode_switch import ModeSwitch
from server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprob: TokenLogprob | None = None
    error: str | None = None      # why a request ended with finish_reason "error"


@dataclass
class AsyncSink:
    """Delivers a request's events to an asyncio queue owned by another thread's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
        self.loop = loop
        self.events = events


def _deliver(batch: list[tuple[AsyncSink, TokenEvent]]) -> None:
    for sink, event in batch:
        sink.events.put_nowait(event)


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer, modes: ModeSwitch, eos_ids: set[int],
                 metrics: Metrics | None = None, max_pending: int = 256, timeout_s: float | None = None,
                 admission: AdmissionWait | None = None, clock: Clock | None = None):
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.modes = modes
        self.metrics = EngineMetrics(metrics)
        self.metrics.watch_queue(scheduler)
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self._clock = clock or Clock()
        self._successors = SuccessorWait(admission or AdmissionWait(0.0), self._clock)
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sinks: dict[int, tuple[AsyncSink, Detokenizer]] = {}
        self._outbox: list[tuple[AsyncSink, TokenEvent]] = []
        self._finished_in_step = 0

    # ---- lifecycle
    def stop(self) -> None:
        """Asks `run` to return after the current step."""
        self._stop.set()
        self._wake.set()

    @property
    def stats(self) -> EngineStats:
        return self.metrics.stats

    @property
    def pending(self) -> int:
        """Requests queued or running: the count max_pending bounds."""
        return self._pending

    # ---- submission (any thread)
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter, sink: AsyncSink,
               cache_scope: str = "") -> Sequence:
        return self.submit_all(prompt_ids, [params], adapter, [sink], cache_scope)[0]

    def submit_all(self, prompt_ids: list[int], params: list[SamplingParams], adapter, sinks: list[AsyncSink],
                   cache_scope: str = "") -> list[Sequence]:
        """Requests for one prompt (OpenAI's n), queued all together or, past max_pending, none."""
        # built before queue places are taken, so nothing they raise can leak one; on the loop's clock, which
        # admission watches, expiry and latencies read
        now = self._clock.now()
        seqs = [Sequence(prompt_ids, p, adapter, device=self.runner.device, timeout_s=self.timeout_s,
                         cache_scope=cache_scope, arrived=now) for p in params]
        with self._pending_lock:
            if self._pending + len(seqs) > self.max_pending:
                self.metrics.rejected("queue_full")
                asked = f" and this one asks for {len(seqs)}" if len(seqs) > 1 else ""
                raise Overloaded(f"{self._pending} requests are queued or running{asked} (max_pending="
                                 f"{self.max_pending}); retry shortly")
            self._pending += len(seqs)
        for seq, sink in zip(seqs, sinks):
            self._inbox.put(("add", seq, sink))
        self._wake.set()
        return seqs

    def abort(self, seq: Sequence) -> None:
        self._inbox.put(("abort", seq, None))
        self._wake.set()

    def stream(self, prompt_ids: list[int], params: SamplingParams, adapter,
               cache_scope: str = "") -> AsyncIterator[TokenEvent]:
        """Submits a request now (so limits raise before any response starts) and returns its events;
        leaving the iterator early aborts the request."""
        return self.streams(prompt_ids, [params], adapter, cache_scope)[0]

    def streams(self, prompt_ids: list[int], params: list[SamplingParams], adapter,
                cache_scope: str = "") -> list[AsyncIterator[TokenEvent]]:
        """`stream` for requests sharing one prompt, submitted all together (see `submit_all`)."""
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[TokenEvent]] = [asyncio.Queue() for _ in params]
        seqs = self.submit_all(prompt_ids, params, adapter, [AsyncSink(loop, q) for q in queues], cache_scope)
        return [self._events(seq, q) for seq, q in zip(seqs, queues)]

    async def _events(self, seq: Sequence, events: asyncio.Queue) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                event = await events.get()
                yield event
                if event.finished:
                    return
        finally:
            if not seq.finished:
                self.abort(seq)

    # ---- the loop (engine thread only)
    def run(self) -> None:
        """Serves until `stop`. Call it on the thread that built the model (see server.runtime)."""
        while not self._stop.is_set():
            self.run_once()

    def run_once(self) -> None:
        """One pass of the loop: a step and the wait after it, or a nap while there is no work."""
        self._drain_inbox()  # aborts and expiries finish requests here too: flush before sleeping
        if not self.scheduler.has_work():
            self._flush_outbox()
            self._successors.idle()
            self._clock.wait(self._wake, 0.5)
            self._wake.clear()
            return
        self._finished_in_step = 0
        started = self._clock.now()
        try:
            self.step()
        except Exception:  # a bug in the shared forward must not kill the server: fail the batch, keep serving
            log.exception("engine step failed; failing its requests")
            for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                self._finish(seq, "error", "the server failed while computing this request")
        self._flush_outbox()
        self._await_next_requests(self._clock.now() - started)

    def _await_next_requests(self, step_s: float) -> None:
        """After a step that finished requests, lets their clients' next requests join the next step
        (see server.engine.admission)."""
        room = self.scheduler.kv.max_seqs - self.scheduler.kv.used - len(self.scheduler.waiting)
        awaited = min(self._finished_in_step, room)
        waited = self._successors.after_step(step_s, awaited, self._inbox.qsize, self._wake, self._stop,
                                             self._catch_up)
        if waited is not None:
            self.metrics.admission_waited(waited)

    def _catch_up(self) -> None:
        self._drain_inbox()
        self._flush_outbox()

    def _flush_outbox(self) -> None:
        # One wake-up per event loop per step, not one per token: per-token cross-thread calls make the event
        # loop fight the engine thread for the GIL (they halved throughput at 16 streams: `make bench`).
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for sink, event in self._outbox:
            by_loop.setdefault(sink.loop, []).append((sink, event))
        self._outbox = []
        for loop, batch in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_deliver, batch)

    def _expire_overdue(self) -> None:
        now = self._clock.now()
        for seq in [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.expired(now)]:
            self._finish(seq, "timeout")

    def _drain_inbox(self) -> None:
        self._expire_overdue()
        while True:
            try:
                kind, seq, sink = self._inbox.get_nowait()
            except queue.Empty:
                self._successors.settle()
                return
            if kind == "add":
                self._successors.arrived(seq.arrived)
                self._sinks[seq.id] = (sink, Detokenizer(self.tokenizer, seq.params.stop))
                self.scheduler.add(seq)
            elif kind == "abort" and not seq.finished and seq.id in self._sinks:
                self._finish(seq, "abort")

    def step(self) -> None:
        decode, prefill = self.scheduler.schedule()
        if not decode and not prefill:
            return
        switch = self.modes.update([s.adapter for s in self.scheduler.running])
        if switch is not None:
            self.metrics.switched(switch)
        started = time.perf_counter()
        logits = self.runner.run(decode, prefill, use_lora=self.modes.merged is None)
        seqs = decode + prefill
        logits, seqs = self._drop_overflowed(logits, seqs)
        self.scheduler.prefilled([seq for seq in prefill if not seq.finished])
        if not all(seq.prompt_done for seq in seqs):  # a prompt's middle chunk samples nothing yet
            ready = [i for i, seq in enumerate(seqs) if seq.prompt_done]
            logits, seqs = logits[ready], [seqs[i] for i in ready]
        tokens, logprobs = self._sample(logits, seqs)
        self.metrics.step(time.perf_counter() - started, len(decode), len(prefill), self.scheduler,
                          self.runner.lora.covers)
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            if seq.finished:  # its sampling failed
                continue
            try:
                self._postprocess(seq, token, logprob)
            except Exception:  # e.g. its stop strings or detokenizer: this request's failure alone
                log.exception("postprocessing request %d failed", seq.id)
                self._finish(seq, "error", "the server failed while decoding this request's output")

    def _drop_overflowed(self, logits, seqs: list[Sequence]) -> tuple:
        """Ends the requests whose logits are not finite (an adapter whose numbers overflow) and returns the
        rest: rows are computed independently, so the others' logits are still right."""
        finite = torch.isfinite(logits.sum(dim=-1))  # an inf or NaN anywhere in a row makes its sum one
        if bool(finite.all()):
            return logits, seqs
        keep = finite.tolist()
        for seq, ok in zip(seqs, keep):
            if not ok:
                log.warning("request %d (adapter %s): non-finite logits; ending it", seq.id, seq.adapter_name)
                self._finish(seq, "error", "the model's output overflowed to non-finite numbers "
                                           "(the adapter's weights are too large for this input)")
        kept = [i for i, ok in enumerate(keep) if ok]
        return logits[kept], [seqs[i] for i in kept]

    def _sample(self, logits, seqs: list[Sequence]) -> tuple[list[int], list]:
        """The batch's tokens; if sampling the batch at once fails, each row alone, so only the requests
        whose own sampling fails end (marked finished, with placeholder tokens)."""
        try:
            tokens = sample(logits, seqs)
            return tokens, logprobs_of(logits, seqs, tokens)
        except Exception:
            log.exception("sampling a batch of %d failed; sampling its rows one by one", len(seqs))
        tokens, logprobs = [], []
        for i, seq in enumerate(seqs):
            try:
                token = sample(logits[i : i + 1], [seq])
                logprob = logprobs_of(logits[i : i + 1], [seq], token)
            except Exception:
                log.exception("sampling request %d failed", seq.id)
                self._finish(seq, "error", "the server failed while sampling this request's next token")
                token, logprob = [-1], [None]
            tokens += token
            logprobs += logprob
        return tokens, logprobs

    def _postprocess(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        seq.output_ids.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = self._clock.now()
            self.metrics.first_token(seq)
        sink, detok = self._sinks[seq.id]
        p = seq.params
        reason = None
        if token in self.eos_ids and not p.ignore_eos:
            reason = "stop"
            text, hit_stop = "", False
        else:
            text, hit_stop = detok.add(token)
            if hit_stop:
                reason = "stop"
        if reason is None and (len(seq.output_ids) >= p.max_new_tokens
                               or seq.num_tokens >= self.runner.kv.max_len):
            reason = "length"
        if reason is not None and not hit_stop:
            text += detok.flush()
        if text or reason is None or logprob is not None:
            self._outbox.append((sink, TokenEvent(text, [token], completion_tokens=len(seq.output_ids),
                                                  logprob=logprob)))
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.scheduler.finish(seq, reason)
        self._finished_in_step += 1
        with self._pending_lock:
            self._pending -= 1
        self.metrics.finished(seq, reason, self._clock.now())
        sink, _ = self._sinks.pop(seq.id, (None, None))
        if sink is not None:
            self._outbox.append((sink, TokenEvent("", [], True, reason, len(seq.prompt_ids), len(seq.output_ids),
                                                  error=error)))
