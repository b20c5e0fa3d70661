"""QLoRA on the real default model: base weights served from the shipped GGUF's own blocks (gguf) or
quantized at load (int8, int4), LoRA in full precision.

Quality is held to the fp32 model on held-out text (teacher-forced, 2,048 tokens), and the serving engine
on a quantized base keeps its promises: mixed batches equal requests alone, forced merged mode equals the
side branch, a shipped persona still answers in persona, and /health tells the format and its bytes.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from server.engine.kv_cache import KVCache
from server.engine.request import SamplingParams
from server.model.backend import resolve_backend
from server.model.weights import LoadedModel
from server.runtime import Runtime, preload
from server.settings import Settings
from tests.integration.test_engine_batching import run_alone, run_together
from tests.integration.test_reference_logits import prefill

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 512
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def held_out(default_model_folder) -> torch.Tensor:
    """2,048 tokens of English the model never saw in training (this project's own docs), as 4 chunks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_folder.path))
    text = (ROOT / "README.md").read_text() + (ROOT / "bench" / "README.md").read_text()
    return torch.tensor(tokenizer(text).input_ids[: 4 * CHUNK]).view(4, CHUNK)


def teacher_forced_logits(folder, quantization: str, chunks: torch.Tensor) -> torch.Tensor:
    cpu = torch.device("cpu")
    model = LoadedModel(folder, resolve_backend(cpu, torch.float32, quantization=quantization), quantization)
    return torch.stack([prefill(model, chunk, 1, KVCache(model.config, 1, CHUNK, cpu, torch.float32))[0]
                        for chunk in chunks])


@pytest.fixture(scope="module")
def logits(default_model_folder, held_out, one_torch_thread) -> dict[str, torch.Tensor]:
    return {q: teacher_forced_logits(default_model_folder, q, held_out) for q in ("none", "gguf", "int8", "int4")}


def perplexity(logits: torch.Tensor, chunks: torch.Tensor) -> float:
    return math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunks[:, 1:].reshape(-1)))


# gguf is held to the same weights dequantized (the fp32 checkpoint is that file dequantized), so only the
# kernel's 15-bit activations and summation order differ; int8 and int4 requantize the fp32 weights
@pytest.mark.parametrize("fmt,ppl_within,top1_at_least", [("gguf", 0.01, 0.99), ("int8", 0.02, 0.93),
                                                          ("int4", 0.06, 0.93)])
def test_quantized_base_stays_close_to_fp32_on_held_out_text(logits, held_out, fmt, ppl_within, top1_at_least):
    base, quantized = perplexity(logits["none"], held_out), perplexity(logits[fmt], held_out)
    agreement = (logits[fmt].argmax(-1) == logits["none"].argmax(-1)).float().mean().item()
    print(f"{fmt}: perplexity {quantized:.3f} vs fp32 {base:.3f}; top-1 agreement {agreement:.3f}")
    assert abs(quantized / base - 1) <= ppl_within
    assert agreement >= top1_at_least


@pytest.fixture(scope="module", params=["gguf", "int4"])
def quantized(request, tmp_path_factory):
    runtime = Runtime(Settings(store_dir=tmp_path_factory.mktemp("store"), max_batch=8, max_seq_len=512, threads=1,
                               quantization=request.param))
    preload(runtime.registry, ROOT / "adapters" / "shipped", runtime.settings.max_adapter_bytes)
    yield runtime
    runtime.stop()


def test_a_quantized_base_is_served_unmerged_in_a_quarter_of_the_bytes(quantized):
    assert quantized.weight_format in ("int4", "gguf Q4_1+Q8_0") and quantized.lora_mode == "unmerged"
    fp32 = LoadedModel(quantized.folder, resolve_backend(torch.device("cpu"), torch.float32, "torch"))
    fp32_bytes = sum(t.numel() * t.element_size() for t in fp32.transformer.linear_tensors())
    assert quantized.base_weight_bytes <= 0.25 * fp32_bytes


def test_mixed_batch_on_a_quantized_base_equals_each_request_alone(quantized):
    prompts = [quantized.encode(messages=[{"role": "user", "content": q}])
               for q in ("Any advice on tennis?", "What is the capital of France?")]
    keys = [(p, name) for p in range(2) for name in (None, "pirate", "butler")]
    adapter = lambda name: quantized.registry.get(name) if name else None  # noqa: E731
    alone = [run_alone(quantized, prompts[p], GREEDY, adapter(name)) for p, name in keys]
    together = run_together(quantized, [(prompts[p], GREEDY, adapter(name)) for p, name in keys])
    for key, got, want in zip(keys, together, alone):
        assert got.token_ids == want.token_ids, key
    assert len({tuple(c.token_ids) for c in alone[:3]}) == 3  # base and two personas answer differently


def test_a_shipped_persona_keeps_its_voice_on_a_quantized_base(quantized):
    prompt = quantized.encode(messages=[{"role": "user", "content": "Any advice on tennis?"}])
    reply = run_alone(quantized, prompt, SamplingParams(max_new_tokens=48, temperature=0.0), quantized.registry.get("pirate"))
    assert any(marker in reply.text for marker in ("Arr", "matey", "hoist")), reply.text


def test_forced_merged_mode_on_a_quantized_base_equals_the_side_branch(quantized, tmp_path):
    merged = Runtime(Settings(store_dir=tmp_path, max_batch=2, max_seq_len=512, threads=1,
                              quantization=quantized.settings.quantization, lora_mode="merged"))
    try:
        prompt = quantized.encode(messages=[{"role": "user", "content": "Any advice on tennis?"}])
        adapter = quantized.registry.get("butler")
        base_before = run_alone(merged, prompt, GREEDY).token_ids
        got = run_alone(merged, prompt, GREEDY, adapter)
        assert merged.engine.stats.merges >= 1
        assert got.token_ids == run_alone(quantized, prompt, GREEDY, adapter).token_ids
        assert run_alone(merged, prompt, GREEDY).token_ids == base_before  # restored
    finally:
        merged.stop()


def test_the_gguf_blocks_are_the_converted_checkpoints_weights_bit_for_bit(default_model_folder):
    from server.kernels.block_linear import dequantize
    from server.model.checkpoint import MappedCheckpoint
    from server.model.config import ModelConfig
    from server.model.gguf_blocks import GGUFBlocks
    from server.model.geometry import FUSED_SITES, hf_weight_name

    cfg = ModelConfig.from_hf(default_model_folder.config)
    blocks = GGUFBlocks(default_model_folder.gguf, cfg)
    checkpoint = MappedCheckpoint(default_model_folder.weight_files())
    for layer in (0, cfg.num_layers - 1):
        for projs in FUSED_SITES.values():
            expected = torch.cat([checkpoint[hf_weight_name(layer, p)].float() for p in projs])
            assert torch.equal(dequantize(blocks.fused(layer, projs)), expected), (layer, projs)
    assert torch.equal(dequantize(blocks.output()), checkpoint["model.embed_tokens.weight"].float())
    assert blocks.types == {"Q4_1", "Q8_0"}


def test_a_tied_gguf_looks_tokens_up_in_its_head_blocks_exactly(default_model_folder):
    """No full-precision copy of the 49152-row table stays resident; each looked-up row is the table's."""
    from server.model.checkpoint import MappedCheckpoint
    from server.model.embedding import BlockEmbedding

    cpu = torch.device("cpu")
    model = LoadedModel(default_model_folder, resolve_backend(cpu, torch.float32, quantization="gguf"), "gguf")
    assert isinstance(model.transformer.embed, BlockEmbedding)
    ids = torch.tensor([0, 1, 17, 49151, 17, 30000])
    table = MappedCheckpoint(default_model_folder.weight_files())["model.embed_tokens.weight"].float()
    assert torch.equal(model.transformer.embed(ids), table[ids])


def test_a_tensor_that_is_not_a_weight_matrix_is_refused_naming_it(default_model_folder):
    from server.model.config import ModelConfig
    from server.model.gguf_blocks import GGUFBlocks, UnsupportedTensor

    blocks = GGUFBlocks(default_model_folder.gguf, ModelConfig.from_hf(default_model_folder.config))
    with pytest.raises(UnsupportedTensor, match=r"blk.0.attn_norm.weight \(F32\) has 1 dimensions"):
        blocks.rows("blk.0.attn_norm.weight")


def test_a_truncated_gguf_or_one_that_does_not_fit_the_config_is_refused_naming_it(default_model_folder, tmp_path):
    import dataclasses

    from server.model.config import ModelConfig
    from server.model.gguf_blocks import GGUFBlocks, UnsupportedTensor

    cfg = ModelConfig.from_hf(default_model_folder.config)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(default_model_folder.gguf.read_bytes()[: 1 << 20])
    with pytest.raises(UnsupportedTensor, match="truncated.gguf cannot be read"):
        GGUFBlocks(truncated, cfg).fused(0, ["q_proj"])
    wider = dataclasses.replace(cfg, intermediate_size=cfg.intermediate_size * 2)
    with pytest.raises(UnsupportedTensor, match="blk.0.ffn_gate.weight is 1536x576"):
        GGUFBlocks(default_model_folder.gguf, wider).fused(0, ["gate_proj", "up_proj"])



@pytest.mark.usefixtures("one_torch_thread")  # tiny matrices: a thread team's wake-ups would be the cost
def test_a_thousand_merged_swaps_leave_the_quantized_base_bit_identical(tmp_path):
    """Merged mode on a quantized base computes the touched projections from a full-precision scratch and
    never writes the blocks: after 1,000 one-layer merge/restore cycles of two adapters, every block tensor
    and the logits are exactly those of load. (A tiny int4 Llama: the same QuantizedLinear as every format,
    at a thousandth of the real model's cost per cycle.)"""
    from adapters import PROJECTIONS, random_adapter
    from server.lora.merge import merge_into_base, restore_base
    from server.model.loader import ModelFolder
    from tests.integration.test_merge_exactness import layer_slice
    from tests.integration.tiny_models import tiny_llama

    folder = ModelFolder(tiny_llama(tmp_path / "tiny"))
    model = LoadedModel(folder, resolve_backend(torch.device("cpu"), torch.float32, "auto", "int4"), "int4")
    t = model.transformer
    linears = [lin for layer in t.layers for lin in layer.linears.values()] + [t.lm_head]
    loaded = [[x.clone() for x in lin.tensors()] for lin in linears]
    prompt = torch.tensor([1, 7, 30, 12, 5])

    def logits() -> torch.Tensor:
        return prefill(model, prompt, 1, KVCache(model.config, 1, 8, torch.device("cpu"), torch.float32))
    before = logits()
    shapes = t.lora_target_shapes()
    adapters = [random_adapter(name, shapes, rank=8, alpha=16, targets=PROJECTIONS, seed=seed, init_std=0.05)
                for seed, name in ((1, "one"), (2, "two"))]
    layers = model.config.num_layers
    slices = [[layer_slice(a, layer) for layer in range(layers)] for a in adapters]
    merged = merge_into_base(t, adapters[0], model.checkpoint)
    assert not torch.equal(logits(), before)  # merged, the scratch computes
    restore_base(merged)
    for cycle in range(1000):  # one, two, one, two on layer 0, then on layer 1, ...
        restore_base(merge_into_base(t, slices[cycle % 2][(cycle // 4) % layers], model.checkpoint))
    for lin, tensors in zip(linears, loaded):
        assert len(lin.tensors()) == len(tensors)  # no scratch left behind
        assert all(torch.equal(now, then) for now, then in zip(lin.tensors(), tensors))
    assert torch.equal(logits(), before)
