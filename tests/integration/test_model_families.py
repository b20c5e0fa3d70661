"""Every decoder family loraplex serves, against transformers, on tiny random-weight models built by
transformers itself (no download): logits of a prompt fed in two chunks and of decode steps after it, the
base and a PEFT adapter made with PEFT (unmerged in a batch beside a base row, and merged, then restored).

Every parameter is drawn at random, biases and norms included: transformers' own init zeroes biases and
sets norms to one, under which a dropped bias or a skipped norm goes unseen.
"""

from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config,
                          Qwen2Config, Qwen3Config)

from adapters import PROJECTIONS, read_peft_folder
from server.engine.kv_cache import KVCache
from server.lora.layers import BASE, LoraSlots
from server.lora.merge import merge_into_base, restore_base
from server.model.backend import linear_kinds, resolve_backend
from server.model.context import PrefillChunk, build_step
from server.model.geometry import site_layouts
from server.model.loader import ModelFolder
from server.model.weights import LoadedModel

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

CPU = torch.device("cpu")
TOL = 1e-4
PROMPT, FIRST_CHUNK, DECODE_STEPS = 12, 7, 4  # 16 tokens in all: past every sliding window below
SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
# Phi-3's 128k form: per-dimension factors, and the long ones here (the test's 16 tokens and the model's 64
# positions both pass the original 8); the attention factor multiplies cos and sin
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
            "long_factor": [1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 8.0, 12.0]}
FAMILIES = {
    "llama-tied": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=True),
    "llama-attention-bias-untied": lambda: LlamaConfig(**SHAPE, attention_bias=True, tie_word_embeddings=False),
    "llama3-rope-scaling": lambda: LlamaConfig(**SHAPE, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
    # dynamic NTK within max_position_embeddings: the default rope
    "llama-dynamic-rope": lambda: LlamaConfig(**SHAPE, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                        "rope_theta": 10000.0}),
    "mistral-sliding-window": lambda: MistralConfig(**SHAPE, sliding_window=5, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=True),
    # layer 0 attends to every key, layer 1 to the last 6
    "qwen2-sliding-layers": lambda: Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=6,
                                                max_window_layers=1, tie_word_embeddings=False),
    "qwen2-yarn": lambda: Qwen2Config(**SHAPE, rope_parameters=YARN_ROPE, tie_word_embeddings=False),
    # head_dim 32 with 4 heads: q is wider than the hidden state
    "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=32, tie_word_embeddings=True),
    # qkv_proj and gate_up_proj fused in the checkpoint; PEFT's adapter reaches o_proj and down_proj alone
    "phi3-sliding-window": lambda: Phi3Config(**SHAPE, sliding_window=6, pad_token_id=0, bos_token_id=1,
                                              eos_token_id=2, tie_word_embeddings=False),
    "phi3-longrope": lambda: Phi3Config(**SHAPE, original_max_position_embeddings=8, rope_parameters=LONGROPE,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    # layer 0 local (the last 5 keys), layer 1 global; raw attention scores reach about 40 and logits about 10,
    # so both caps bite; query_pre_attn_scalar 8 where head_dim is 32
    "gemma2": lambda: Gemma2Config(**SHAPE, head_dim=32, query_pre_attn_scalar=8, sliding_window=5,
                                   attn_logit_softcapping=20.0, final_logit_softcapping=5.0),
    # no caps; layer 0 local (the last 6 keys, rope base 10^4), layer 1 global (base 10^6, linear factor 4)
    "gemma3-text": lambda: Gemma3TextConfig(
        **SHAPE, head_dim=32, query_pre_attn_scalar=8, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}}),
    # query_pre_attn_scalar equal to head_dim, as in most Gemma 3 checkpoints: the global layer's decode rows
    # take the native decode-attention kernel where the backend has it
    "gemma3-text-head-dim-scale": lambda: Gemma3TextConfig(**SHAPE, head_dim=32, query_pre_attn_scalar=32,
                                                           sliding_window=6, sliding_window_pattern=2),
}


@dataclass
class Family:
    folder: ModelFolder
    hf: torch.nn.Module
    peft: torch.nn.Module
    adapter: object
    tokens: torch.Tensor  # prompt then the tokens fed to the decode steps


def randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> Family:
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(FAMILIES[request.param](), attn_implementation="eager").eval()
    randomize(hf, seed=0)
    hf.save_pretrained(folder / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJECTIONS), init_lora_weights=False)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(folder / "base", attn_implementation="eager"), lora)
    peft.save_pretrained(folder / "adapter")
    tokens = torch.randint(0, SHAPE["vocab_size"], (PROMPT + DECODE_STEPS,), generator=torch.Generator().manual_seed(1))
    return Family(ModelFolder(folder / "base"), hf, peft.eval(), read_peft_folder(folder / "adapter", "peft"), tokens)


@pytest.fixture(scope="module")
def reference(family) -> dict[str, torch.Tensor]:
    """Logits of every position of the whole sequence, from the base and from the base + PEFT."""
    with torch.no_grad():
        return {"base": family.hf(family.tokens[None]).logits[0],
                "peft": family.peft(family.tokens[None]).logits[0]}


@pytest.fixture(scope="module", params=linear_kinds(CPU, torch.float32))
def model(request, family) -> LoadedModel:
    return LoadedModel(family.folder, resolve_backend(CPU, torch.float32, request.param))


def run_sequences(model: LoadedModel, tokens: torch.Tensor, lora_rows: list[int] | None = None,
                  slots: LoraSlots | None = None) -> torch.Tensor:
    """Each KV slot i runs `tokens` (the prompt in two chunks, then one token per decode step), with the
    adapter slot lora_rows[i]; returns the logits of every position, [seqs, len(tokens), vocab]."""
    seqs = len(lora_rows) if lora_rows else 1
    kv = KVCache(model.config, seqs, 32, CPU, torch.float32, max_chunk=FIRST_CHUNK)  # windowed layers: rings
    out = [[] for _ in range(seqs)]
    for start, stop in ((0, FIRST_CHUNK), (FIRST_CHUNK, PROMPT)):
        length = stop - start
        ctx = build_step([], [PrefillChunk(s, start, length) for s in range(seqs)], CPU)
        ctx.logits_rows = torch.arange(seqs * length)
        if slots is not None:
            ctx.lora = slots.plan([r for r in lora_rows for _ in range(length)])
        logits = model.transformer.forward(tokens[start:stop].repeat(seqs), ctx, kv).view(seqs, length, -1)
        for s in range(seqs):
            out[s].append(logits[s])
    for position in range(PROMPT, PROMPT + DECODE_STEPS):
        ctx = build_step([position] * seqs, [], CPU)
        if slots is not None:
            ctx.lora = slots.plan(lora_rows)
        logits = model.transformer.forward(tokens[position : position + 1].repeat(seqs), ctx, kv)
        for s in range(seqs):
            out[s].append(logits[s : s + 1])
    return torch.stack([torch.cat(rows) for rows in out])


def test_windowed_layers_keep_a_ring_the_sequence_wraps(model):
    kv = KVCache(model.config, 1, 32, CPU, torch.float32, max_chunk=FIRST_CHUNK)
    windows = [model.config.window(layer) for layer in range(model.config.num_layers)]
    assert kv.rings == tuple(None if w is None else w + FIRST_CHUNK - 1 for w in windows)
    assert all(ring < PROMPT + DECODE_STEPS for ring in kv.rings if ring is not None)


def test_base_logits_match_transformers_on_prompt_and_decode(model, family, reference):
    torch.testing.assert_close(run_sequences(model, family.tokens)[0], reference["base"], atol=TOL, rtol=0)


def test_peft_adapter_unmerged_beside_a_base_row_matches_transformers_peft(model, family, reference):
    slots = LoraSlots(model.config.num_layers, site_layouts(model.config), 2, model.transformer.backend)
    slots.set_lora(0, family.adapter)
    base_row, adapter_row = run_sequences(model, family.tokens, [BASE, 0], slots)
    assert (reference["peft"] - reference["base"]).abs().max() > 0.1  # the adapter is not a no-op
    torch.testing.assert_close(base_row, reference["base"], atol=TOL, rtol=0)
    torch.testing.assert_close(adapter_row, reference["peft"], atol=TOL, rtol=0)


def test_peft_adapter_merged_matches_transformers_peft_and_restores_exactly(model, family, reference):
    before = run_sequences(model, family.tokens)
    merged = merge_into_base(model.transformer, family.adapter, model.checkpoint)
    try:
        torch.testing.assert_close(run_sequences(model, family.tokens)[0], reference["peft"], atol=TOL, rtol=0)
    finally:
        restore_base(merged)
    assert torch.equal(run_sequences(model, family.tokens), before)
