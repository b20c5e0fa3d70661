"""Memory as a tier over the store (`max_resident`): the most recently used adapters keep their weights in
memory, the others are read back from the store when asked for, and no remove or replace is undone by it."""

import threading

import pytest
import torch

from adapters import (
    AdapterLimits, AdapterRegistry, AdapterStore, llama_base_shapes, peft_folder_files, random_adapter,
)
from adapters.errors import AdapterNotFound

BASE = llama_base_shapes(num_layers=2, hidden=16, intermediate=32, kv_dim=8)


def registry(root, store=None, **limits) -> AdapterRegistry:
    return AdapterRegistry(store or AdapterStore(root), BASE, AdapterLimits(**limits))


def same_weights(a, b) -> bool:
    return a.weights.keys() == b.weights.keys() and all(
        torch.equal(a.weights[k].A, b.weights[k].A) and torch.equal(a.weights[k].B, b.weights[k].B)
        and a.weights[k].scale == b.weights[k].scale for k in a.weights)


def four(reg, dtype=torch.float32) -> dict:
    made = {name: random_adapter(name, BASE, seed=i, dtype=dtype) for i, name in enumerate("abcd")}
    for adapter in made.values():
        reg.add(adapter)
    return made


def test_the_most_recently_used_stay_in_memory_and_the_rest_are_read_back_equal(tmp_path):
    reg = registry(tmp_path, max_resident=2)
    made = four(reg)
    assert reg.memory() == (2, made["c"].held_bytes + made["d"].held_bytes)
    assert [a.name for a in reg.list()] == ["a", "b", "c", "d"] and len(reg) == 4 and "a" in reg
    assert reg.list()[0].weights == {} and reg.describe("a").size_bytes == made["a"].size_bytes
    assert reg.get_resident("a") is None and reg.get_resident("d") is made["d"]
    back = reg.get("a")
    assert back is not made["a"] and same_weights(back, made["a"])
    assert reg.get_resident("a") is back, "read back once, then served from memory"
    assert reg.get_resident("c") is None, "c was the least recently used: d was asked for after it"
    assert reg.memory()[0] == 2


def test_an_evicted_version_is_retired_so_its_device_slot_can_go(tmp_path):
    reg = registry(tmp_path, max_resident=1)
    first = random_adapter("a", BASE)
    reg.add(first)
    reg.add(random_adapter("b", BASE, seed=1))
    assert any(ref() is first for ref in reg.retired) and not reg.is_current(first)


def test_remove_while_evicted_forgets_it_everywhere(tmp_path):
    reg = registry(tmp_path, max_resident=1)
    four(reg)
    reg.remove("a")
    with pytest.raises(AdapterNotFound):
        reg.get("a")
    assert "a" not in reg and "a" not in reg.store.names() and len(reg) == 3
    reg.add(random_adapter("a", BASE, seed=7))
    assert same_weights(reg.get("a"), random_adapter("a", BASE, seed=7))


def test_replace_while_evicted_serves_the_new_version(tmp_path):
    reg = registry(tmp_path, max_resident=1)
    four(reg)
    new = random_adapter("a", BASE, seed=9)
    reg.register_upload("a", peft_folder_files(new), replace=True)
    reg.get("d")  # evicts the new a
    assert reg.get_resident("a") is None and same_weights(reg.get("a"), new)


class SlowStore(AdapterStore):
    """A store whose reads wait until released: a read back held open while the registry changes."""

    def __init__(self, root):
        super().__init__(root)
        self.reading, self.release = threading.Event(), threading.Event()

    def read(self, name, read_folder):
        self.reading.set()
        assert self.release.wait(10)
        return super().read(name, read_folder)


def read_back_racing(reg, name, change):
    """`reg.get(name)` in a thread, `change()` while its read is under way; the get's result or error."""
    outcome = {}

    def get():
        try:
            outcome["adapter"] = reg.get(name)
        except AdapterNotFound as e:
            outcome["error"] = e

    thread = threading.Thread(target=get)
    thread.start()
    assert reg.store.reading.wait(10)
    change()
    reg.store.release.set()
    thread.join(10)
    return outcome


def test_a_read_back_overtaken_by_a_remove_does_not_resurrect_it(tmp_path):
    reg = registry(tmp_path, store=SlowStore(tmp_path), max_resident=1)
    four(reg)
    outcome = read_back_racing(reg, "a", lambda: reg.remove("a"))
    assert "error" in outcome and "a" not in reg and reg.memory()[0] == 1
    with pytest.raises(AdapterNotFound):
        reg.get("a")


def test_a_read_back_overtaken_by_a_replace_serves_the_new_version(tmp_path):
    reg = registry(tmp_path, store=SlowStore(tmp_path), max_resident=1)
    four(reg)
    new = random_adapter("a", BASE, seed=9)
    outcome = read_back_racing(reg, "a", lambda: reg.register_upload("a", peft_folder_files(new), replace=True))
    assert same_weights(outcome["adapter"], new) and reg.get("a") is outcome["adapter"]


def test_adapters_with_no_copy_in_the_store_stay_in_memory(tmp_path):
    reg = registry(tmp_path, max_resident=1)
    pinned = random_adapter("shipped", BASE, seed=5)
    reg.add(pinned, persist=False)
    four(reg)
    assert reg.get_resident("shipped") is pinned and reg.memory()[0] == 2


def test_a_restart_registers_every_stored_adapter_and_keeps_only_the_limit_in_memory(tmp_path):
    made = four(registry(tmp_path))
    reg = registry(tmp_path, max_resident=2)
    assert reg.load_stored() == ["a", "b", "c", "d"]
    assert len(reg) == 4 and reg.memory()[0] == 2 and same_weights(reg.get("a"), made["a"])


def test_half_precision_adapters_take_two_bytes_a_parameter_in_memory_and_come_back_so(tmp_path):
    reg = registry(tmp_path, max_resident=1)
    made = four(reg, dtype=torch.float16)
    params = sum(t.numel() for w in made["d"].weights.values() for t in (w.A, w.B))
    assert reg.memory() == (1, 2 * params)
    back = reg.get("a")
    assert {t.dtype for w in back.weights.values() for t in (w.A, w.B)} == {torch.float16}
    assert same_weights(back, made["a"]) and reg.memory() == (1, 2 * params)


def test_the_memory_limit_evicts_instead_of_refusing_when_tiered(tmp_path):
    one = random_adapter("x", BASE).held_bytes
    reg = registry(tmp_path, max_resident=10, max_total_bytes=2 * one)
    four(reg)
    assert reg.memory() == (2, 2 * one) and len(reg) == 4


def test_a_read_back_under_way_holds_up_no_other_adapter(tmp_path):
    reg = registry(tmp_path, store=SlowStore(tmp_path), max_resident=2)
    made = four(reg)
    reader = threading.Thread(target=reg.get, args=("a",))
    reader.start()
    assert reg.store.reading.wait(10)
    assert reg.get_resident("d") is made["d"] and reg.get("c") is made["c"], "served while a is being read"
    assert reg.get_resident("a") is None and [e.name for e in reg.list()] == ["a", "b", "c", "d"]
    reg.store.release.set()
    reader.join(10)
    assert same_weights(reg.get_resident("a"), made["a"])


def test_a_stored_copy_broken_on_disk_is_the_servers_error_not_the_requests(tmp_path):
    from adapters.errors import AdapterUnreadable

    reg = registry(tmp_path, max_resident=1)
    made = four(reg)
    weights = reg.store.path("a") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated under the server
    with pytest.raises(AdapterUnreadable, match="'a' is registered but its stored copy cannot be read back"):
        reg.get("a")
    assert "a" in reg and reg.get_resident("a") is None  # still registered, still evicted: a fixed disk serves it
    assert same_weights(reg.get("b"), made["b"])  # the others are read back as before
