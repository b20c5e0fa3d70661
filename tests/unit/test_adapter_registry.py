import logging
import threading

import pytest
import torch
from safetensors.torch import save

from adapters import (
    AdapterLimits, AdapterRegistry, AdapterStore, llama_base_shapes, peft_folder_files, random_adapter,
)
from server.errors import AdapterExists, AdapterInvalid, AdapterNotFound, AdapterTooLarge

BASE = llama_base_shapes(num_layers=2, hidden=16, intermediate=32, kv_dim=8)


def registry(root, **limits) -> AdapterRegistry:
    return AdapterRegistry(AdapterStore(root), BASE, AdapterLimits(**limits))


def peft_upload(name="sql", rank=4, seed=0) -> dict[str, bytes]:
    return peft_folder_files(random_adapter(name, BASE, rank=rank, seed=seed))


def raw_upload(dtype=torch.float16) -> dict[str, bytes]:
    tensors = {}
    for layer in range(2):
        key = f"model.layers.{layer}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(4, 16).to(dtype)
        tensors[f"{key}.lora_B.weight"] = torch.randn(16, 4).to(dtype)
    return {"my_lora.safetensors": save(tensors)}


def test_upload_get_list_remove(tmp_path):
    reg = registry(tmp_path)
    adapter = reg.register_upload("sql", peft_upload())
    assert reg.get("sql") is adapter and "sql" in reg and len(reg) == 1
    reg.register_upload("pirate", peft_upload("pirate", seed=1))
    assert [a.name for a in reg.list()] == ["pirate", "sql"]
    assert reg.store.names() == ["pirate", "sql"]
    assert reg.remove("sql") is adapter
    with pytest.raises(AdapterNotFound):
        reg.get("sql")
    with pytest.raises(AdapterNotFound):
        reg.remove("sql")
    assert reg.store.names() == ["pirate"]


def test_restart_reloads_stored_adapters(tmp_path):
    first = registry(tmp_path)
    uploaded = first.register_upload("sql", peft_upload())
    first.register_upload("raw", raw_upload(), rank=4, alpha=8.0)
    second = registry(tmp_path)
    assert second.load_stored() == ["raw", "sql"]
    reloaded = second.get("sql").weights["layers.1.v_proj"]
    assert torch.equal(reloaded.A, uploaded.weights["layers.1.v_proj"].A)
    raw = second.get("raw")
    assert raw.weights["layers.0.q_proj"].scale == 2.0
    assert raw.size_bytes == first.get("raw").size_bytes  # stored as float16, not widened


def test_raw_upload_needs_rank_and_alpha(tmp_path):
    reg = registry(tmp_path)
    with pytest.raises(AdapterInvalid, match="rank and alpha"):
        reg.register_upload("raw", raw_upload())
    assert reg.store.names() == []


def test_duplicate_upload_is_refused(tmp_path):
    reg = registry(tmp_path)
    reg.register_upload("sql", peft_upload())
    with pytest.raises(AdapterExists):
        reg.register_upload("sql", peft_upload(seed=5))


def test_invalid_upload_stores_nothing(tmp_path):
    reg = registry(tmp_path)
    wrong_base = llama_base_shapes(num_layers=2, hidden=24, intermediate=32, kv_dim=8)
    files = peft_folder_files(random_adapter("wide", wrong_base))
    with pytest.raises(AdapterInvalid, match="expected"):
        reg.register_upload("wide", files)
    files = peft_upload() | {"adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}"}
    with pytest.raises(AdapterInvalid):
        reg.register_upload("corrupt", files)
    with pytest.raises(AdapterTooLarge):
        registry(tmp_path, max_rank=2).register_upload("big", peft_upload())
    assert len(reg) == 0 and reg.store.names() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("file_name", ["adapter_model.bin", "model.pt", "x.pth", "state.pkl", "last.ckpt"])
def test_pickle_files_are_refused(tmp_path, file_name):
    with pytest.raises(AdapterInvalid, match="pickle-based files are not accepted; use safetensors"):
        registry(tmp_path).register_upload("p", {file_name: b"\x80\x04"}, rank=4, alpha=8.0)


@pytest.mark.parametrize("file_name", ["../adapter_model.safetensors", "a/b.safetensors", "..", "c\\d.safetensors"])
def test_file_names_with_paths_are_refused(tmp_path, file_name):
    with pytest.raises(AdapterInvalid, match="plain name"):
        registry(tmp_path).register_upload("p", {file_name: b""}, rank=4, alpha=8.0)


@pytest.mark.parametrize("name", ["../x", "a/b", ".."])
def test_adapter_names_with_paths_are_refused(tmp_path, name):
    with pytest.raises(AdapterInvalid, match="invalid adapter name"):
        registry(tmp_path / "store").register_upload(name, peft_upload())
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_unexpected_file_sets_are_refused(tmp_path):
    reg = registry(tmp_path)
    with pytest.raises(AdapterInvalid, match="unexpected files"):
        reg.register_upload("x", {"adapter_config.json": b"{}"})
    with pytest.raises(AdapterInvalid, match="unexpected files"):
        reg.register_upload("x", peft_upload() | {"convert.py": b"import os"})


def test_a_folder_as_saved_keeps_its_card_and_drops_other_text(tmp_path):
    saved = peft_upload() | {"README.md": "# SQL\n\u00e9".encode(), "tokenizer.json": b"{}", "notes.txt": b"x"}
    assert registry(tmp_path).register_upload("sql", saved).card == "# SQL\n\u00e9"
    assert sorted(p.name for p in (tmp_path / "sql").iterdir()) == sorted([*peft_upload(), "README.md"])
    reloaded = registry(tmp_path)
    reloaded.load_stored()
    assert reloaded.get("sql").card == "# SQL\n\u00e9"


def test_a_card_too_large_or_not_utf8_or_a_pickle_beside_it_is_refused(tmp_path):
    reg = registry(tmp_path)
    with pytest.raises(AdapterTooLarge, match="README.md"):
        reg.register_upload("x", peft_upload() | {"README.md": b"a" * (64 * 1024 + 1)})
    with pytest.raises(AdapterInvalid, match="UTF-8"):
        reg.register_upload("x", peft_upload() | {"README.md": b"\xff\xfe"})
    with pytest.raises(AdapterInvalid, match="pickle"):
        reg.register_upload("x", peft_upload() | {"README.md": b"hi", "training_args.bin": b"x"})
    assert len(reg) == 0


def test_corrupt_stored_adapter_is_quarantined(tmp_path, caplog):
    first = registry(tmp_path)
    first.register_upload("good", peft_upload("good"))
    first.register_upload("bad", peft_upload("bad"))
    weights = tmp_path / "bad" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="adapters.registry"):
        assert registry(tmp_path).load_stored() == ["good"]
    assert "bad" in caplog.text and ".quarantine" in caplog.text
    assert (tmp_path / ".quarantine" / "bad" / "adapter_model.safetensors").exists()
    assert AdapterStore(tmp_path).names() == ["good"]


def test_registry_full(tmp_path):
    reg = registry(tmp_path, max_adapters=1)
    reg.add(random_adapter("one", BASE))
    with pytest.raises(AdapterTooLarge, match="registry full"):
        reg.add(random_adapter("two", BASE))
    with pytest.raises(AdapterTooLarge, match="registry full"):
        reg.register_upload("two", peft_upload("two"))
    assert reg.store.names() == ["one"]


def test_unpersisted_adapter_lives_only_in_memory(tmp_path):
    reg = registry(tmp_path)
    reg.add(random_adapter("demo", BASE), persist=False)
    assert "demo" in reg and reg.store.names() == []
    reg.remove("demo")
    assert len(reg) == 0


def test_concurrent_uploads_of_one_name_register_once(tmp_path):
    reg = registry(tmp_path)
    files = peft_upload()
    errors = []

    def upload():
        try:
            reg.register_upload("sql", files)
        except AdapterExists as e:
            errors.append(e)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 3 and reg.store.names() == ["sql"]


def test_replace_swaps_version_and_survives_restart(tmp_path):
    reg = registry(tmp_path)
    old = reg.register_upload("sql", peft_upload(seed=0))
    new = reg.register_upload("sql", peft_upload(rank=2, seed=1), replace=True)
    assert reg.get("sql") is new and new.rank == 2 and len(reg) == 1
    assert old.rank == 4  # a request holding the old object keeps serving it
    reloaded = registry(tmp_path)
    reloaded.load_stored()
    assert reloaded.get("sql").rank == 2


def test_replace_of_unknown_name_registers_it(tmp_path):
    reg = registry(tmp_path)
    assert reg.register_upload("fresh", peft_upload(), replace=True).name == "fresh"


def test_invalid_replacement_keeps_the_old_version(tmp_path):
    reg = registry(tmp_path)
    old = reg.register_upload("sql", peft_upload())
    with pytest.raises(AdapterInvalid):
        reg.register_upload("sql", {**peft_upload(), "adapter_config.json": b"{bad"}, replace=True)
    assert reg.get("sql") is old
    reloaded = registry(tmp_path)
    reloaded.load_stored()
    assert reloaded.get("sql").rank == old.rank


def test_replaced_and_removed_versions_are_announced_without_being_kept_alive(tmp_path):
    reg = registry(tmp_path)
    first = reg.register_upload("sql", peft_upload())
    second = reg.register_upload("sql", peft_upload(seed=3), replace=True)
    assert [ref() for ref in reg.retired] == [first]
    reg.remove("sql")
    assert [ref() for ref in reg.retired] == [first, second]
    del first, second
    assert [ref() for ref in reg.retired] == [None, None]  # nobody else held them: gone
