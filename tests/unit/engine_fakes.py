"""A fake clock and a fake model runner, so the real Engine and Scheduler run on one thread, in simulated time.

Each step of the fake runner takes `step_s` of simulated time and answers TOKEN for every row. Clients
schedule their submissions at simulated times (`FakeClock.at`); they are submitted while the loop sleeps
or while a step runs, exactly when their time comes, so which step a request joins is the same on every
run however loaded the machine is.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from server.engine.admission import AdmissionWait
from server.engine.engine import AsyncSink, Engine, TokenEvent
from server.engine.kv_cache import KVCache
from server.engine.request import SamplingParams, Sequence
from server.engine.scheduler import Scheduler
from server.lora.manager import AdapterSlots
from server.lora.mode_switch import ModeSwitch
from server.model.config import ModelConfig

VOCAB = 8
TOKEN = 3  # what every step samples (greedy); never an end of sequence
EOS = 0
CFG = ModelConfig.from_hf({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                           "num_attention_heads": 1, "num_key_value_heads": 1, "intermediate_size": 8,
                           "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                           "max_position_embeddings": 256})


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self._due: list[tuple[float, int, object]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self.t

    def at(self, t: float, action) -> None:
        heapq.heappush(self._due, (t, next(self._order), action))

    def advance(self, seconds: float) -> None:
        """Lets `seconds` pass, doing what falls due meanwhile."""
        until = self.t + seconds
        while self._due and self._due[0][0] <= until:
            self._fire()
        self.t = until

    def wait(self, wake: threading.Event, timeout: float) -> bool:
        """Sleeps until `wake` is set by something falling due, or `timeout` passes."""
        until = self.t + timeout
        while self._due and self._due[0][0] <= until and not wake.is_set():
            self._fire()
        if not wake.is_set():
            self.t = until
        return wake.is_set()

    def _fire(self) -> None:
        t, _, action = heapq.heappop(self._due)
        self.t = max(self.t, t)
        action()


class FakeRunner:
    device = torch.device("cpu")

    def __init__(self, clock: FakeClock, kv: KVCache, step_s: float):
        self.clock = clock
        self.kv = kv
        self.step_s = step_s
        self.lora = SimpleNamespace(max_slots=2, set_lora=lambda slot, adapter: None,
                                    covers=SimpleNamespace(builds=0, build_seconds=0.0))
        self.steps: list[tuple[list[int], list[int]]] = []  # (decoded ids, prefilled ids) of each step
        self.started: list[float] = []  # when each step began

    def run(self, decode: list[Sequence], prefill: list[Sequence], use_lora: bool) -> torch.Tensor:
        self.steps.append(([s.id for s in decode], [s.id for s in prefill]))
        self.started.append(self.clock.now())
        self.clock.advance(self.step_s)
        logits = torch.zeros(len(decode) + len(prefill), VOCAB)
        logits[:, TOKEN] = 1.0
        return logits


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(f"<{i}>" for i in ids)


class Inline:
    """Stands in for a client's event loop: events are delivered as the engine flushes them."""

    def is_closed(self) -> bool:
        return False

    def call_soon_threadsafe(self, deliver, batch) -> None:
        deliver(batch)


@dataclass
class Events:
    """A request's events as its client receives them; `on_finish` runs when the last one arrives."""
    seq: Sequence | None = None
    got: list[TokenEvent] = field(default_factory=list)
    on_finish: object = None

    def put_nowait(self, event: TokenEvent) -> None:
        self.got.append(event)
        if event.finished and self.on_finish is not None:
            self.on_finish()

    @property
    def finish_reason(self) -> str | None:
        return self.got[-1].finish_reason if self.got and self.got[-1].finished else None


@dataclass
class Loop:
    clock: FakeClock
    runner: FakeRunner
    engine: Engine

    def submit(self, prompt_len: int, params: SamplingParams, adapter=None, on_finish=None) -> Events:
        events = Events(on_finish=on_finish)
        events.seq = self.engine.submit(list(range(1, prompt_len + 1)), params, adapter, AsyncSink(Inline(), events))
        return events

    def run_until(self, done, max_turns: int = 10_000) -> None:
        for _ in range(max_turns):
            if done():
                return
            self.engine.run_once()
        raise AssertionError(f"not done after {max_turns} turns of the loop")

    def first_step_of(self, seq: Sequence) -> int:
        """The index of the step that computed the request's prompt (its last chunk)."""
        return max(i for i, (_, prefilled) in enumerate(self.runner.steps) if seq.id in prefilled)

    def last_step_of(self, seq: Sequence) -> int:
        return max(i for i, (decoded, prefilled) in enumerate(self.runner.steps) if seq.id in decoded + prefilled)


def fake_loop(step_s: float = 0.025, admission: AdmissionWait | None = None, max_seqs: int = 8,
              max_prefill_tokens: int = 64, admits_mixed: bool = True, timeout_s: float | None = None,
              lora_mode: str = "unmerged") -> Loop:
    clock = FakeClock()
    kv = KVCache(CFG, max_seqs, 128, torch.device("cpu"), torch.float32)
    runner = FakeRunner(clock, kv, step_s)
    scheduler = Scheduler(kv, AdapterSlots(runner.lora), max_prefill_tokens, admits_mixed)
    engine = Engine(runner, scheduler, FakeTokenizer(), ModeSwitch(None, None, lora_mode), {EOS}, timeout_s=timeout_s,
                    admission=admission, clock=clock)
    return Loop(clock, runner, engine)
