"""The one place where activations meet frozen weights, and where a hot-swap edits them.

Every base matmul goes through `Linear`, with the projection kernel the backend chose once at start-up
(server.model.backend); CUDA takes `F.linear`. On CPU, where a decode step streams every weight once:
- panel (`server.kernels.panel`, the default for fp32 on AVX2 and AVX-512 CPUs): our own kernel over weights
  stored as [out/16, in, 16] panels. It streams a step's weights faster than oneDNN at decode's row counts
  and is about level on a long prompt's chunk (`python -m bench.micro_linear`; figures in docs/decisions.md).
- mkldnn: oneDNN with the weight reordered ("prepacked") once into its blocked layout, faster than
  `F.linear` (MKL sgemm); the default where the panel kernel cannot run, and for bf16.

A hot-swap adds a low-rank delta to some rows of the weight the kernel computes with and later puts the
exact base bits back. How depends on the kernel:
- plain (`F.linear`, CUDA): the kernel is the weight; rows are edited in place and refilled from the
  checkpoint by the caller's `RowEdit.refill`.
- packed pair (panel, and oneDNN fp32): both store blocks of `block` output rows input-major (oneDNN's
  fp32 reorder only permutes elements; Linear checks at load that its buffer holds exactly that
  permutation of the weight). Linear keeps two packed kernels and no row-major weight (the same memory as
  weight + kernel): the base, never written, and a scratch one a merge writes base + delta into through
  strided views of both buffers, in one pass. Restore points back at the base. Nothing is re-packed, which
  is what a swap's time was (`make bench`'s swap row; figures in docs/decisions.md).
- repacked (oneDNN, any other layout, e.g. bf16's interleaved pairs): the row-major weight is edited, the
  kernel packed again from it and the base kernel kept aside to be put back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from server.kernels import onednn
from server.kernels.panel import pack_panels

if TYPE_CHECKING:
    from server.model.backend import Backend

_BLOCK_CANDIDATES = (64, 32, 16, 8, 48, 128)


_PACKERS = {"mkldnn": onednn.pack, "panel": pack_panels}  # backend -> [out, in] weight -> its kernel


def _blocked_view(kernel: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The packed buffer as [blocks, in, block] if it holds exactly `weight`'s rows in that order, else None.

    Both dimensions may be padded (rows to whole blocks, inputs to oneDNN's own multiple); the view skips
    the padding."""
    out, inp = weight.shape
    buffer = onednn.buffer(kernel)
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


class _PackedPair:
    """Two oneDNN kernels of one fp32 weight: the base, never written after load, and a scratch copy that a
    merge fills with base + delta in one pass (reading the base's blocks, writing the scratch's). Restoring
    is pointing back at the base, so it copies nothing and the base bits are exact by construction. Scratch
    blocks an earlier merge left behind are reset from the base when the next merge does not overwrite them.
    Block b of a view holds W[b*block:(b+1)*block].T, so a delta adds A.T @ B[those rows].T to it.
    """

    def __init__(self, base: torch.Tensor, base_view: torch.Tensor, scratch: torch.Tensor, scratch_view: torch.Tensor):
        self.base, self.scratch = base, scratch
        self._base_view, self._scratch_view = base_view, scratch_view
        self._dirty: set[int] = set()  # scratch blocks that differ from the base

    @classmethod
    def build(cls, weight: torch.Tensor, backend: str) -> _PackedPair | None:
        if backend == "panel":  # the panels are the blocked view
            base = pack_panels(weight)
            scratch = base.clone()
            return cls(base, base, scratch, scratch)
        base, scratch = onednn.pack(weight), onednn.pack(weight)
        base_view, scratch_view = _blocked_view(base, weight), _blocked_view(scratch, weight)
        if base_view is None or scratch_view is None:
            return None
        return cls(base, base_view, scratch, scratch_view)

    def view(self, kernel: torch.Tensor) -> torch.Tensor:
        return self._scratch_view if kernel is self.scratch else self._base_view

    def merge(self, edits: list[RowEdit], on_top: bool) -> torch.Tensor:
        """The scratch kernel holding base + edits, or, `on_top` of a merge it already holds, that plus edits."""
        block = self._base_view.shape[2]
        fresh: set[int] = set()  # blocks written from the base in this merge
        for edit in edits:
            for first, last, lo, hi in _pieces(edit.rows, block):
                Bt = edit.B[first * block + lo - edit.rows.start : (last - 1) * block + hi - edit.rows.start]
                Bt = Bt.reshape(last - first, hi - lo, -1).transpose(1, 2)
                At = edit.A.t().expand(last - first, -1, -1)
                target = self._scratch_view[first:last, :, lo:hi]
                blocks = set(range(first, last))
                if not on_top and not blocks & fresh and hi - lo == block:  # the one-pass case
                    torch.baddbmm(self._base_view[first:last], At, Bt, alpha=edit.scale, out=target)
                else:
                    for b in sorted(blocks - fresh) if not on_top else []:
                        self._scratch_view[b].copy_(self._base_view[b])
                    target.baddbmm_(At, Bt, alpha=edit.scale)
                fresh |= blocks
        if on_top:
            self._dirty |= fresh
        else:
            for b in self._dirty - fresh:
                self._scratch_view[b].copy_(self._base_view[b])
            self._dirty = fresh
        return self.scratch


def _pieces(rows: slice, block: int) -> list[tuple[int, int, int, int]]:
    """`rows` as (first block, last block, first row, end row within the block): the whole blocks as one
    run, then each partly covered block alone."""
    start, stop = rows.start, rows.stop
    whole_first, whole_last = -(-start // block), stop // block
    pieces = [(whole_first, whole_last, 0, block)] if whole_first < whole_last else []
    for b in sorted({start // block, (stop - 1) // block}):
        if not whole_first <= b < whole_last:
            pieces.append((b, b + 1, max(start, b * block) - b * block, min(stop, (b + 1) * block) - b * block))
    return pieces


class Linear:
    """y = x W^T (+ b) for a frozen W of shape [out, in].

    `editable=False` (the tied lm_head) skips the scratch kernel a packed pair keeps for merges.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: Backend, editable: bool = True):
        self.bias = bias
        self.backend = backend.linear
        self.out_features, self.in_features = weight.shape
        self._edits: list[RowEdit] = []  # merged since the last restore, where the base comes from `refill`
        self._base_kernel: torch.Tensor | None = None
        self._panel = backend.panel if self.backend == "panel" else None
        if self.backend == "panel" and self._panel is None:
            raise ValueError("the panel kernel does not run on this machine (see server.model.backend)")
        self._pair = _PackedPair.build(weight, self.backend) \
            if self.backend in _PACKERS and editable and weight.dtype == torch.float32 else None
        self.weight: torch.Tensor | None = None if self._pair else weight  # row-major, where edits go through it
        if self._pair:
            self.kernel = self._pair.base
        else:
            self.kernel = _PACKERS[self.backend](weight) if self.backend in _PACKERS else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._panel:
            return self._panel(x, self.kernel, self.out_features, self.bias)
        if self.backend == "mkldnn":
            return onednn.linear(x, self.kernel, self.bias)
        return F.linear(x, self.kernel, self.bias)

    def panels(self) -> torch.Tensor | None:
        """The [out/16, in, 16] panels the kernel computes with now, where the panel kernel alone computes
        this projection (no bias): what a native caller may multiply by directly."""
        return self.kernel if self._panel is not None and self.bias is None else None

    def native_operand(self) -> list[int] | None:
        """What the native decoder stack multiplies by now, as (data, panels, bits 0, 0, 0) of the fp32
        panels, or None where it cannot (see `panels`)."""
        panels = self.panels()
        return None if panels is None else [panels.data_ptr(), panels.shape[0], 0, 0, 0]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this projection keeps for its whole life (kernels, the merge scratch, the row-major
        weight where edits go through it)."""
        held = [self.kernel, self.weight, self.bias, self._base_kernel]
        if self._pair:
            held += [self._pair.base, self._pair.scratch]
        return list({id(t): t for t in held if t is not None and not t.is_mkldnn}.values())

    def effective_weight(self) -> torch.Tensor:
        """The [out, in] weight the kernel computes with now (a copy where the kernel is packed)."""
        if self._pair:
            return _rows(self._pair.view(self.kernel), 0, self.out_features)
        if self.backend == "panel":
            return _rows(self.kernel, 0, self.out_features)
        return self.kernel.to_dense() if self.kernel.is_mkldnn else self.kernel

    def merge(self, edits: list[RowEdit]) -> None:
        """Applies `edits` to the weight the kernel computes with; `restore` undoes all merges exactly."""
        if self._pair:
            self.kernel = self._pair.merge(edits, on_top=self.kernel is self._pair.scratch)
            return
        self._edits += edits  # what restore refills
        for edit in edits:
            rows = self.weight[edit.rows]
            if rows.dtype == torch.float32:  # one fused kernel, no delta-sized temporaries
                rows.addmm_(edit.B, edit.A, alpha=edit.scale)
            else:  # sum in float32, round once into the narrow dtype
                rows.copy_((rows.float() + (edit.B @ edit.A) * edit.scale).to(rows.dtype))
        if self.backend in _PACKERS:
            if self._base_kernel is None:
                self._base_kernel = self.kernel
            self.kernel = _PACKERS[self.backend](self.weight)

    def restore(self) -> None:
        """Puts back the exact base bits of every row merged since the last restore."""
        if self._pair:
            self.kernel = self._pair.base
            return
        for edit in self._edits:
            edit.refill(self.weight[edit.rows])
        self._edits = []
        if self._base_kernel is not None:
            self.kernel, self._base_kernel = self._base_kernel, None
