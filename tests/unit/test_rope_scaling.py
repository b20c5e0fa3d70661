"""Rope scalings against transformers' own definitions (`ROPE_INIT_FUNCTIONS`): the frequencies and the
attention factor each config gives, and LongRoPE's choice of factors by the length a model is served to."""

import math

import pytest
import torch
from transformers import LlamaConfig, Phi3Config, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from server.model.config import ModelConfig, ModelNotSupported
from server.model.llama import rope_attention_factor, rope_inv_freq

SHAPE = dict(vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2)
SHORT, LONG = [1.0 + i / 8 for i in range(16)], [1.0 + i for i in range(16)]


def phi3_longrope(**extra) -> Phi3Config:
    return Phi3Config(**SHAPE, max_position_embeddings=4096, original_max_position_embeddings=256,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT,
                                       "long_factor": LONG, **extra})


CONFIGS = {
    "yarn": lambda: Qwen2Config(**SHAPE, max_position_embeddings=4096, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 1024}),
    "yarn-untruncated-betas": lambda: Qwen2Config(**SHAPE, max_position_embeddings=4096, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": 512,
        "beta_fast": 16, "beta_slow": 2, "truncate": False}),
    "yarn-mscale": lambda: LlamaConfig(**SHAPE, max_position_embeddings=4096, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 1024,
        "mscale": 1.0, "mscale_all_dim": 0.5}),
    "yarn-factor-from-lengths": lambda: LlamaConfig(**SHAPE, max_position_embeddings=4096, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": None, "original_max_position_embeddings": 1024}),
    "longrope": phi3_longrope,
    "longrope-given-attention-factor": lambda: phi3_longrope(attention_factor=1.25),
    "dynamic": lambda: LlamaConfig(**SHAPE, max_position_embeddings=4096,
                                   rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
}


def ours(hf_config, served_to: int | None = None) -> tuple[torch.Tensor, float]:
    cfg = ModelConfig.from_hf(hf_config.to_dict())
    if served_to is not None:
        cfg = cfg.served_up_to(served_to)
    return rope_inv_freq(cfg), rope_attention_factor(cfg)


def theirs(hf_config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    return ROPE_INIT_FUNCTIONS[hf_config.rope_parameters["rope_type"]](hf_config, torch.device("cpu"), seq_len=seq_len)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_frequencies_and_attention_factor_equal_transformers_at_the_served_length(name):
    hf_config = CONFIGS[name]()
    inv_freq, factor = ours(hf_config)
    expected, expected_factor = theirs(hf_config, seq_len=hf_config.max_position_embeddings)
    torch.testing.assert_close(inv_freq, expected.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)
    if name.startswith("yarn"):
        assert factor > 1.0  # the case would not tell a dropped factor apart otherwise


def test_longrope_takes_its_short_factors_when_served_no_longer_than_its_original_length():
    hf_config = phi3_longrope()
    short, factor = ours(hf_config, served_to=256)
    expected, expected_factor = theirs(hf_config, seq_len=256)
    torch.testing.assert_close(short, expected.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor)
    assert factor == pytest.approx(math.sqrt(1 + math.log(16) / math.log(256)))  # 4096 / 256
    long, _ = ours(hf_config, served_to=257)
    torch.testing.assert_close(long, theirs(hf_config, seq_len=257)[0].float(), rtol=1e-6, atol=0)
    assert not torch.allclose(short, long)


def test_served_length_never_passes_the_model_own():
    cfg = ModelConfig.from_hf(LlamaConfig(**SHAPE, max_position_embeddings=512).to_dict())
    assert cfg.served_up_to(4096).max_position_embeddings == 512
    assert cfg.served_up_to(100).max_position_embeddings == 100


def test_longrope_with_the_wrong_number_of_factors_is_refused_by_name():
    hf = phi3_longrope().to_dict()
    hf["rope_parameters"]["long_factor"] = LONG[:-1]
    with pytest.raises(ModelNotSupported, match="longrope needs 16"):
        ModelConfig.from_hf(hf)
