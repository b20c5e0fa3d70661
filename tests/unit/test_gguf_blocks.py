"""GGUF tensors read as the block kernel's weights: Q4_K in its own 4-bit blocks (its scales rounded to fp16),
other types gguf reads requantized to 8-bit blocks, and a fused site whose parts differ in bits widened exactly.
Each checked against gguf's own dequantization of the same bytes."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from server.kernels.block_linear import BLOCK, dequantize, from_blocks
from server.model.config import ModelConfig
from server.model.backend import torch_backend
from server.model.gguf_blocks import GGUFBlocks, UnsupportedTensor
from server.model.weights import FromGGUF

HIDDEN, HEADS, KV_HEADS = 256, 4, 2
CFG = ModelConfig(model_type="llama", vocab_size=32, hidden_size=HIDDEN, intermediate_size=512, num_layers=1,
                  num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HIDDEN // HEADS, rms_norm_eps=1e-5,
                  rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=True, attention_bias=False,
                  max_position_embeddings=64)


def k_quant_bytes(rng: np.random.Generator, rows: int, inputs: int, kind: GGMLQuantizationType) -> np.ndarray:
    """Random super-blocks of a K-quant whose fp16 scales are finite and small (the rest of a block's bytes may
    be anything)."""
    block_inputs, block_bytes = {GGMLQuantizationType.Q4_K: (256, 144), GGMLQuantizationType.Q6_K: (256, 210)}[kind]
    data = rng.integers(0, 256, size=(rows, inputs // block_inputs, block_bytes), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-3, size=(rows, inputs // block_inputs, 2)).astype(np.float16).view(np.uint8)
    if kind == GGMLQuantizationType.Q4_K:
        data[..., 0:4] = scales  # d, dmin
    else:
        data[..., 208:210] = scales[..., 0:2]  # d comes last
    return data.reshape(rows, -1)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    tensors = {
        "blk.0.attn_q.weight": (k_quant_bytes(rng, HIDDEN, HIDDEN, GGMLQuantizationType.Q4_K), GGMLQuantizationType.Q4_K),
        "blk.0.attn_k.weight": (k_quant_bytes(rng, HIDDEN // 2, HIDDEN, GGMLQuantizationType.Q4_K),
                                GGMLQuantizationType.Q4_K),
        "blk.0.attn_v.weight": (k_quant_bytes(rng, HIDDEN // 2, HIDDEN, GGMLQuantizationType.Q6_K),
                                GGMLQuantizationType.Q6_K),
        "blk.0.ffn_up.weight": (rng.standard_normal((512, HIDDEN)).astype(np.float16), GGMLQuantizationType.F16),
        "blk.0.ffn_gate.weight": (gguf_quantize(rng.standard_normal((512, HIDDEN)).astype(np.float32),
                                                GGMLQuantizationType.Q5_0), GGMLQuantizationType.Q5_0),
        "token_embd.weight": (gguf_quantize(rng.standard_normal((CFG.vocab_size, HIDDEN)).astype(np.float32),
                                            GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1),
        "output.weight": (gguf_quantize(rng.standard_normal((CFG.vocab_size, HIDDEN)).astype(np.float32),
                                        GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0),
    }
    path = tmp_path_factory.mktemp("gguf") / "blocks.gguf"
    writer = GGUFWriter(str(path), "llama")
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, tensors


def reference(tensors, name: str) -> torch.Tensor:
    data, kind = tensors[name]
    return torch.from_numpy(gguf_dequantize(data, kind)).float()


def as_weight(bits, q, d, m) -> torch.Tensor:
    return dequantize(from_blocks(bits, (q.shape[0], q.shape[1] * BLOCK), q, d, m))


def test_q4_k_is_served_in_4_bit_blocks_equal_to_ggufs_dequantization_but_for_fp16_scales(gguf_file):
    path, tensors = gguf_file
    blocks = GGUFBlocks(path, CFG)
    bits, q, d, m = blocks.rows("blk.0.attn_k.weight")
    want = reference(tensors, "blk.0.attn_k.weight")
    assert bits == 4 and q.dtype == torch.uint8 and int(q.max()) <= 15
    # exact before the kernel's fp16 rounding of each block's d * sc and dmin * mn
    assert torch.allclose(q.float() * d[..., None] + m[..., None], want.view_as(q), rtol=0, atol=1e-6)
    rounding = (15 * d.abs() + m.abs())[..., None] * 2**-11  # fp16's half step on d and on m
    assert ((as_weight(bits, q, d, m).view_as(q) - want.view_as(q)).abs() <= rounding * 1.01).all()
    assert blocks.types == {"Q4_K"} and not blocks.requantized


@pytest.mark.parametrize("name", ["blk.0.attn_v.weight", "blk.0.ffn_up.weight", "blk.0.ffn_gate.weight"])
def test_other_types_are_requantized_to_8_bit_blocks_within_half_a_step(gguf_file, name):
    path, tensors = gguf_file
    blocks = GGUFBlocks(path, CFG)
    bits, q, d, m = blocks.rows(name)
    want = reference(tensors, name).view_as(q)
    step = want.abs().amax(-1, keepdim=True) / 127
    assert bits == 8 and q.dtype == torch.int8 and not m.any()
    assert ((as_weight(bits, q, d, m).view_as(q) - want).abs() <= step * 0.51).all()
    assert blocks.requantized == {tensors[name][1].name} and not blocks.types


def test_a_fused_site_mixing_4_and_8_bit_parts_is_widened_to_8_bits_exactly(gguf_file):
    path, _ = gguf_file
    blocks = GGUFBlocks(path, CFG)
    fused = blocks.fused(0, ["q_proj", "k_proj", "v_proj"])
    parts = [as_weight(*blocks.projection(0, proj)) for proj in ("q_proj", "k_proj", "v_proj")]
    assert fused.bits == 8
    assert torch.equal(dequantize(fused), torch.cat(parts))


def test_a_type_gguf_cannot_read_is_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((HIDDEN, 40), dtype=np.uint8),
                      raw_dtype=GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedTensor, match="blk.0.attn_q.weight is Q8_1"):
        GGUFBlocks(path, CFG).rows("blk.0.attn_q.weight")


def test_an_untied_files_tokens_are_looked_up_in_its_own_embedding_blocks_never_the_fp32_table(gguf_file):
    path, tensors = gguf_file
    weights = FromGGUF(GGUFBlocks(path, CFG), torch_backend())
    assert not weights.blocks.tied

    def table():
        raise AssertionError("the fp32 table was read")

    embedding = weights.embedding(table, weights.head(table))
    ids = torch.tensor([0, 5, 31, 5])
    assert torch.equal(embedding(ids), reference(tensors, "token_embd.weight")[ids])


@pytest.mark.parametrize("model_type, served", [("llama", "gguf"), ("qwen2", "gguf"), ("phi3", "gguf"),
                                                ("gemma2", "gguf"), ("gemma3_text", "gguf"), ("stablelm", "none")])
def test_auto_serves_a_converted_folder_from_its_blocks_only_for_the_architectures_read_here(
        tmp_path, model_type, served):
    import json

    from server.kernels.block_linear import block_kernel
    from server.model.loader import ModelFolder
    from server.runtime import resolve_quantization

    if block_kernel() is None:
        pytest.skip("the block kernel does not run here: auto is none for every folder")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    folder = ModelFolder(tmp_path, gguf=tmp_path / "never-read.gguf")  # the header is not parsed again
    assert resolve_quantization("auto", torch.device("cpu"), folder) == served
    assert resolve_quantization("auto", torch.device("cpu"), ModelFolder(tmp_path)) == "none"
