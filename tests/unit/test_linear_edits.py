"""Linear's hot-swap edits on tiny weights: every kernel computes with W + scale*B@A after `merge` and with
the exact base bits after `restore`, whatever the rows' alignment to the packed layout's blocks."""

import pytest
import torch
import torch.nn.functional as F

from server.model.backend import linear_kinds, resolve_backend
from server.model.linear import Linear, RowEdit

CPU = torch.device("cpu")
BACKENDS = linear_kinds(CPU, torch.float32)
PACKED_PAIRS = [b for b in BACKENDS if b != "torch"]


def edit(base: torch.Tensor, rows: slice, rank: int, seed: int) -> RowEdit:
    g = torch.Generator().manual_seed(seed)
    size = rows.stop - rows.start
    return RowEdit(rows, torch.randn(size, rank, generator=g), torch.randn(rank, base.shape[1], generator=g),
                   0.5, refill=lambda out: out.copy_(base[rows]))


def expected(base: torch.Tensor, edits: list[RowEdit]) -> torch.Tensor:
    w = base.clone()
    for e in edits:
        w[e.rows] += e.scale * (e.B @ e.A)
    return w


def assert_computes_with(linear: Linear, base: torch.Tensor, edits: list[RowEdit]) -> None:
    torch.testing.assert_close(linear.effective_weight(), expected(base, edits), atol=1e-5, rtol=1e-5)


# (out, in) and row ranges: whole 64-row blocks, ranges starting or ending inside a block, one range inside a
# single block, and a weight whose row count is no multiple of any block (the packed buffer is padded)
CASES = [
    ((192, 40), [slice(0, 64), slice(128, 192)]),
    ((256, 24), [slice(10, 150)]),
    ((256, 24), [slice(70, 90), slice(200, 256)]),
    ((100, 72), [slice(0, 100)]),
    ((100, 72), [slice(3, 97), slice(40, 41)]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,ranges", CASES)
def test_merge_computes_with_the_delta_and_restore_is_bit_exact(backend, shape, ranges):
    base = torch.randn(*shape)
    linear = Linear(base.clone(), None, resolve_backend(CPU, torch.float32, backend))
    x = torch.randn(5, shape[1])
    before = linear(x)
    edits = [edit(base, rows, rank=4, seed=i) for i, rows in enumerate(ranges)]

    linear.merge(edits)
    assert_computes_with(linear, base, edits)
    torch.testing.assert_close(linear(x), F.linear(x, expected(base, edits)), atol=1e-4, rtol=1e-4)

    linear.restore()
    assert torch.equal(linear.effective_weight(), base)
    assert torch.equal(linear(x), before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("restore_between", [False, True])
def test_a_second_merge_adds_on_top_or_after_a_restore_carries_nothing_of_the_first(backend, restore_between):
    base = torch.randn(256, 48)
    linear = Linear(base.clone(), None, resolve_backend(CPU, torch.float32, backend))
    first, second = edit(base, slice(0, 100), 2, seed=1), edit(base, slice(64, 256), 8, seed=2)
    linear.merge([first])
    if restore_between:
        linear.restore()
    linear.merge([second])
    assert_computes_with(linear, base, [second] if restore_between else [first, second])
    linear.restore()
    assert torch.equal(linear.effective_weight(), base)
    linear.restore()  # nothing merged: a no-op
    assert torch.equal(linear.effective_weight(), base)


@pytest.mark.parametrize("backend", PACKED_PAIRS)
def test_a_packed_kernel_is_never_repacked_and_keeps_no_row_major_copy(backend):
    base = torch.randn(192, 40)
    linear = Linear(base.clone(), None, resolve_backend(CPU, torch.float32, backend))
    loaded = linear.kernel
    assert linear.weight is None  # the base lives in its packed kernel only
    linear.merge([edit(base, slice(0, 64), 4, seed=0)])
    merged = linear.kernel
    linear.restore()
    assert linear.kernel is loaded and torch.equal(linear.effective_weight(), base)
    linear.merge([edit(base, slice(64, 128), 4, seed=1)])
    assert linear.kernel is merged  # the same two kernels, written in place, whatever is merged
