"""Keys and values of token prefixes already computed, reused by later requests that start the same way.

Chat front ends resend the same system prompt, persona card and conversation so far with every message;
computing those tokens again is most of a short request's cost here. Like vLLM's automatic prefix caching,
KV is kept in blocks of `block_tokens` tokens, each found by a hash of everything before and in it, so
requests share whatever whole blocks they have in common. Unlike it, and like SGLang's radix cache, a match
does not stop at the last whole block: the tail of a stored prompt is kept too, and the blocks after a
matched one are its children, so a cached block that begins like the rest of a prompt serves the tokens
that agree. A resent prompt then computes its last token only, where whole blocks left up to a block's
worth, so a step that admits it costs about a decode step (`make bench`'s prefix-cache row; figures in
docs/decisions.md).

A block's key also names the adapter that computed it: LoRA changes the hidden states, so the same tokens
have different keys and values under different adapters. And it names a scope (the server passes the API
key's id): a hit shows as a faster first token, which would tell one tenant what another has asked (the
side channel vLLM's `cache_salt` closes), so only requests of one scope share blocks. Keys are SHA-256 chains, not Python's `hash`,
so one client cannot craft a prompt whose key collides with another client's prefix. The adapter part of
a key is the object's `id`, which Python may hand to a new adapter once the old one is gone (deleted, or
replaced under its name), so an entry also holds a weak reference to its adapter and matches only while
that is the very adapter asked for. Weak, because a strong one kept every deleted adapter's weights in
memory for as long as any of its blocks stayed cached (up to `max_bytes / block bytes` adapters).
Blocks live on the compute device, evicted least recently used first beyond `max_bytes`. A block holds every
layer's keys, so where a windowed layer keeps a ring (server.engine.kv_cache), only blocks it still holds are
kept: a prompt's as each chunk is computed, a reply's only while the ring holds all of it.
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
    tokens: tuple[int, ...]  # the tokens whose keys and values it holds: a whole block, or a prompt's tail
    parent: bytes        # the key of the block before it (or of the chain's root)
    k: torch.Tensor      # [layers, kv_heads, len(tokens), head_dim]
    v: torch.Tensor
    adapter: Callable[[], object]   # a weak reference: the adapter whose id is in the key, or None once gone

    def computed_by(self, adapter) -> bool:
        return self.adapter() is adapter


@dataclass(frozen=True)
class PrefixHit:
    keys: tuple[bytes, ...] = ()   # the matched blocks, in order; the last may be used in part
    tokens: int = 0                # prompt tokens they cover


class PrefixCache:
    def __init__(self, kv: KVCache, block_tokens: int, max_bytes: int):
        self.kv = kv
        self.block_tokens = block_tokens
        cfg = kv.cfg
        self.token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv.dtype.itemsize
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self._children: dict[bytes, set[bytes]] = {}
        self._bytes = 0
        self.hit_tokens = 0

    def _root(self, scope: str, adapter) -> bytes:
        return hashlib.sha256(b"adapter:%d scope:%s" % (id(adapter) if adapter is not None else 0,
                                                        scope.encode())).digest()

    def _chain(self, scope: str, adapter, tokens: list[int], count: int) -> list[bytes]:
        """Keys of the first `count` whole blocks of `tokens` under `adapter` in `scope`."""
        key, keys = self._root(scope, adapter), []
        for i in range(count):
            key = _child_key(key, tokens[i * self.block_tokens : (i + 1) * self.block_tokens])
            keys.append(key)
        return keys

    def match(self, scope: str, adapter, prompt: list[int]) -> PrefixHit:
        """The cached blocks that begin `prompt`, leaving at least its last token to compute (its hidden
        state gives the first sampled token). Past the whole blocks, a cached block (whole, or a prompt's
        tail) that begins like the rest of the prompt serves as many tokens as agree: a request that resends
        a prompt computes one token, not up to a block's worth."""
        hit, parent = [], self._root(scope, adapter)
        for key in self._chain(scope, adapter, prompt, (len(prompt) - 1) // self.block_tokens):
            block = self._blocks.get(key)
            if block is None or not block.computed_by(adapter):
                break
            hit.append(key)
            parent = key
        covered = len(hit) * self.block_tokens
        rest = prompt[covered : len(prompt) - 1]
        best, best_len = None, 0
        for key in self._children.get(parent, ()) if rest else ():
            block = self._blocks[key]
            agree = _common_prefix(block.tokens, rest)
            if agree > best_len and block.computed_by(adapter):
                best, best_len = key, agree
        if best is not None:
            hit.append(best)
        return PrefixHit(tuple(hit), covered + best_len)

    def load(self, hit: PrefixHit, slot: int) -> int:
        """Copies the hit's keys and values into `slot`; returns the prompt tokens they cover."""
        position = 0
        for key in hit.keys:
            block = self._blocks[key]
            self._blocks.move_to_end(key)
            take = min(len(block.tokens), hit.tokens - position)
            self.kv.write(slot, position, block.k[:, :, :take], block.v[:, :, :take])
            position += take
        self.hit_tokens += hit.tokens
        return hit.tokens

    def store(self, scope: str, adapter, tokens: list[int], slot: int) -> None:
        """Keeps the blocks of `tokens`, whose KV `slot` holds from position 0, that are not yet kept: the
        whole blocks, and the tail after them unless a kept block already begins with it. `tokens` are all the
        slot has written: where a ring has overwritten a block's positions, that block and those after it are
        not kept (a chain is matched from its start, so they could not be found)."""
        if self.max_bytes < self.token_bytes:
            return
        n = self.block_tokens
        held = self.kv.held_from(len(tokens))
        parent = self._root(scope, adapter)
        for i, key in enumerate(self._chain(scope, adapter, tokens, len(tokens) // n)):
            if not self._keep(key, parent, tokens[i * n : (i + 1) * n], adapter, slot, i * n, held):
                return
            parent = key
        tail = tokens[len(tokens) // n * n :]
        if not tail:
            return
        for key in self._children.get(parent, ()):
            block = self._blocks[key]
            if _common_prefix(block.tokens, tail) == len(tail) and block.computed_by(adapter):
                self._blocks.move_to_end(key)
                return
        self._keep(_child_key(parent, tail), parent, tail, adapter, slot, len(tokens) - len(tail), held)

    def _keep(self, key: bytes, parent: bytes, tokens: list[int], adapter, slot: int, start: int,
              held: int) -> bool:
        """Keeps the block at `start` of `slot` unless it is kept already; False where the slot no longer holds
        it (positions before `held`)."""
        old = self._blocks.get(key)
        if old is not None and old.computed_by(adapter):
            self._blocks.move_to_end(key)
            return True
        if start < held:
            return False
        if old is not None:  # a block of a gone adapter whose id this one now has
            self._drop(key)
        self._blocks[key] = _Block(tuple(tokens), parent, *self.kv.read(slot, start, start + len(tokens)),
                                   _weak(adapter))
        self._children.setdefault(parent, set()).add(key)
        self._bytes += len(tokens) * self.token_bytes
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._blocks)))
        return True

    def _drop(self, key: bytes) -> None:
        block = self._blocks.pop(key)
        self._bytes -= len(block.tokens) * self.token_bytes
        siblings = self._children[block.parent]
        siblings.discard(key)
        if not siblings:
            del self._children[block.parent]

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def bytes(self) -> int:
        return self._bytes


def _child_key(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _weak(adapter) -> Callable[[], object]:
    return (lambda: None) if adapter is None else weakref.ref(adapter)
