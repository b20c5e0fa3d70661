"""Preallocated KV cache: one slot per running sequence, keys/values written in place.

Running sequences always occupy slots 0..n-1 (a finished sequence's slot is refilled by moving the last
one into it), so decode attention reads `k[:n, :, :len]` as a view instead of gathering rows every step.
Positions past a sequence's length are read and masked, so they must hold finite numbers (a masked NaN
still turns the softmax into NaN). A large CPU buffer is its own anonymous mmap, whose pages read as zeros
and become resident only when written. Not `torch.empty`: glibc serves a large request from memory the
heap already holds when it has enough free (server.heap keeps up to 256 MB of freed memory), and a
model load that freed its temporaries left old bytes there. Anything else (GPU memory, small buffers) is
zeroed once.

A layer with a sliding window keeps a ring instead, where the ring is shorter than `max_len`: position p at
entry p % ring, ring = window + max_chunk - 1. A prompt chunk writes all its keys before its queries attend,
so its first query still needs the window before it: the chunk's keys and that window fit, and what a chunk
overwrites is older than any of its queries sees. Attention masks each entry by the position it holds
(server.model.attention). Layers of one length share one tensor; `layer(i)` gives a layer's own.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from server.model.config import ModelConfig


def ring_lengths(cfg: ModelConfig, max_len: int, max_chunk: int | None) -> tuple[int | None, ...]:
    """Each layer's ring length, or None where it keeps every position (no window, or no saving)."""
    rings = []
    for layer in range(cfg.num_layers):
        window = cfg.window(layer)
        ring = None if window is None or max_chunk is None else window + max_chunk - 1
        rings.append(ring if ring is not None and ring < max_len else None)
    return tuple(rings)


@dataclass
class _Group:
    layers: list[int]    # the layers stored here, in order
    ring: int | None     # their ring length, or None: every position
    k: torch.Tensor      # [len(layers), slots, kv_heads, ring or max_len, head_dim]
    v: torch.Tensor

    def span(self, length: int) -> int:
        """The entries that hold a slot's first `length` positions."""
        return length if self.ring is None else min(length, self.ring)


class KVCache:
    def __init__(self, cfg: ModelConfig, max_seqs: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 max_chunk: int | None = None):
        """`max_chunk`: the most positions one step writes for a sequence (None: no rings)."""
        self.max_seqs = max_seqs
        self.cfg = cfg
        self.max_len = max_len
        self.dtype = dtype
        self.used = 0
        self.rings = ring_lengths(cfg, max_len, max_chunk)
        self._maps: list[mmap.mmap] = []  # the fresh pages' owners, kept for the tensors' lifetime
        self._groups: list[_Group] = []
        views: dict[int, tuple[torch.Tensor, torch.Tensor, int | None]] = {}
        for ring in dict.fromkeys(self.rings):
            layers = [i for i, r in enumerate(self.rings) if r == ring]
            shape = (len(layers), max_seqs, cfg.num_kv_heads, ring or max_len, cfg.head_dim)
            group = _Group(layers, ring, *(self._zeros(shape, device, dtype) for _ in range(2)))
            self._groups.append(group)
            for i, layer in enumerate(layers):
                views[layer] = (group.k[i], group.v[i], ring)
        self._layers = [views[i] for i in range(cfg.num_layers)]
        # every layer in one tensor [layers, slots, kv_heads, max_len, head_dim], as the native kernels read
        # it; None where some layer is a ring
        flat = self._groups[0] if len(self._groups) == 1 and self._groups[0].ring is None else None
        self.k = flat.k if flat else None
        self.v = flat.v if flat else None
        # what the cache holds, and what it would hold with every position of every layer
        self.nbytes = sum(2 * group.k.numel() * group.k.element_size() for group in self._groups)
        self.flat_nbytes = 2 * cfg.num_layers * max_seqs * cfg.num_kv_heads * max_len * cfg.head_dim * dtype.itemsize

    def _zeros(self, shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if torch.device(device).type != "cpu" or nbytes <= 64 * 2**20:
            return torch.zeros(shape, device=device, dtype=dtype)
        pages = mmap.mmap(-1, nbytes)
        self._maps.append(pages)
        return torch.frombuffer(pages, dtype=dtype).view(shape)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """Layer `index`'s keys and values, [slots, kv_heads, ring or max_len, head_dim], and its ring length
        (None: position p at entry p)."""
        return self._layers[index]

    @property
    def smallest_ring(self) -> int | None:
        rings = [r for r in self.rings if r is not None]
        return min(rings) if rings else None

    def held_from(self, written: int) -> int:
        """The first position every layer still holds once a slot's first `written` positions are written."""
        ring = self.smallest_ring
        return 0 if ring is None else max(0, written - ring)

    def allocate(self) -> int:
        if self.used >= self.max_seqs:
            raise RuntimeError("no free KV slot")
        self.used += 1
        return self.used - 1

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` positions of slot `src` into slot `dst` (a ring whole, once they fill it)."""
        for group in self._groups:
            n = group.span(length)
            group.k[:, dst, :, :n] = group.k[:, src, :, :n]
            group.v[:, dst, :, :n] = group.v[:, src, :, :n]

    def scrub(self, slot: int, length: int) -> None:
        """Zeroes the first `length` positions of `slot`, so masked reads of it stay finite."""
        for group in self._groups:
            n = group.span(length)
            group.k[:, slot, :, :n] = 0
            group.v[:, slot, :, :n] = 0

    def read(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of positions [start, end) of `slot`, [layers, kv_heads, end - start, head_dim] each; every
        layer must still hold them (see `held_from`)."""
        if len(self._groups) == 1 and self._groups[0].ring is None:
            group = self._groups[0]
            return group.k[:, slot, :, start:end].clone(), group.v[:, slot, :, start:end].clone()
        shape = (self.cfg.num_layers, self.cfg.num_kv_heads, end - start, self.cfg.head_dim)
        k, v = (torch.empty(shape, device=self._groups[0].k.device, dtype=self._groups[0].k.dtype) for _ in range(2))
        for group in self._groups:
            entries = self._entries(group, start, end)
            k[group.layers] = group.k[:, slot, :, entries]
            v[group.layers] = group.v[:, slot, :, entries]
        return k, v

    def write(self, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes k, v [layers, kv_heads, n, head_dim] as positions start..start + n - 1 of `slot`, as that
        many steps would in turn: a ring keeps the last of them."""
        end = start + k.shape[2]
        for group in self._groups:
            first = end - group.span(end - start)
            entries = self._entries(group, first, end)
            group.k[:, slot, :, entries] = k[group.layers, :, first - start :]
            group.v[:, slot, :, entries] = v[group.layers, :, first - start :]

    @staticmethod
    def _entries(group: _Group, start: int, end: int) -> slice | torch.Tensor:
        if group.ring is None:
            return slice(start, end)
        return torch.arange(start, end, device=group.k.device) % group.ring

    def release(self) -> None:
        """Frees the highest slot in use (callers first move what they keep out of it)."""
        self.used -= 1
