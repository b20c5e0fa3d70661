"""Keys and values of token prefixes already computed, reused by later requests that start the same way.

Chat front ends resend the same system prompt, persona card and conversation so far with every message;
computing those tokens again is most of a short request's cost here (a 70-token prefill costs as much as
two decode steps of 16 rows). Like vLLM's automatic prefix caching, KV is kept in blocks of
`block_tokens` tokens, each found by a hash of everything before and in it, so requests share whatever
whole blocks they have in common.

A block's key also names the adapter that computed it: LoRA changes the hidden states, so the same tokens
have different keys and values under different adapters. And it names a scope (the server passes the API
key's id): a hit shows as a faster first token, which would tell one tenant what another has asked (the
side channel vLLM's `cache_salt` closes), so only requests of one scope share blocks. Keys are SHA-256 chains, not Python's `hash`,
so one client cannot craft a prompt whose key collides with another client's prefix. The adapter part of
a key is the object's `id`, which Python may hand to a new adapter once the old one is gone (deleted, or
replaced under its name), so an entry also holds a weak reference to its adapter and matches only while
that is the very adapter asked for. Weak, because a strong one kept every deleted adapter's weights in
memory for as long as any of its blocks stayed cached (up to `max_bytes / block bytes` adapters).
Blocks live on the compute device, evicted least recently used first beyond `max_bytes`.
"""

from __future__ import annotations

import hashlib
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.engine.kv_cache import KVCache


@dataclass(frozen=True)
class _Block:
    k: torch.Tensor      # [layers, kv_heads, block_tokens, head_dim]
    v: torch.Tensor
    adapter: Callable[[], object]   # a weak reference: the adapter whose id is in the key, or None once gone

    def computed_by(self, adapter) -> bool:
        return self.adapter() is adapter


@dataclass(frozen=True)
class PrefixHit:
    keys: tuple[bytes, ...] = ()   # the matched blocks, in order
    tokens: int = 0                # prompt tokens they cover


class PrefixCache:
    def __init__(self, kv: KVCache, block_tokens: int, max_bytes: int):
        self.kv = kv
        self.block_tokens = block_tokens
        layers, _, kv_heads, _, head_dim = kv.k.shape
        self.block_bytes = 2 * layers * kv_heads * block_tokens * head_dim * kv.k.element_size()
        self.max_blocks = max_bytes // self.block_bytes
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self.hit_tokens = 0

    def _chain(self, scope: str, adapter, tokens: list[int], count: int) -> list[bytes]:
        """Keys of the first `count` whole blocks of `tokens` under `adapter` in `scope`."""
        root = b"adapter:%d scope:%s" % (id(adapter) if adapter is not None else 0, scope.encode())
        key = hashlib.sha256(root).digest()
        keys = []
        for i in range(count):
            block = tokens[i * self.block_tokens : (i + 1) * self.block_tokens]
            key = hashlib.sha256(key + array("q", block).tobytes()).digest()
            keys.append(key)
        return keys

    def match(self, scope: str, adapter, prompt: list[int]) -> PrefixHit:
        """The cached blocks that begin `prompt`, leaving at least its last token to compute (its hidden
        state gives the first sampled token)."""
        hit = []
        for key in self._chain(scope, adapter, prompt, (len(prompt) - 1) // self.block_tokens):
            block = self._blocks.get(key)
            if block is None or not block.computed_by(adapter):
                break
            hit.append(key)
        return PrefixHit(tuple(hit), len(hit) * self.block_tokens)

    def load(self, hit: PrefixHit, slot: int) -> int:
        """Copies the hit's blocks into `slot`; returns the prompt tokens they cover."""
        n = self.block_tokens
        for i, key in enumerate(hit.keys):
            block = self._blocks[key]
            self._blocks.move_to_end(key)
            self.kv.k[:, slot, :, i * n : (i + 1) * n] = block.k
            self.kv.v[:, slot, :, i * n : (i + 1) * n] = block.v
        self.hit_tokens += hit.tokens
        return hit.tokens

    def store(self, scope: str, adapter, tokens: list[int], slot: int) -> None:
        """Keeps the whole blocks of `tokens`, whose KV `slot` holds from position 0, that are not yet kept."""
        if self.max_blocks == 0:
            return
        n = self.block_tokens
        for i, key in enumerate(self._chain(scope, adapter, tokens, len(tokens) // n)):
            if key in self._blocks and self._blocks[key].computed_by(adapter):
                self._blocks.move_to_end(key)
                continue
            self._blocks.pop(key, None)  # a block of a gone adapter whose id this one now has
            self._blocks[key] = _Block(self.kv.k[:, slot, :, i * n : (i + 1) * n].clone(),
                                       self.kv.v[:, slot, :, i * n : (i + 1) * n].clone(), _weak(adapter))
            if len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def bytes(self) -> int:
        return len(self._blocks) * self.block_bytes


def _weak(adapter) -> Callable[[], object]:
    return (lambda: None) if adapter is None else weakref.ref(adapter)
