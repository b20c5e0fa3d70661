import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save, save_file

from adapters import (
    AdapterLimits, LoraWeights, in_float32, llama_base_shapes, random_adapter, read_peft_folder, read_raw_safetensors,
    validate, validate_name, write_peft_folder,
)
from server.errors import AdapterInvalid, AdapterTooLarge

BASE = llama_base_shapes(num_layers=2, hidden=16, intermediate=32, kv_dim=8)
LIMITS = AdapterLimits()
PREFIX = "base_model.model.model.layers"


def peft_folder(tmp_path, config: dict | bytes, tensors: dict):
    raw = config if isinstance(config, bytes) else json.dumps(config).encode()
    (tmp_path / "adapter_config.json").write_bytes(raw)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    return tmp_path


def q_proj_tensors(r=4, layer=0, dtype=torch.float32, infix=""):
    key = f"{PREFIX}.{layer}.self_attn.q_proj"
    return {
        f"{key}.lora_A{infix}.weight": torch.randn(r, 16).to(dtype),
        f"{key}.lora_B{infix}.weight": torch.randn(16, r).to(dtype),
    }


def config(**overrides):
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]} | overrides


def with_module(adapter, key, **changes):
    weights = dict(adapter.weights)
    weights[key] = dataclasses.replace(weights[key], **changes)
    return dataclasses.replace(adapter, weights=weights)


def test_peft_round_trip_keeps_tensors_and_scale(tmp_path):
    adapter = random_adapter("demo", BASE, rank=4, alpha=8.0, targets=("q_proj", "down_proj"))
    write_peft_folder(adapter, tmp_path)
    back = read_peft_folder(tmp_path, "demo")
    validate(back, BASE, LIMITS)
    assert back.weights.keys() == adapter.weights.keys()
    for key, w in adapter.weights.items():
        assert torch.equal(back.weights[key].A, w.A) and torch.equal(back.weights[key].B, w.B)
        assert back.weights[key].scale == 2.0
    assert (back.rank, back.alpha, back.target_modules) == (4, 8.0, ("down_proj", "q_proj"))
    assert back.size_bytes == adapter.size_bytes
    assert back.layer_indices == (0, 1)


def test_round_trip_keeps_per_module_rank_and_scale(tmp_path):
    adapter = random_adapter("mixed", BASE, rank=4, alpha=8.0)
    small = LoraWeights(torch.randn(2, 16), torch.randn(8, 2), scale=3.0)
    adapter = dataclasses.replace(adapter, weights=adapter.weights | {"layers.1.v_proj": small})
    write_peft_folder(adapter, tmp_path)
    back = read_peft_folder(tmp_path, "mixed")
    assert back.weights["layers.1.v_proj"].rank == 2
    assert back.weights["layers.1.v_proj"].scale == pytest.approx(3.0)
    assert back.weights["layers.0.v_proj"].scale == 2.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_held_as_stored_and_widened_to_compute(tmp_path, dtype):
    tensors = q_proj_tensors(dtype=dtype, infix=".default")
    adapter = read_peft_folder(peft_folder(tmp_path, config(), tensors), "half")
    assert adapter.weights["layers.0.q_proj"].A.dtype == dtype
    assert adapter.size_bytes == adapter.held_bytes == 2 * (4 * 16 + 16 * 4)
    validate(adapter, BASE, LIMITS)
    wide = in_float32(adapter).weights["layers.0.q_proj"]
    assert wide.A.dtype == torch.float32
    assert torch.equal(wide.A, tensors[f"{PREFIX}.0.self_attn.q_proj.lora_A.default.weight"].float())
    assert in_float32(wide_adapter := in_float32(adapter)) is wide_adapter, "float32 weights are not copied"


def test_raw_safetensors_takes_rank_and_alpha(tmp_path):
    tensors = {k.removeprefix("base_model.model."): v for k, v in q_proj_tensors(r=4).items()}
    save_file(tensors, tmp_path / "raw.safetensors")
    adapter = read_raw_safetensors(tmp_path / "raw.safetensors", "raw", rank=4, alpha=16.0)
    assert adapter.weights["layers.0.q_proj"].scale == 4.0
    assert torch.equal(adapter.weights["layers.0.q_proj"].A, tensors["model.layers.0.self_attn.q_proj.lora_A.weight"])
    with pytest.raises(AdapterInvalid, match="r=4"):
        read_raw_safetensors(tmp_path / "raw.safetensors", "raw", rank=8, alpha=16.0)


def test_rank_and_alpha_patterns_apply_per_module(tmp_path):
    tensors = q_proj_tensors(r=2, layer=0) | q_proj_tensors(r=4, layer=1)
    cfg = config(rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 32})
    adapter = read_peft_folder(peft_folder(tmp_path, cfg, tensors), "patterns")
    assert adapter.weights["layers.0.q_proj"].scale == 8 / 2
    assert adapter.weights["layers.1.q_proj"].scale == 32 / 4
    assert adapter.rank == 4


def test_rslora_scales_by_sqrt_rank(tmp_path):
    adapter = read_peft_folder(peft_folder(tmp_path, config(use_rslora=True), q_proj_tensors()), "rs")
    assert adapter.weights["layers.0.q_proj"].scale == 8 / math.sqrt(4)


@pytest.mark.parametrize("raw_config, reason", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps(config(peft_type="PREFIX_TUNING")).encode(), "peft_type"),
    (json.dumps(config(fan_in_fan_out=True)).encode(), "fan_in_fan_out"),
    (json.dumps(config(use_dora=True)).encode(), "DoRA"),
    (json.dumps(config(r="4")).encode(), "r must be a positive integer"),
    (json.dumps(config(lora_alpha=None)).encode(), "lora_alpha"),
    (json.dumps(config(target_modules=[1])).encode(), "target_modules"),
    (json.dumps(config(rank_pattern=[])).encode(), "rank_pattern"),
])
def test_bad_config_is_invalid(tmp_path, raw_config, reason):
    with pytest.raises(AdapterInvalid, match=reason):
        read_peft_folder(peft_folder(tmp_path, raw_config, q_proj_tensors()), "bad")


def test_lora_a_without_b_is_invalid(tmp_path):
    tensors = {k: v for k, v in q_proj_tensors().items() if "lora_A" in k}
    with pytest.raises(AdapterInvalid, match="layers.0.q_proj: has lora_A but no lora_B"):
        read_peft_folder(peft_folder(tmp_path, config(), tensors), "half-pair")


def test_weights_outside_target_modules_are_invalid(tmp_path):
    with pytest.raises(AdapterInvalid, match="not in target_modules"):
        read_peft_folder(peft_folder(tmp_path, config(target_modules=["v_proj"]), q_proj_tensors()), "untargeted")


@pytest.mark.parametrize("key", [
    "base_model.model.model.embed_tokens.lora_embedding_A",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
    "base_model.model.lm_head.modules_to_save.default.weight",
    "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight",
])
def test_unsupported_keys_are_named(tmp_path, key):
    tensors = q_proj_tensors() | {key: torch.zeros(4, 16)}
    with pytest.raises(AdapterInvalid, match="unsupported tensor") as err:
        read_peft_folder(peft_folder(tmp_path, config(), tensors), "extra")
    assert key in str(err.value)


def test_truncated_or_missing_safetensors_is_invalid(tmp_path):
    data = save(q_proj_tensors())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config()))
    (tmp_path / "adapter_model.safetensors").write_bytes(data[: len(data) - 7])
    with pytest.raises(AdapterInvalid, match="not a valid safetensors"):
        read_peft_folder(tmp_path, "truncated")
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterInvalid, match="missing adapter_model.safetensors"):
        read_peft_folder(tmp_path, "missing")


def test_integer_tensors_are_invalid(tmp_path):
    tensors = {k: v.to(torch.int32) for k, v in q_proj_tensors().items()}
    with pytest.raises(AdapterInvalid, match="dtype"):
        read_peft_folder(peft_folder(tmp_path, config(), tensors), "ints")


def test_wrong_shape_names_module_and_shapes():
    adapter = random_adapter("a", BASE, rank=4)
    bad = with_module(adapter, "layers.1.v_proj", B=torch.zeros(16, 4))
    with pytest.raises(AdapterInvalid, match=r"layers.1.v_proj: lora_B has shape \[16, 4\], expected \[8, 4\]"):
        validate(bad, BASE, LIMITS)
    bad = with_module(adapter, "layers.0.q_proj", A=torch.zeros(4, 17))
    with pytest.raises(AdapterInvalid, match=r"lora_A has shape \[4, 17\], expected \[4, 16\]"):
        validate(bad, BASE, LIMITS)
    bad = with_module(adapter, "layers.0.q_proj", B=torch.zeros(16, 3))
    with pytest.raises(AdapterInvalid, match="lora_A has r=4 but lora_B has r=3"):
        validate(bad, BASE, LIMITS)


def test_unknown_module_and_layer_out_of_range():
    adapter = random_adapter("a", BASE, rank=4)
    weights = adapter.weights["layers.0.q_proj"]
    out_of_range = dataclasses.replace(adapter, weights={"layers.7.q_proj": weights})
    with pytest.raises(AdapterInvalid, match=r"layer 7 is out of range; the base model has layers 0..1"):
        validate(out_of_range, BASE, LIMITS)
    unknown = dataclasses.replace(adapter, weights={"layers.0.lm_head": weights})
    with pytest.raises(AdapterInvalid, match="no such module"):
        validate(unknown, BASE, LIMITS)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_are_invalid(value):
    adapter = random_adapter("a", BASE, rank=4)
    A = adapter.weights["layers.0.v_proj"].A.clone()
    A[1, 2] = value
    with pytest.raises(AdapterInvalid, match="layers.0.v_proj: lora_A contains NaN or inf"):
        validate(with_module(adapter, "layers.0.v_proj", A=A), BASE, LIMITS)


def test_rank_and_size_limits():
    adapter = random_adapter("a", BASE, rank=8)
    with pytest.raises(AdapterTooLarge, match="rank 8 exceeds"):
        validate(adapter, BASE, AdapterLimits(max_rank=4))
    with pytest.raises(AdapterTooLarge, match="bytes"):
        validate(adapter, BASE, AdapterLimits(max_bytes=adapter.held_bytes - 1))
    validate(adapter, BASE, AdapterLimits(max_rank=8, max_bytes=adapter.held_bytes))


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", ".hidden", "a..b", "x" * 65, "a b", "-x"])
def test_bad_names_are_invalid(name):
    with pytest.raises(AdapterInvalid, match="invalid adapter name"):
        validate_name(name)


@pytest.mark.parametrize("name", ["a", "sql-expert", "Pirate_v2.1", "x" * 64])
def test_good_names_pass(name):
    assert validate_name(name) == name


def test_random_adapter_b_zero_is_step_zero_state():
    adapter = random_adapter("zero", BASE, rank=2, b_zero=True, targets=("k_proj",))
    assert adapter.target_modules == ("k_proj",)
    assert all(torch.count_nonzero(w.B) == 0 for w in adapter.weights.values())
    assert all(torch.count_nonzero(w.A) > 0 for w in adapter.weights.values())
    assert torch.equal(random_adapter("s", BASE, seed=3).weights["layers.0.q_proj"].A,
                       random_adapter("t", BASE, seed=3).weights["layers.0.q_proj"].A)
