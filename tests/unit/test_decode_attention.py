"""Decode attention through the KV cache: the native kernel must store the new keys and values where the
torch form does and return the same attention, for mixed sequence lengths, grouped-query heads and
contexts longer than one of its key chunks; shapes it does not take fall back to torch."""

import pytest
import torch

from server.engine.kv_cache import KVCache
from server.model.attention import attend
from server.kernels.attention import decode_attention_kernel
from server.model.config import ModelConfig
from server.model.context import build_step

KERNEL = decode_attention_kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="the kernel does not build here")


def config(heads: int, kv_heads: int, head_dim: int) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=32, hidden_size=heads * head_dim, intermediate_size=64,
                       num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5,
                       rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=True, attention_bias=False,
                       max_position_embeddings=512)


def filled_caches(cfg: ModelConfig, seqs: int, max_len: int):
    """Two caches holding the same random history, one for the kernel and one for the torch form."""
    g = torch.Generator().manual_seed(0)
    native, torch_only = (KVCache(cfg, seqs, max_len, torch.device("cpu"), torch.float32) for _ in range(2))
    for cache in (native, torch_only):
        g.manual_seed(0)
        cache.k.copy_(torch.randn(cache.k.shape, generator=g))
        cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return native, torch_only


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 16)])
@pytest.mark.parametrize("positions", [[0], [5, 0, 71, 64], [150, 3, 63, 200, 128]])
def test_native_decode_equals_the_torch_form(heads, kv_heads, head_dim, positions):
    cfg = config(heads, kv_heads, head_dim)
    native, torch_only = filled_caches(cfg, seqs=len(positions) + 1, max_len=256)
    g = torch.Generator().manual_seed(1)
    n = len(positions)
    q = torch.randn(n, heads, head_dim, generator=g)
    qkv = torch.randn(n, 2 * kv_heads * head_dim + 8, generator=g)  # k and v as strided views, as the model has
    k = qkv[:, : kv_heads * head_dim].view(n, kv_heads, head_dim)
    v = qkv[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(n, kv_heads, head_dim)
    ctx = build_step(positions, [], torch.device("cpu"))
    for layer in range(cfg.num_layers):
        got = attend(native, layer, q, k, v, ctx, native_decode=KERNEL)
        want = attend(torch_only, layer, q, k, v, ctx)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(native.k, torch_only.k) and torch.equal(native.v, torch_only.v)


def test_a_head_size_the_kernel_does_not_take_falls_back():
    cfg = config(2, 2, 12)  # 12 is no multiple of 8
    native, torch_only = filled_caches(cfg, seqs=2, max_len=32)
    q, k, v = torch.randn(2, 2, 12), torch.randn(2, 2, 12), torch.randn(2, 2, 12)
    ctx = build_step([3, 7], [], torch.device("cpu"))
    torch.testing.assert_close(attend(native, 0, q, k, v, ctx, native_decode=KERNEL), attend(torch_only, 0, q, k, v, ctx))
    assert torch.equal(native.k, torch_only.k)
