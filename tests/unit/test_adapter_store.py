import os

import pytest

from adapters import AdapterStore
from server.errors import AdapterExists, AdapterInvalid, AdapterNotFound

FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"weights"}


def test_save_names_delete(tmp_path):
    store = AdapterStore(tmp_path / "store")
    path = store.save("sql", FILES)
    assert path == store.path("sql") == tmp_path / "store" / "sql"
    assert {p.name: p.read_bytes() for p in path.iterdir()} == FILES
    store.save("pirate", FILES)
    assert store.names() == ["pirate", "sql"]
    store.delete("sql")
    assert store.names() == ["pirate"]
    assert not path.exists()
    assert [p.name for p in store.root.iterdir()] == ["pirate"]


def test_save_existing_name_raises_and_keeps_old_files(tmp_path):
    store = AdapterStore(tmp_path)
    store.save("sql", FILES)
    with pytest.raises(AdapterExists):
        store.save("sql", {"adapter_config.json": b"other"})
    assert (store.path("sql") / "adapter_config.json").read_bytes() == FILES["adapter_config.json"]


def test_delete_absent_raises(tmp_path):
    with pytest.raises(AdapterNotFound):
        AdapterStore(tmp_path).delete("ghost")


@pytest.mark.parametrize("name", ["../x", "a/b", ".."])
def test_traversal_names_are_refused(tmp_path, name):
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterInvalid):
        store.save(name, FILES)
    with pytest.raises(AdapterInvalid):
        store.delete(name)
    assert list(tmp_path.iterdir()) == [store.root]


def test_only_peft_files_are_stored(tmp_path):
    with pytest.raises(AdapterInvalid, match="model.bin"):
        AdapterStore(tmp_path).save("x", {"model.bin": b"pickle"})


def test_crash_mid_save_leaves_previous_state(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path)
    store.save("kept", FILES)

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.save("new", FILES)
    monkeypatch.undo()
    assert store.names() == ["kept"]
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]


def test_leftovers_from_a_crash_are_ignored_then_cleaned(tmp_path):
    store = AdapterStore(tmp_path)
    store.save("kept", FILES)
    (tmp_path / ".tmp-1234").mkdir()
    (tmp_path / ".tmp-1234" / "adapter_config.json").write_bytes(b"half written")
    (tmp_path / ".trash-5678").mkdir()
    assert store.names() == ["kept"]
    store.clean_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_quarantine_moves_entry_aside(tmp_path):
    store = AdapterStore(tmp_path)
    store.save("broken", FILES)
    dest = store.quarantine("broken")
    assert dest == tmp_path / ".quarantine" / "broken"
    assert store.names() == []
    store.save("broken", FILES)
    assert store.quarantine("broken").parent == tmp_path / ".quarantine"
    assert len(list((tmp_path / ".quarantine").iterdir())) == 2


NEW_FILES = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"new weights"}


def test_replace_swaps_the_stored_version(tmp_path):
    store = AdapterStore(tmp_path)
    store.save("sql", FILES)
    store.save("sql", NEW_FILES, replace=True)
    assert {p.name: p.read_bytes() for p in store.path("sql").iterdir()} == NEW_FILES
    assert store.names() == ["sql"]
    assert [p.name for p in tmp_path.iterdir()] == ["sql"]


def test_crash_between_the_two_renames_of_a_replace_restores_the_old_version(tmp_path):
    store = AdapterStore(tmp_path)
    store.save("sql", FILES)
    # the state a replace leaves if it dies after moving the live folder aside
    os.rename(store.path("sql"), tmp_path / f".old-{'a' * 32}-sql")
    (tmp_path / f".tmp-{'b' * 32}").mkdir()
    AdapterStore(tmp_path).clean_leftovers()
    assert store.names() == ["sql"]
    assert {p.name: p.read_bytes() for p in store.path("sql").iterdir()} == FILES
    assert [p.name for p in tmp_path.iterdir()] == ["sql"]


def test_crash_after_a_replace_completed_drops_the_old_version(tmp_path):
    store = AdapterStore(tmp_path)
    store.save("sql", NEW_FILES)
    old = tmp_path / f".old-{'c' * 32}-sql"
    old.mkdir()
    (old / "adapter_config.json").write_bytes(b"stale")
    AdapterStore(tmp_path).clean_leftovers()
    assert {p.name: p.read_bytes() for p in store.path("sql").iterdir()} == NEW_FILES
    assert not old.exists()
