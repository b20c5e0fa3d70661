"""A request's tokens, sampling parameters and status as it moves through the engine."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch

from adapters import Adapter

if TYPE_CHECKING:
    from server.engine.constraint import Grammar

_ids = itertools.count()
SAMPLING_EPS = 1e-5  # as vLLM: a temperature under this samples greedily


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None   # None = off; k = the chosen token's logprob plus the k most likely
    presence_penalty: float = 0.0     # OpenAI's: minus this for every token already generated
    frequency_penalty: float = 0.0    # OpenAI's: minus this times how often it was generated
    repetition_penalty: float = 1.0   # HF/vLLM's: logits of prompt and generated tokens divided (if > 0) or multiplied
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_p: float = 0.0                # drop tokens under min_p x the top token's probability
    grammar: Grammar | None = None    # the output held to it (server.engine.constraint)

    @property
    def reshapes_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    @property
    def greedy(self) -> bool:
        # below SAMPLING_EPS, logits / temperature can overflow float32; the distribution is one-hot anyway
        return self.temperature < SAMPLING_EPS or self.top_k == 1


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, adapter=None, device="cpu",
                 timeout_s: float | None = None, cache_scope: str = "", arrived: float | None = None):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        if adapter is not None and not isinstance(adapter, Adapter):  # a name here would fail on the engine thread
            raise TypeError(f"a request's adapter is an adapters.Adapter or None, not {type(adapter).__name__}")
        self.adapter = adapter            # an adapters.Adapter, or None for the bare base model
        self.status = Status.WAITING
        self.kv_slot = -1
        self.lora_slot = -1
        self.cached_tokens = 0            # prompt tokens in the KV cache (from the prefix cache or earlier chunks)
        self.chunk_tokens = 0             # prompt tokens computed in the current step
        self.cache_scope = cache_scope    # prefix-cache entries are shared only within one scope (API key)
        self.finish_reason: str | None = None
        self.arrived = time.monotonic() if arrived is None else arrived  # the engine's clock, when it builds one
        self.deadline = self.arrived + timeout_s if timeout_s else None
        self.first_token_at: float | None = None
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.constraint = params.grammar.matcher() if params.grammar is not None else None  # its own state

    @property
    def adapter_name(self) -> str | None:
        return self.adapter.name if self.adapter is not None else None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prompt_done(self) -> bool:
        return self.cached_tokens >= len(self.prompt_ids)

    def plan_chunk(self, budget: int) -> bool:
        """Sets the prompt tokens to compute in the next step (at most `budget`); True if they finish it."""
        self.chunk_tokens = min(len(self.prompt_ids) - self.cached_tokens, budget)
        return self.cached_tokens + self.chunk_tokens == len(self.prompt_ids)

    @property
    def kv_tokens(self) -> int:
        """Positions whose keys and values are in the KV cache (the newest token is not, until it is fed)."""
        return self.num_tokens - 1 if self.prompt_done else self.cached_tokens

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
