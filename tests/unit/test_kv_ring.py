"""A windowed layer's KV ring: sequences several rings long, fed as prompt chunks and decode rows (mixed in
one step, at different positions, moved between slots), attend exactly as over a cache that keeps every
position, and the ring's memory is what it saves."""

import dataclasses

import pytest
import torch

from server.engine.kv_cache import KVCache
from server.kernels.attention import decode_attention_kernel
from server.model.attention import attend
from server.model.config import ModelConfig
from server.model.context import PrefillChunk, build_step

CPU = torch.device("cpu")
MAX_LEN, MAX_CHUNK = 64, 4
# a window-5 layer (ring 8), a layer that sees every key, a window-3 layer (ring 6)
CFG = ModelConfig(model_type="mistral", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
                  tie_word_embeddings=True, attention_bias=False, max_position_embeddings=MAX_LEN,
                  layer_windows=(5, None, 3))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: a second OpenMP thread only spins against whatever else shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def caches(cfg: ModelConfig = CFG, seqs: int = 3, max_chunk: int = MAX_CHUNK) -> tuple[KVCache, KVCache]:
    return (KVCache(cfg, seqs, MAX_LEN, CPU, torch.float32, max_chunk=max_chunk),
            KVCache(cfg, seqs, MAX_LEN, CPU, torch.float32))


class Twins:
    """Feeds the same rows to a ring cache and a flat one, and holds their attention equal."""

    def __init__(self, scale=None, softcap=None):
        self.ring, self.flat = caches()
        self.g = torch.Generator().manual_seed(0)
        self.scale, self.softcap = scale, softcap

    def step(self, decode_positions: list[int], chunks: list[PrefillChunk]) -> None:
        ctx = build_step(decode_positions, chunks, CPU)
        rows = len(ctx.positions)
        q = torch.randn(rows, 4, 8, generator=self.g)
        k, v = torch.randn(rows, 2, 8, generator=self.g), torch.randn(rows, 2, 8, generator=self.g)
        for layer in range(CFG.num_layers):
            args = (q, k, v, ctx, CFG.window(layer), None, self.scale, self.softcap)
            got, want = attend(self.ring, layer, *args), attend(self.flat, layer, *args)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    def assert_ring_holds_the_last_positions(self, slot: int, written: int) -> None:
        for layer in range(CFG.num_layers):
            (rk, rv, ring), (fk, fv, _) = self.ring.layer(layer), self.flat.layer(layer)
            first = 0 if ring is None else max(0, written - ring)
            entries = torch.arange(first, written) % (ring or MAX_LEN)
            assert torch.equal(rk[slot, :, entries], fk[slot, :, first:written])
            assert torch.equal(rv[slot, :, entries], fv[slot, :, first:written])


@pytest.mark.parametrize("scale,softcap", [(None, None), (0.2, None), (None, 3.0)])
def test_a_ring_attends_as_every_position_through_chunks_decode_and_moves(scale, softcap):
    twins = Twins(scale, softcap)
    prompts, written = [6, 9, 13], [0, 0, 0]
    while written[-1] < prompts[-1]:  # shorter prompts in lower slots: each finished one decodes meanwhile
        decode = [written[s] for s in range(3) if written[s] >= prompts[s]]
        chunks = [PrefillChunk(s, written[s], min(MAX_CHUNK, prompts[s] - written[s]))
                  for s in range(len(decode), 3)]
        twins.step(decode, chunks)
        for s in range(len(decode)):
            written[s] += 1
        for chunk in chunks:
            written[chunk.slot] += chunk.length
    for _ in range(20):  # past several rings for every slot
        twins.step(written, [])
        written = [w + 1 for w in written]
    for slot in range(3):
        twins.assert_ring_holds_the_last_positions(slot, written[slot])
    for cache in (twins.ring, twins.flat):  # slot 0's sequence finished: the last one moves into its slot
        cache.move(2, 0, written[2] + 1)
        cache.scrub(2, written[2] + 1)
    twins.step([written[2], written[1]], [PrefillChunk(2, 0, 3)])  # a new prompt takes the freed slot
    written = [written[2] + 1, written[1] + 1, 3]
    for _ in range(8):  # the new sequence's ring not yet full beside full ones
        twins.step(written, [])
        written = [w + 1 for w in written]
    for slot in range(3):
        twins.assert_ring_holds_the_last_positions(slot, written[slot])


def test_scrub_zeroes_a_slots_whole_ring():
    ring, _ = caches()
    for layer in range(CFG.num_layers):
        k, v, _ = ring.layer(layer)
        k.fill_(1.0)
        v.fill_(1.0)
    ring.scrub(1, 30)
    for layer in range(CFG.num_layers):
        k, v, length = ring.layer(layer)
        assert not k[1, :, :30].any() and not v[1, :, :30].any()
        assert bool((k[0] == 1).all()) and (length is not None or bool((k[1, :, 30:] == 1).all()))


def test_a_chunk_longer_than_the_ring_was_sized_for_is_refused():
    ring, _ = caches()
    q, k, v = torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    attend(ring, 0, q, k, v, build_step([], [PrefillChunk(0, 0, 6)], CPU), window=5)  # within the ring: fine
    with pytest.raises(ValueError, match="KV ring"):
        attend(ring, 0, q, k, v, build_step([], [PrefillChunk(0, 6, 6)], CPU), window=5)


def test_layers_keep_a_ring_only_where_it_is_shorter_than_every_position():
    assert KVCache(CFG, 1, MAX_LEN, CPU, torch.float32, max_chunk=4).rings == (8, None, 6)
    assert KVCache(CFG, 1, MAX_LEN, CPU, torch.float32).rings == (None, None, None)
    assert KVCache(CFG, 1, 8, CPU, torch.float32, max_chunk=4).rings == (None, None, 6)
    flat = KVCache(CFG, 1, 8, CPU, torch.float32, max_chunk=8)
    assert flat.rings == (None, None, None) and flat.k.shape == (3, 1, 2, 8, 8)
    assert KVCache(CFG, 1, MAX_LEN, CPU, torch.float32, max_chunk=4).k is None  # no one tensor for native code


def test_a_gemma3_shaped_cache_is_smaller_by_its_local_layers_past_the_ring():
    # five local layers in six, window 1024, served to 32k positions with 512-token prompt chunks
    cfg = dataclasses.replace(CFG, num_layers=12, num_kv_heads=1, head_dim=4, max_position_embeddings=32768,
                              layer_windows=((1024,) * 5 + (None,)) * 2)
    kv = KVCache(cfg, 2, 32768, CPU, torch.float32, max_chunk=512)
    ring = 1024 + 512 - 1
    per_position = 2 * 2 * 1 * 4 * 4  # keys and values, 2 slots, 1 KV head, 4 dims, fp32
    assert kv.rings == ((ring,) * 5 + (None,)) * 2
    assert kv.flat_nbytes == 12 * 32768 * per_position
    assert kv.nbytes == kv.flat_nbytes - 10 * (32768 - ring) * per_position
    held = sum(t.numel() * t.element_size() for layer in range(12) for t in kv.layer(layer)[:2])
    assert held == kv.nbytes


@pytest.mark.skipif(decode_attention_kernel() is None, reason="the kernel does not build here")
def test_the_native_decode_kernel_serves_a_ring_layer_until_a_row_passes_its_window():
    cfg = dataclasses.replace(CFG, num_layers=1, head_dim=16, layer_windows=(40,))
    ring, flat = caches(cfg, seqs=2, max_chunk=8)
    assert ring.rings == (47,)
    g = torch.Generator().manual_seed(0)
    history = torch.randn(2, 2, 2, MAX_LEN, 16, generator=g)  # keys and values of every position
    for cache in (ring, flat):
        for tensor, held in zip(cache.layer(0)[:2], history):
            tensor.copy_(held[:, :, : tensor.shape[2]])
    q, k, v = torch.randn(2, 4, 16, generator=g), torch.randn(2, 2, 16, generator=g), torch.randn(2, 2, 16, generator=g)
    ctx = build_step([5, 30], [], CPU)
    got = attend(ring, 0, q, k, v, ctx, window=40, native_decode=decode_attention_kernel())
    torch.testing.assert_close(got, attend(flat, 0, q, k, v, ctx, window=40), atol=1e-5, rtol=1e-5)
    assert torch.equal(ring.layer(0)[0][:, :, :31], flat.layer(0)[0][:, :, :31])
