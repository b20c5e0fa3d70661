"""Preallocated KV cache: one slot per running sequence, keys/values written in place.

Running sequences always occupy slots 0..n-1 (a finished sequence's slot is refilled by moving the last
one into it), so decode attention reads `k[:n, :, :len]` as a view instead of gathering rows every step.
Positions past a sequence's length are read and masked, so they must hold finite numbers (a masked NaN
still turns the softmax into NaN). A large CPU buffer is its own anonymous mmap, whose pages read as zeros
and become resident only when written. Not `torch.empty`: glibc serves a large request from memory the
heap already holds when it has enough free (server.heap keeps up to 256 MB of freed memory), and a
model load that freed its temporaries left old bytes there. Anything else (GPU memory, small buffers) is
zeroed once.
"""

from __future__ import annotations

import math
import mmap

import torch

from server.model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, max_seqs: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.num_layers, max_seqs, cfg.num_kv_heads, max_len, cfg.head_dim)
        nbytes = math.prod(shape) * dtype.itemsize
        self._maps: list[mmap.mmap] = []  # the fresh pages' owners, kept for the tensors' lifetime
        if torch.device(device).type == "cpu" and nbytes > 64 * 2**20:
            self.k, self.v = (self._fresh_zeros(shape, dtype, nbytes) for _ in range(2))
        else:
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_seqs = max_seqs
        self.cfg = cfg
        self.max_len = max_len
        self.used = 0

    def _fresh_zeros(self, shape, dtype: torch.dtype, nbytes: int) -> torch.Tensor:
        pages = mmap.mmap(-1, nbytes)
        self._maps.append(pages)
        return torch.frombuffer(pages, dtype=dtype).view(shape)

    def allocate(self) -> int:
        if self.used >= self.max_seqs:
            raise RuntimeError("no free KV slot")
        self.used += 1
        return self.used - 1

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` positions of slot `src` into slot `dst`."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def scrub(self, slot: int, length: int) -> None:
        """Zeroes the first `length` positions of `slot`, so masked reads of it stay finite."""
        self.k[:, slot, :, :length] = 0
        self.v[:, slot, :, :length] = 0

    def release(self) -> None:
        """Frees the highest slot in use (callers first move what they keep out of it)."""
        self.used -= 1
