"""GGUF files of the families llama.cpp writes, served from their own blocks: tiny random-weight Llama, Qwen2,
Qwen3, Phi-3, Gemma 2 and Gemma 3 models written as llama.cpp's converter writes them (Llama's q/k rows
permuted, the others' not; Qwen2's biases, Qwen3's q/k norms, Phi-3's fused q/k/v and gate/up, Gemma's 1 + w
norms and the config keys it carries), converted by `--model FILE.gguf` and served with --quantization gguf,
against the same file dequantized (fp32) and against the model it was written from."""

import dataclasses

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config,
                          Qwen3Config)

from server.model.backend import resolve_backend
from server.model.config import ModelConfig
from server.engine.kv_cache import KVCache
from server.model.gguf_blocks import UnsupportedTensor
from server.model.loader import gguf_folder
from server.model.weights import LoadedModel
from tests.integration.server_process import ServerProcess
from tests.integration.test_reference_logits import prefill
from tests.integration.tiny_models import GGUF_VOCAB, write_gguf

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

CPU = torch.device("cpu")
VOCAB = GGUF_VOCAB  # the byte-level tokenizer the files carry
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)
GEMMA = {key: value for key, value in SHAPE.items() if key != "rope_theta"} | dict(
    head_dim=32, query_pre_attn_scalar=32, sliding_window=5)
FAMILIES = {
    "llama": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=True),
    # transformers reads a qwen3 file's head_dim as Qwen3's 128 (every Qwen3 has it): q is wider than the hidden
    "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=128, tie_word_embeddings=True),
    # q/k/v and gate/up fused in the file as in the checkpoint
    "phi3": lambda: Phi3Config(**SHAPE, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    # the file carries both caps (transformers' conversion drops them) and no query_pre_attn_scalar (llama.cpp
    # takes head_dim, transformers 256); layer 0 local over the last 5 keys, layer 1 global
    "gemma2": lambda: Gemma2Config(**GEMMA, attn_logit_softcapping=20.0, final_logit_softcapping=5.0),
    # six layers: llama.cpp makes every sixth global; that one is rotated with base 10^6 and linear scaling (the
    # file's rope.scaling, which transformers' conversion drops), the local ones with base 10^4
    "gemma3": lambda: Gemma3TextConfig(**GEMMA | {"num_hidden_layers": 6}, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}}),
}


def random_model(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    generator = torch.Generator().manual_seed(0)
    # every norm scales by about 1, Gemma's 1 + w too: at about 2 this tiny model's attention is sharp enough
    # that Q8_0's rounding grows several-fold layer on layer, and the source comparison would measure that
    center = 0.0 if config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():  # biases and norms drawn too: transformers' init would hide a dropped one
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(center + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    hf = random_model(FAMILIES[request.param]())
    path = write_gguf(hf, root / f"tiny-{request.param}.gguf", request.param)
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as patch:  # converted where a server given this cache finds it
        patch.setenv("LORAPLEX_CACHE_DIR", str(cache))
        folder = gguf_folder(path)
    return hf, path, folder, cache


def prompt_logits(model: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
    return prefill(model, tokens, 1, KVCache(model.config, 1, 32, CPU, torch.float32))[0]


def test_each_family_served_from_its_blocks_matches_the_file_dequantized_and_its_source(family):
    hf, path, folder, _ = family
    tokens = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(1))
    # the file read as the model it was written from (its eps rounded to the file's float32)
    source_config = ModelConfig.from_hf(hf.config.to_dict())
    served_config = ModelConfig.from_hf(folder.config)
    assert served_config == dataclasses.replace(source_config, rms_norm_eps=served_config.rms_norm_eps)
    served = LoadedModel(folder, resolve_backend(CPU, torch.float32, "auto", "gguf"), "gguf")
    dequantized = LoadedModel(folder, resolve_backend(CPU, torch.float32, "auto", "none"), "none")
    assert served.weight_format == "gguf Q8_0"
    blocks, fp32 = prompt_logits(served, tokens), prompt_logits(dequantized, tokens)
    with torch.no_grad():
        source = hf(tokens[None]).logits[0]
    scale = fp32.abs().max()
    # only the activations' rounding to 15-bit integers per block of 32 parts the two
    assert (blocks - fp32).abs().max() <= 1e-3 * scale
    assert (fp32 - source).abs().max() <= 0.05 * scale  # the file's Q8_0 rounding of the source model
    assert torch.equal(blocks.argmax(-1), fp32.argmax(-1))


@pytest.mark.parametrize("family", ["qwen2"], indirect=True)  # one server start: --quantization auto picks gguf
def test_a_server_started_on_a_gguf_file_serves_it_under_the_files_name(family, tmp_path):
    _, path, _, cache = family
    proc = ServerProcess(tmp_path / "store", "--model", str(path), env={"LORAPLEX_CACHE_DIR": str(cache)})
    proc.start()
    try:
        with proc.client() as c:
            health = c.get("/health").json()
            reply = c.post("/generate", json={"prompt": "Ahoy", "max_new_tokens": 4, "temperature": 0})
    finally:
        proc.stop()
    assert health["model"] == path.stem and health["weight_format"] == "gguf Q8_0"
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1


def test_a_gguf_of_an_architecture_not_served_from_blocks_is_refused_naming_it(tmp_path):
    from server.model.gguf_blocks import GGUFBlocks

    hf = random_model(LlamaConfig(**SHAPE))  # its tensors are never read: the header refuses the file
    path = write_gguf(hf, tmp_path / "tiny-minicpm.gguf", "minicpm")
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    with pytest.raises(UnsupportedTensor, match="architecture 'minicpm' is not served from its blocks"):
        GGUFBlocks(path, cfg)
