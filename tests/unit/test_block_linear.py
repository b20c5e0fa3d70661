"""Quantized block weights: the kernel against its reference (dequantize + F.linear), the quantizers' error
bounds, and a quantized projection's hot-swap leaving the quantized base untouched."""

import pytest
import torch
import torch.nn.functional as F

from server.kernels.block_linear import (
    BLOCK, block_kernel, block_kernel_variants, dequantize, dequantize_rows, from_blocks, linear_reference,
    quantize_int4, quantize_int8,
)
from server.model.linear import RowEdit
from server.model.quantized_linear import QuantizedLinear, quantize

KERNEL = block_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the block kernel needs AVX2/FMA and a C compiler")


def weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


@needs_kernel
@pytest.mark.parametrize("tile", ["avx2", "avx512-vnni"])
@pytest.mark.parametrize("quantizer", [quantize_int4, quantize_int8])
@pytest.mark.parametrize("out,inp", [(16, 32), (40, 96), (577, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 8, 9, 13, 64])
def test_kernel_matches_dequantize_then_linear(tile, quantizer, out, inp, rows):
    kernel = block_kernel_variants().get(tile)
    if kernel is None:
        pytest.skip(f"this CPU has no {tile} tile")
    w = quantizer(weight(out, inp))
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows))
    got, want = kernel(x, w), linear_reference(x, w)
    assert got.shape == (rows, out)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@needs_kernel
def test_kernel_takes_strided_rows_and_a_bias():
    w = quantize_int4(weight(48, 64))
    x = torch.randn(6, 128)[:, :64]  # a view with row stride 128
    bias = torch.randn(48)
    torch.testing.assert_close(KERNEL(x, w, bias), linear_reference(x, w) + bias, atol=2e-5, rtol=1e-5)


HALF_ULP = 2.0**-11  # relative rounding of the float16 the scales and offsets are stored in


def test_int4_rounds_each_weight_to_its_blocks_grid():
    w = weight(64, 128)
    error = (dequantize(quantize_int4(w)) - w).abs().view(64, -1, BLOCK)
    low, high = w.view(64, -1, BLOCK).amin(-1), w.view(64, -1, BLOCK).amax(-1)
    step = (high - low) / 15
    bound = step / 2 + 16 * HALF_ULP * (high.abs() + low.abs())
    assert bool((error <= bound[..., None]).all())


def test_int8_rounds_each_weight_to_its_rows_scale():
    w = weight(64, 128)
    error = (dequantize(quantize_int8(w)) - w).abs()
    scale = w.abs().amax(1) / 127
    assert bool((error <= scale[:, None] * (0.5 + 128 * HALF_ULP)).all())


def test_blocks_given_as_scale_offset_and_nibbles_dequantize_exactly():
    # GGUF's Q4_1 keeps w = d * q + m per 32 inputs: given as they are, dequantizing adds no error
    out, blocks = 20, 3
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (out, blocks, BLOCK), generator=g, dtype=torch.uint8)
    d, m = torch.rand(out, blocks, generator=g).half(), torch.randn(out, blocks, generator=g).half()  # as GGUF's
    w = from_blocks(4, (out, blocks * BLOCK), q, d, m)
    expected = (q.float() * d.float()[..., None] + m.float()[..., None]).view(out, -1)
    assert torch.equal(dequantize(w), expected)


@pytest.mark.parametrize("quantizer", [quantize_int4, quantize_int8])
def test_rows_dequantized_alone_equal_those_of_the_whole_weight(quantizer):
    w = quantizer(weight(50, 96))  # 50 rows: the last panel is padded
    rows = torch.tensor([0, 49, 17, 17, 3, 16])
    assert torch.equal(dequantize_rows(w, rows), dequantize(w)[rows])


def test_a_weight_whose_inputs_are_not_whole_blocks_is_refused():
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_int4(weight(16, 40))


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_thousand_swaps_leave_the_quantized_base_bit_identical(fmt):
    linear = QuantizedLinear(quantize(weight(48, 64), fmt), None, fmt, KERNEL)
    before = [t.clone() for t in linear.quantized.tensors()]
    x = torch.randn(3, 64)
    base_out = linear(x)
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(16, 4, generator=g), torch.randn(4, 64, generator=g)
    edit = RowEdit(slice(16, 32), B, A, 0.5, refill=lambda out: None)
    for _ in range(1000):
        linear.merge([edit])
        linear.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, linear.quantized.tensors()))
    assert torch.equal(linear(x), base_out)
    linear.merge([edit])
    merged = dequantize(linear.quantized)
    merged[16:32] += 0.5 * B @ A
    torch.testing.assert_close(linear(x), F.linear(x, merged), atol=1e-5, rtol=1e-5)
