"""The decoder layer's fused small steps (server.kernels.pointwise) against the torch forms they replace, at a
decode step's few rows and a prompt chunk's many (which the kernel splits over threads), on the strided
views the layer hands them; and the layer's own helpers fall back to torch for what the kernel does not take."""

import pytest
import torch
import torch.nn.functional as F

from server.kernels.pointwise import pointwise_kernels
from server.model import llama

kernels = pointwise_kernels()
needs_kernel = pytest.mark.skipif(kernels is None, reason="no AVX2 CPU or C compiler here")


def torch_rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_tables(rows: int, d: int, generator):
    angles = torch.rand(rows, 1, d // 2, generator=generator) * 100
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_rms_norm_matches_torch_on_a_strided_view(rows):
    g = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, 600, generator=g) * 3
    x, weight = wide[:, 8:584], torch.randn(576, generator=g)  # rows 600 floats apart
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), torch_rms_norm(x, weight, 1e-5),
                               atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_rope_rotates_q_and_k_heads_of_the_fused_projection_in_place(rows):
    g = torch.Generator().manual_seed(rows)
    heads, kv_heads, d = 9, 3, 64
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g)
    before = qkv.clone()
    qk = qkv[:, : (heads + kv_heads) * d].view(rows, heads + kv_heads, d)
    cos, sin = rope_tables(rows, d, g)
    assert kernels.rope_(qk, cos, sin)
    expected = llama.apply_rope(before[:, : (heads + kv_heads) * d].view(rows, heads + kv_heads, d), cos, sin)
    torch.testing.assert_close(qk, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], before[:, (heads + kv_heads) * d :])  # v untouched


@needs_kernel
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_silu_mul_matches_torch_including_large_magnitudes(rows):
    g = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1536, generator=g) * 4
    gate_up[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 200.0])  # past the exp's clamp on both sides
    gate, up = gate_up.chunk(2, dim=-1)
    got = kernels.silu_mul(gate_up)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, F.silu(gate) * up, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_shapes_the_kernel_does_not_take_are_declined():
    assert kernels.rms_norm(torch.randn(4, 20), torch.randn(20), 1e-5) is None  # not a multiple of 8
    assert kernels.rms_norm(torch.randn(4, 32), torch.randn(16), 1e-5) is None  # weight too short
    bf16 = torch.randn(4, 16, dtype=torch.bfloat16)
    assert kernels.rms_norm(bf16, torch.randn(16, dtype=torch.bfloat16), 1e-5) is None
    assert kernels.silu_mul(torch.randn(4, 20)) is None
    x = torch.randn(2, 3, 24)
    assert not kernels.rope_(x, torch.ones(2, 1, 24), torch.zeros(2, 1, 24))  # half of 24 is not a multiple of 8


@pytest.mark.parametrize("fused", [True, False])
def test_the_layer_helpers_agree_with_and_without_the_kernel(fused):
    if fused and kernels is None:
        pytest.skip("no kernel here")
    given = kernels if fused else None
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(5, 64, generator=g), torch.randn(64, generator=g)
    torch.testing.assert_close(llama.rms_norm(x, weight, 1e-6, given), torch_rms_norm(x, weight, 1e-6),
                               atol=1e-5, rtol=1e-5)
    gate_up = torch.randn(5, 32, generator=g)
    torch.testing.assert_close(llama.silu_mul(gate_up, given), F.silu(gate_up[:, :16]) * gate_up[:, 16:])
    heads = torch.randn(5, 4, 32, generator=g)
    cos, sin = rope_tables(5, 32, g)
    torch.testing.assert_close(llama.rotate(heads.clone(), cos, sin, given), llama.apply_rope(heads, cos, sin),
                               atol=1e-5, rtol=1e-5)
    bf16 = x.bfloat16()  # never the kernel's: the torch form in float32, cast back as transformers does
    assert llama.rms_norm(bf16, weight.bfloat16(), 1e-6, given).dtype == torch.bfloat16
