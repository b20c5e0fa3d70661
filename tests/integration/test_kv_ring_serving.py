"""Windowed models served through the scheduler with KV rings: prompts in chunks, prefix-cache hits loaded
into a ring, slots moved as requests finish, sequences several rings long; every logit as a cache that keeps
every position gives it."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig

from server.engine.kv_cache import KVCache
from server.engine.prefix_cache import PrefixCache
from server.engine.request import SamplingParams, Sequence
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.lora.layers import LoraSlots
from server.lora.manager import AdapterSlots
from server.model.backend import resolve_backend
from server.model.context import PrefillChunk, build_step
from server.model.geometry import site_layouts
from server.model.loader import ModelFolder
from server.model.weights import LoadedModel

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

CPU = torch.device("cpu")
CHUNK, MAX_LEN, BLOCK = 3, 64, 4
SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=MAX_LEN, rms_norm_eps=1e-5)
FAMILIES = {  # window 4: rings of 4 + 3 - 1 = 6 positions
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=4),  # every layer a ring
    "gemma3-text": lambda: Gemma3TextConfig(**SHAPE, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                                            layer_types=["sliding_attention", "full_attention"]),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request, tmp_path_factory) -> LoadedModel:
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(FAMILIES[request.param]())
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(0.15 * torch.randn(p.shape))
    hf.save_pretrained(folder)
    return LoadedModel(ModelFolder(folder), resolve_backend(CPU, torch.float32))


def serve(model: LoadedModel, kv: KVCache) -> tuple[dict[int, list[torch.Tensor]], int]:
    """Runs the requests below as the engine steps them, each fed a fixed script of output tokens (so both
    caches see the same tokens); returns every request's next-token logits in order, and the prefix-cache
    hits."""
    g = torch.Generator().manual_seed(2)
    a, d = torch.randint(0, 96, (11,), generator=g).tolist(), torch.randint(0, 96, (14,), generator=g).tolist()
    scripts = torch.randint(0, 96, (5, 16), generator=g).tolist()
    requests = {0: [(a, 9), (torch.randint(0, 96, (7,), generator=g).tolist(), 4), (d, 6)],
                8: [(a[:8] + [1, 2, 3], 5)],  # shares A's first two blocks: a hit of 8, loaded at once
                # once D has finished: D and the start of its reply, whose block the ring had overwritten by
                # then (D's own prompt blocks serve it)
                60: [(d + scripts[2][:2], 12)]}
    lora = LoraSlots(model.config.num_layers, site_layouts(model.config), 1, model.transformer.backend)
    prefix = PrefixCache(kv, BLOCK, 1 << 20)
    scheduler = Scheduler(kv, AdapterSlots(lora), CHUNK, True, prefix)
    runner = ModelRunner(model.transformer, kv, lora)
    seqs, logits_of, limits = [], {}, {}
    for step in range(200):
        assert step < 60 or seqs[2].finished
        for prompt, new in requests.get(step, []):
            seq = Sequence(prompt, SamplingParams(max_new_tokens=new, temperature=0))
            seqs.append(seq)
            logits_of[seq.id], limits[seq.id] = [], new
            scheduler.add(seq)
        if not scheduler.has_work():
            if step > max(requests):
                break
            continue
        decode, prefill = scheduler.schedule()
        logits = runner.run(decode, prefill, use_lora=False)
        scheduler.prefilled(prefill)
        for seq, row in zip(decode + prefill, logits):
            if not seq.prompt_done:
                continue
            logits_of[seq.id].append(row)
            seq.output_ids.append(scripts[seqs.index(seq)][len(seq.output_ids)])
            if len(seq.output_ids) == limits[seq.id]:
                scheduler.finish(seq, "length")
    assert all(seq.finished for seq in seqs) and len(seqs) == 5
    return {i: logits_of[seq.id] for i, seq in enumerate(seqs)}, prefix.hit_tokens


def test_a_ring_serves_chunks_hits_and_moves_as_every_position(model):
    ring = KVCache(model.config, 3, MAX_LEN, CPU, torch.float32, max_chunk=CHUNK)
    windows = [model.config.window(layer) for layer in range(model.config.num_layers)]
    assert ring.rings == tuple(None if w is None else 6 for w in windows)
    got, ring_hits = serve(model, ring)
    want, _ = serve(model, KVCache(model.config, 3, MAX_LEN, CPU, torch.float32))
    assert ring_hits == 8 + 14
    for i in want:
        assert len(got[i]) == len(want[i])
        torch.testing.assert_close(torch.stack(got[i]), torch.stack(want[i]), atol=1e-5, rtol=1e-5)


def test_the_native_decoder_stack_steps_aside_for_a_ring_cache(model):
    stack = model.transformer.native_stack
    if stack is None:
        pytest.skip("the native decoder stack does not take this model here")
    ctx = build_step([], [PrefillChunk(0, 0, 3)], CPU)  # 3 keys: within the window, where it serves a flat cache
    cos, sin = model.transformer.rope_tables(ctx.positions)
    h = model.transformer.embed(torch.arange(3))
    assert stack.run(h.clone(), ctx, cos, sin, KVCache(model.config, 1, MAX_LEN, CPU, torch.float32))
    assert not stack.run(h.clone(), ctx, cos, sin, KVCache(model.config, 1, MAX_LEN, CPU, torch.float32, CHUNK))
