"""What an upload cannot do to the server: hang it with a regex, crash parsing with a config, poison outputs
with huge weights, or take more memory than the limits allow."""

import json
import logging
import time

import pytest
import torch
from safetensors.torch import save

from adapters import AdapterLimits, AdapterRegistry, AdapterStore, llama_base_shapes, peft_folder_files, random_adapter
from adapters.peft_config import parse_config
from server.errors import AdapterInvalid, AdapterTooLarge

BASE = llama_base_shapes(num_layers=2, hidden=16, intermediate=32, kv_dim=8)
# Exponential backtracking for Python's re on a module path such as "model.layers.0.self_attn.q_proj":
# each character more doubles the time, past a minute at that path's length.
CATASTROPHIC = r"(?:.|.)*\d\d"


def registry(root, **limits) -> AdapterRegistry:
    return AdapterRegistry(AdapterStore(root), BASE, AdapterLimits(**limits))


def q_proj_weights(dtype=torch.float32, a_value=None, layers=(0,)) -> dict[str, torch.Tensor]:
    tensors = {}
    for layer in layers:
        key = f"model.layers.{layer}.self_attn.q_proj"
        A = torch.randn(4, 16) * 0.1 if a_value is None else torch.full((4, 16), a_value)
        tensors[f"{key}.lora_A.weight"] = A.to(dtype)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(16, 4) * 0.01).to(dtype)
    return tensors


def peft_files(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]} | config
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": save(tensors)}


def upload(tmp_path, config: dict, tensors=None, **limits):
    return registry(tmp_path, **limits).register_upload("up", peft_files(config, tensors or q_proj_weights()))


# ---- regexes in adapter_config.json

@pytest.mark.parametrize("config", [
    {"rank_pattern": {CATASTROPHIC: 2}},
    {"alpha_pattern": {"layers.1.self_attn.q_proj": 16, CATASTROPHIC: 2}},
    {"target_modules": CATASTROPHIC},
])
def test_catastrophic_regex_is_refused_in_bounded_time(tmp_path, config):
    start = time.monotonic()
    with pytest.raises(AdapterInvalid, match="took too long.*use simpler patterns"):
        upload(tmp_path, config)
    assert time.monotonic() - start < 20


def test_regex_that_expands_when_compiled_is_refused(tmp_path):
    with pytest.raises(AdapterInvalid, match="counted repeats written out"):
        upload(tmp_path, {"rank_pattern": {"(?:q{300}){300}": 2}})


def test_ordinary_patterns_still_apply(tmp_path):
    config = {"target_modules": r".*\.q_proj", "alpha_pattern": {r"layers\.\d{1,2}\.self_attn\.q_proj": 2}}
    adapter = upload(tmp_path, config)
    assert adapter.weights["layers.0.q_proj"].scale == 2 / 4


def test_regex_syntax_is_python_re_as_in_peft():
    with pytest.raises(AdapterInvalid, match="invalid regex"):
        parse_config(json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {r"\p{L}+": 2}}).encode())


# ---- parsing adapter_config.json

@pytest.mark.parametrize("raw, reason", [
    (b'{"r": ' + b"9" * 5000 + b', "lora_alpha": 8}', "number with too many digits"),
    (b"[" * 30000 + b"]" * 30000, "nests arrays or objects too deeply"),
    (b'{"r": 4, "lora_alpha": 8}' + b" " * 65536, "the limit is 65536"),
    (b'{"r": ' + b"9" * 4000 + b', "lora_alpha": 8}', "r must be a positive integer up to 65536"),
    (b'{"r": 4, "lora_alpha": ' + b"9" * 4000 + b"}", "lora_alpha must be a finite number"),
])
def test_hostile_config_is_invalid_not_a_crash(raw, reason):
    with pytest.raises(AdapterInvalid, match=reason) as err:
        parse_config(raw)
    assert len(str(err.value)) < 300


# ---- tensor keys

@pytest.mark.parametrize("digit", ["\u0660", "\uff10", "\u09e6"])  # Arabic-Indic, fullwidth and Bengali zero
def test_tensor_keys_take_only_ascii_digits(tmp_path, digit):
    tensors = {k.replace("layers.0.", f"layers.1{digit}."): v for k, v in q_proj_weights().items()}
    with pytest.raises(AdapterInvalid, match="unsupported tensor"):
        upload(tmp_path, {}, tensors)


# ---- magnitudes

def test_huge_alpha_is_refused_naming_the_module(tmp_path):
    with pytest.raises(AdapterInvalid, match=r"layers.0.q_proj: scale 2.5e\+299.*limit is 1000"):
        upload(tmp_path, {"lora_alpha": 1e300})


def test_huge_finite_weights_are_refused_naming_the_module(tmp_path):
    raw = {"w.safetensors": save(q_proj_weights(a_value=1e30, layers=(0, 1)))}
    with pytest.raises(AdapterInvalid, match="layers.0.q_proj: .*could change a weight by up to"):
        registry(tmp_path).register_upload("big", raw, rank=4, alpha=8.0)


def test_huge_scale_is_refused_even_with_zero_lora_b(tmp_path):
    tensors = q_proj_weights()
    tensors["model.layers.0.self_attn.q_proj.lora_B.weight"].zero_()
    with pytest.raises(AdapterInvalid, match="layers.0.q_proj: scale .* beyond the limit"):
        upload(tmp_path, {"lora_alpha": 1e300}, tensors)


def test_trained_size_weights_pass(tmp_path):
    assert upload(tmp_path, {"lora_alpha": 32}).weights["layers.0.q_proj"].scale == 8


# ---- memory: counted as held (as stored; fp8 as bfloat16)

def test_fp8_weights_are_held_exactly_in_bfloat16_and_count_twice_their_stored_size(tmp_path):
    tensors = q_proj_weights(dtype=torch.float8_e4m3fn)
    raw = {"w.safetensors": save(tensors)}
    held = 2 * 2 * 4 * 16
    adapter = registry(tmp_path / "a", max_bytes=held).register_upload("fp8", raw, rank=4, alpha=8.0)
    assert (adapter.size_bytes, adapter.held_bytes) == (held // 2, held)
    A = adapter.weights["layers.0.q_proj"].A
    assert A.dtype == torch.bfloat16
    assert torch.equal(A.float(), tensors[next(k for k in tensors if "lora_A" in k)].float())
    with pytest.raises(AdapterTooLarge, match=f"holds {held} bytes .* limit is {held - 1}"):
        registry(tmp_path / "b", max_bytes=held - 1).register_upload("fp8", raw, rank=4, alpha=8.0)


def test_total_memory_is_capped_and_freed_by_remove(tmp_path):
    one = random_adapter("one", BASE, rank=4).held_bytes
    reg = registry(tmp_path, max_total_bytes=2 * one)
    reg.register_upload("a", peft_folder_files(random_adapter("a", BASE, rank=4, seed=1)))
    reg.register_upload("b", peft_folder_files(random_adapter("b", BASE, rank=4, seed=2)))
    with pytest.raises(AdapterTooLarge, match=f"max_total_bytes={2 * one}"):
        reg.register_upload("c", peft_folder_files(random_adapter("c", BASE, rank=4, seed=3)))
    with pytest.raises(AdapterTooLarge, match="max_total_bytes"):
        reg.add(random_adapter("c", BASE, rank=4, seed=3), persist=False)
    assert reg.store.names() == ["a", "b"]
    reg.remove("a")
    reg.register_upload("c", peft_folder_files(random_adapter("c", BASE, rank=4, seed=3)))


def test_replace_counts_only_the_difference(tmp_path):
    small, large = (random_adapter("x", BASE, rank=r) for r in (2, 4))
    reg = registry(tmp_path, max_total_bytes=small.held_bytes + large.held_bytes)
    reg.register_upload("a", peft_folder_files(small))
    reg.register_upload("b", peft_folder_files(large))
    reg.register_upload("b", peft_folder_files(random_adapter("b", BASE, rank=4, seed=9)), replace=True)
    with pytest.raises(AdapterTooLarge, match="max_total_bytes"):
        reg.register_upload("a", peft_folder_files(large), replace=True)
    assert reg.get("a").rank == 2


def test_start_up_skips_stored_adapters_that_do_not_fit(tmp_path, caplog):
    first = registry(tmp_path)
    for name in ("a", "b", "c"):
        first.register_upload(name, peft_folder_files(random_adapter(name, BASE, rank=4)))
    one = first.get("a").held_bytes
    with caplog.at_level(logging.WARNING, logger="adapters.registry"):
        assert registry(tmp_path, max_total_bytes=2 * one).load_stored() == ["a", "b"]
    assert "'c' not loaded" in caplog.text and "max_total_bytes" in caplog.text
    assert AdapterStore(tmp_path).names() == ["a", "b", "c"]  # kept, not quarantined


def test_a_cluster_replica_counts_its_pinned_adapters_and_held_copies(tmp_path):
    from server.cluster.shared_registry import SharedStoreRegistry

    one = random_adapter("one", BASE, rank=4).held_bytes
    reg = SharedStoreRegistry(AdapterStore(tmp_path), BASE, AdapterLimits(max_total_bytes=2 * one))
    reg.add(random_adapter("pinned", BASE, rank=4, seed=1), persist=False)
    reg.register_upload("stored", peft_folder_files(random_adapter("stored", BASE, rank=4, seed=2)))
    reg.hold("stored")
    with pytest.raises(AdapterTooLarge, match="max_total_bytes"):
        reg.add(random_adapter("another", BASE, rank=4, seed=3), persist=False)
