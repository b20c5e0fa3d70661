"""The one place where activations meet frozen weights, and where a hot-swap edits them.

Every base matmul goes through `Linear`, so the fast path is chosen once at start-up and CUDA takes its own.
On CPU, oneDNN with the weight reordered ("prepacked") once into its blocked layout ran 2.5-3x the
throughput of `F.linear` (MKL sgemm) at batch 16-64 on this machine's EPYC (fp32, 2 threads; see
bench/micro_linear.py).

A hot-swap adds a low-rank delta to some rows of the weight the kernel computes with and later puts the
exact base bits back. How depends on the kernel:
- plain (`F.linear`, CUDA): the kernel is the weight; rows are edited in place and refilled from the
  checkpoint by the caller's `RowEdit.refill`.
- packed in place (oneDNN fp32): fp32 reordering only permutes elements, into blocks of `block` output rows
  stored input-major. Linear checks at load that the packed buffer holds exactly that permutation of the
  weight, then edits the packed buffer in place through a strided view and restores from a copy of the base
  kept in the packed order (instead of a row-major one, so memory stays the same). Re-packing the touched
  sites instead ran oneDNN's reorder at ~1.8 GB/s and was 3/4 of a swap's time.
- repacked (oneDNN, any other layout, e.g. bf16's interleaved pairs): the row-major weight is edited, the
  kernel packed again from it and the base kernel kept aside to be put back.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "mkldnn")
_BLOCK_CANDIDATES = (64, 32, 16, 8, 48, 128)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    if name not in BACKENDS:
        raise ValueError(f"linear backend {name!r} is not one of {BACKENDS}")
    if name != "auto":
        return name
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _mkldnn_linear_works(dtype):
        return "mkldnn"
    return "torch"


def _mkldnn_linear_works(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(8, 16, dtype=dtype)
        x = torch.randn(3, 16, dtype=dtype)
        got = _mkldnn_apply(x, _mkldnn_pack(w), None)
        return torch.allclose(got.float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2)
    except RuntimeError:
        return False


def _mkldnn_pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)


def _mkldnn_apply(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, kernel, bias, "none", [], "")


def _mkldnn_buffer(kernel: torch.Tensor) -> torch.Tensor:
    """A dense 1-d tensor aliasing a oneDNN tensor's memory (valid while `kernel` lives)."""
    raw = (ctypes.c_char * torch.ops.mkldnn._nbytes(kernel)).from_address(torch.ops.mkldnn.data_ptr(kernel))
    return torch.frombuffer(raw, dtype=kernel.dtype)


def _blocked_view(kernel: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The packed buffer as [blocks, in, block] if it holds exactly `weight`'s rows in that order, else None.

    Both dimensions may be padded (rows to whole blocks, inputs to oneDNN's own multiple); the view skips
    the padding."""
    out, inp = weight.shape
    buffer = _mkldnn_buffer(kernel)
    for block in _BLOCK_CANDIDATES:
        blocks = -(-out // block)
        padded_inp, rest = divmod(buffer.numel(), blocks * block)
        if rest or not inp <= padded_inp < inp + 64:
            continue
        view = buffer.view(blocks, padded_inp, block)[:, :inp]
        if torch.equal(_rows(view, 0, out), weight):
            return view
    return None


def _rows(blocked: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Row-major copy of rows [start, stop) of a [blocks, in, block] view."""
    block = blocked.shape[2]
    first, last = start // block, -(-stop // block)
    span = blocked[first:last].permute(0, 2, 1).reshape(-1, blocked.shape[1])
    return span[start - first * block : stop - first * block]


@dataclass(frozen=True)
class RowEdit:
    """weight[rows] += scale * B @ A (B [rows, r], A [r, in]); `refill(out)` writes those rows' exact base
    values into `out`, for kernels that keep no copy of the base."""
    rows: slice
    B: torch.Tensor
    A: torch.Tensor
    scale: float
    refill: Callable[[torch.Tensor], None]


class Linear:
    """y = x W^T (+ b) for a frozen W of shape [out, in].

    `editable=False` (the tied lm_head) skips the base copy a packed-in-place kernel keeps for restores.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str, editable: bool = True):
        self.bias = bias
        self.backend = backend
        self.out_features, self.in_features = weight.shape
        self._edits: list[RowEdit] = []
        self._base_kernel: torch.Tensor | None = None
        self._blocked: torch.Tensor | None = None  # the packed buffer, when edited in place
        self._blocked_base: torch.Tensor | None = None
        self.weight: torch.Tensor | None = weight  # row-major; None once the packed base replaces it
        self.kernel = _mkldnn_pack(weight) if backend == "mkldnn" else weight
        if backend == "mkldnn" and editable and weight.dtype == torch.float32:
            self._blocked = _blocked_view(self.kernel, weight)
            if self._blocked is not None:
                self._blocked_base = self._blocked.clone()
                self.weight = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "mkldnn":
            return _mkldnn_apply(x, self.kernel, self.bias)
        return F.linear(x, self.kernel, self.bias)

    def effective_weight(self) -> torch.Tensor:
        """The [out, in] weight the kernel computes with now (a copy where the kernel is packed)."""
        if self._blocked is not None:
            return _rows(self._blocked, 0, self.out_features)
        return self.kernel.to_dense() if self.kernel.is_mkldnn else self.kernel

    def merge(self, edits: list[RowEdit]) -> None:
        """Applies `edits` to the weight the kernel computes with; `restore` undoes all merges exactly."""
        self._edits += edits
        if self._blocked is not None:
            for edit in edits:
                self._add_blocked(edit)
            return
        for edit in edits:
            rows = self.weight[edit.rows]
            if rows.dtype == torch.float32:  # one fused kernel, no delta-sized temporaries
                rows.addmm_(edit.B, edit.A, alpha=edit.scale)
            else:  # sum in float32, round once into the narrow dtype
                rows.copy_((rows.float() + (edit.B @ edit.A) * edit.scale).to(rows.dtype))
        if self.backend == "mkldnn":
            if self._base_kernel is None:
                self._base_kernel = self.kernel
            self.kernel = _mkldnn_pack(self.weight)

    def restore(self) -> None:
        """Puts back the exact base bits of every row merged since the last restore."""
        for edit in self._edits:
            if self._blocked is not None:
                first, last = self._block_span(edit.rows)
                self._blocked[first:last].copy_(self._blocked_base[first:last])
            else:
                edit.refill(self.weight[edit.rows])
        if self._base_kernel is not None:
            self.kernel, self._base_kernel = self._base_kernel, None
        self._edits = []

    def _block_span(self, rows: slice) -> tuple[int, int]:
        block = self._blocked.shape[2]
        return rows.start // block, -(-rows.stop // block)

    def _add_blocked(self, edit: RowEdit) -> None:
        """The delta written straight into the packed layout: block b holds W[b*block:(b+1)*block].T, so it
        takes A.T @ B[those rows].T; whole blocks in one batched matmul, partial ones at the ends alone."""
        block = self._blocked.shape[2]
        start, stop = edit.rows.start, edit.rows.stop
        At = edit.A.t()
        full_first, full_last = -(-start // block), stop // block
        if full_first < full_last:
            Bt = edit.B[full_first * block - start : full_last * block - start]
            Bt = Bt.reshape(full_last - full_first, block, -1).transpose(1, 2)
            self._blocked[full_first:full_last].baddbmm_(At.expand(full_last - full_first, *At.shape), Bt,
                                                         alpha=edit.scale)
        for b in {start // block, (stop - 1) // block}:
            if full_first <= b < full_last:
                continue
            lo, hi = max(start, b * block), min(stop, (b + 1) * block)
            self._blocked[b, :, lo - b * block : hi - b * block].addmm_(At, edit.B[lo - start : hi - start].t(),
                                                                        alpha=edit.scale)
