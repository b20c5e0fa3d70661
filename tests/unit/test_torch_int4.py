"""Torch's int4 weight-only kernel over our blocks (server.kernels.torch_int4): the op's rule, w = (q - 8) * scale
+ zero with scales and zeros as [in/32, rows, 2], read from its CPU twin; our Q4_1 blocks converted to it equal
dequantize + F.linear (exactly but for float sums in fp32, within the bf16 rounding of scale and zero in bf16);
a QuantizedLinear over it keeps its interface. The CUDA tests repeat the conversion on the device."""

import pytest
import torch
import torch.nn.functional as F

from server.kernels.block_linear import BLOCK, dequantize, quantize_int4, quantize_int8
from server.kernels.torch_int4 import MIDPOINT, TorchInt4Kernel, torch_int4_kernel, unpack_int4
from server.model.backend import Backend, resolve_backend
from server.model.linear import RowEdit
from server.model.quantized_linear import QuantizedLinear

CPU = torch.device("cpu")
BF16_ULP = 2.0**-8  # bfloat16's relative rounding (8 significant bits)
SHAPES = [(16, 32), (24, 64), (40, 96), (577, 1536)]  # out not a multiple of 16; 1, 2, 3 and 48 blocks a row
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """Rows with an offset of their own, so each block's m is far from -7.5 d (Q4_1's offsets matter)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05 + torch.randn(out, 1, generator=g) * 0.1


def held_in_bf16(w) -> torch.Tensor:
    """dequantize(w) as the op multiplies it in bfloat16: scale d and zero m + 8d each rounded to bf16."""
    q, d, m = unpack_int4(w)
    scale, zero = d.bfloat16().float(), (m + MIDPOINT * d).bfloat16().float()
    rows = (q.float() - MIDPOINT).view(len(q), -1, BLOCK) * scale[..., None] + zero[..., None]
    return rows.view(len(q), -1)[: w.out_features]


def test_the_ops_rule_is_q_minus_8_times_scale_plus_zero():
    """Read from the CPU twin on one group of 16 rows, not assumed: row r holds q = r everywhere."""
    q = torch.arange(16, dtype=torch.int32)[:, None].expand(16, BLOCK).contiguous()
    scale, zero = torch.full((1, 16), 0.5), torch.full((1, 16), 3.0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(BLOCK)[:1], packed, BLOCK,
                                                   torch.stack([scale, zero], dim=-1))
    assert torch.equal(y[0], (torch.arange(16.0) - 8) * 0.5 + 3.0)


def test_unpacked_blocks_are_the_weight_dequantize_reads():
    w = quantize_int4(weight(40, 96))
    q, d, m = unpack_int4(w)
    assert q.shape == (48, 96) and int(q.min()) >= 0 and int(q.max()) <= 15  # rows padded to whole panels
    rows = q.float().view(48, 3, BLOCK) * d[..., None] + m[..., None]
    assert torch.equal(rows.view(48, 96)[:40], dequantize(w))
    assert not rows[40:].any()


@pytest.mark.parametrize("out,inp", SHAPES)
def test_in_fp32_the_twin_equals_dequantize_then_linear(out, inp):
    w = quantize_int4(weight(out, inp))
    kernel = TorchInt4Kernel(CPU, torch.float32)
    x = torch.randn(7, inp, generator=torch.Generator().manual_seed(1))
    got = kernel(x, kernel.pack(w))
    assert got.shape == (7, out) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, dequantize(w)), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("out,inp", SHAPES)
def test_in_bf16_the_twin_is_within_bf16_rounding_of_dequantize(out, inp):
    w = quantize_int4(weight(out, inp))
    q, d, m = unpack_int4(w)
    held = held_in_bf16(w)
    bound = BF16_ULP * (MIDPOINT * d.abs() + (m + MIDPOINT * d).abs()).repeat_interleave(BLOCK, 1)[:out]
    assert bool(((held - dequantize(w)).abs() <= bound * 1.0001 + 1e-9).all())
    kernel = TorchInt4Kernel(CPU, torch.bfloat16)
    x = torch.randn(7, inp, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = kernel(x, kernel.pack(w))
    assert got.dtype == torch.bfloat16
    want = F.linear(x.float(), held)  # the output rounded once to bf16, sums in fp32
    torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=BF16_ULP)


def test_8_bit_blocks_are_dequantized_once_into_the_activations_dtype():
    w = quantize_int8(weight(40, 96))
    kernel = TorchInt4Kernel(CPU, torch.bfloat16)
    packed = kernel.pack(w)
    assert packed.scales_and_zeros is None and torch.equal(packed.weight, dequantize(w).bfloat16())
    x = torch.randn(3, 96).bfloat16()
    assert torch.equal(kernel(x, packed), F.linear(x, dequantize(w).bfloat16()))


def test_a_quantized_linear_over_the_twin_keeps_its_interface():
    """Bias, output dtype, leading dimensions, no native operand; merge computes from an fp32 scratch and
    restore puts back exactly what was served."""
    w = quantize_int4(weight(40, 96))
    bias = torch.randn(40).bfloat16()
    linear = QuantizedLinear(w, bias, "int4", TorchInt4Kernel(CPU, torch.bfloat16))
    x = torch.randn(2, 3, 96).bfloat16()
    y = linear(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x.float(), held_in_bf16(w)) + bias.float(), atol=2e-2, rtol=2e-2)
    assert linear(x[:0]).shape == (0, 3, 40)
    assert linear.native_operand() is None and linear.panels() is None
    before = [t.clone() for t in linear.tensors()]
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(16, 4, generator=g), torch.randn(4, 96, generator=g)
    linear.merge([RowEdit(slice(16, 32), B, A, 0.5, refill=lambda out: None)])
    merged = dequantize(w)
    merged[16:32] += 0.5 * B @ A
    torch.testing.assert_close(linear.effective_weight(), merged, atol=1e-6, rtol=1e-6)
    got = linear(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(x.float(), merged) + bias.float(), atol=2e-2, rtol=1e-2)
    linear.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, linear.tensors())) and len(linear.tensors()) == len(before)
    assert torch.equal(linear(x), y)
    assert torch.equal(linear.effective_weight(), dequantize(w))


def test_the_backend_names_the_kernel_a_quantized_base_runs_through():
    assert isinstance(torch_int4_kernel(CPU, torch.float32), TorchInt4Kernel)  # the twin passes the self-check
    assert Backend(CPU, torch.bfloat16, block=TorchInt4Kernel(CPU, torch.bfloat16)).describe("int4").startswith(
        "linear: torch int4 kernel")
    assert Backend(CPU, torch.bfloat16).describe("int4").startswith("linear: reference")
    cuda = torch.device("cuda")  # named only: no quantization, no kernel asked for
    assert resolve_backend(cuda, torch.bfloat16).block is None


def test_cuda_serves_int4_and_refuses_the_formats_it_has_no_kernel_for(tmp_path):
    from server.model.loader import ModelFolder
    from server.runtime import resolve_quantization

    cuda, folder = torch.device("cuda"), ModelFolder(tmp_path)
    assert resolve_quantization("int4", cuda, folder) == "int4"
    assert resolve_quantization("auto", cuda, folder) == "none"
    for fmt in ("int8", "gguf"):
        with pytest.raises(ValueError, match=f"--quantization {fmt} does not run on cuda"):
            resolve_quantization(fmt, cuda, folder)
    assert all(resolve_quantization(fmt, CPU, folder) == fmt for fmt in ("int4", "int8", "gguf"))


@needs_cuda
@pytest.mark.parametrize("out,inp", SHAPES)
def test_on_cuda_the_kernel_is_within_bf16_rounding_of_dequantize(out, inp):
    cuda = torch.device("cuda")
    kernel = torch_int4_kernel(cuda, torch.bfloat16)
    assert kernel is not None, "torch's int4 kernel failed its self-check on this GPU (see the log)"
    w = quantize_int4(weight(out, inp).to(cuda))  # quantized and converted on the device
    packed = kernel.pack(w)
    assert packed.weight.is_cuda and packed.scales_and_zeros.dtype == torch.bfloat16
    x = torch.randn(7, inp, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = kernel(x.to(cuda), packed)
    assert got.dtype == torch.bfloat16 and got.shape == (7, out)
    want = F.linear(x.float(), held_in_bf16(w).cpu())
    torch.testing.assert_close(got.float().cpu(), want, atol=1e-3, rtol=2 * BF16_ULP)
