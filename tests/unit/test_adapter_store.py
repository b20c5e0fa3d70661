import multiprocessing
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
    assert listing(store.root) == ["pirate", "version of pirate"]


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


def listing(root) -> list[str]:
    """The root's entries and every version folder, each name's live one first."""
    return sorted(p.name for p in root.iterdir() if p.name != ".versions") + \
        sorted(f"version of {p.name[33:]}" for p in (root / ".versions").iterdir())


def test_crash_mid_save_leaves_previous_state(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path)
    store.save("kept", FILES)

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "symlink", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.save("new", FILES)
    monkeypatch.undo()
    assert store.names() == ["kept"]
    assert listing(tmp_path) == ["kept", "version of kept"]


def test_leftovers_from_a_crash_are_ignored_then_cleaned(tmp_path):
    store = AdapterStore(tmp_path)
    store.save("kept", FILES)
    (tmp_path / ".tmp-1234").mkdir()
    (tmp_path / ".tmp-1234" / "adapter_config.json").write_bytes(b"half written")
    (tmp_path / ".trash-5678").mkdir()
    assert store.names() == ["kept"]
    store.clean_leftovers()
    assert listing(tmp_path) == ["kept", "version of kept"]


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
    assert listing(tmp_path) == ["sql", "version of sql"]


def test_a_crash_mid_replace_keeps_the_acknowledged_version(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path)
    store.save("sql", FILES)

    def crash(*args):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)  # the new version is written and fsynced, its link not yet in place
    monkeypatch.setattr(AdapterStore, "_remove", lambda self, entry: None)  # and nothing was cleaned up
    monkeypatch.setattr("shutil.rmtree", lambda *a, **k: None)
    with pytest.raises(OSError, match="power cut"):
        store.save("sql", NEW_FILES, replace=True)
    monkeypatch.undo()
    assert len(list((tmp_path / ".versions").iterdir())) == 2
    AdapterStore(tmp_path).clean_leftovers()
    assert {p.name: p.read_bytes() for p in store.path("sql").iterdir()} == FILES
    assert listing(tmp_path) == ["sql", "version of sql"]


def test_a_delete_stopped_midway_stays_deleted(tmp_path):
    store = AdapterStore(tmp_path)
    store.save("sql", FILES)
    store.save("kept", FILES)
    os.rename(store.path("sql"), tmp_path / f".trash-{'a' * 32}")  # the delete's first step, then a crash
    assert store.names() == ["kept"] and store.version("sql") is None
    store.clean_leftovers()
    assert listing(tmp_path) == ["kept", "version of kept"]


def test_a_plain_folder_is_adopted_as_a_version(tmp_path):
    (tmp_path / "sql").mkdir()  # the layout of an older loraplex, or a folder copied in by hand
    for file_name, data in FILES.items():
        (tmp_path / "sql" / file_name).write_bytes(data)
    store = AdapterStore(tmp_path)
    assert store.version("sql") == "sql" and store.names() == ["sql"]
    store.clean_leftovers()
    assert store.path("sql").is_symlink() and store.version("sql").startswith(".versions/")
    assert {p.name: p.read_bytes() for p in store.path("sql").iterdir()} == FILES
    assert listing(tmp_path) == ["sql", "version of sql"]


def test_an_adoption_stopped_between_its_renames_restores_the_plain_folder(tmp_path):
    store = AdapterStore(tmp_path)
    old = tmp_path / f".old-{'a' * 32}-sql"
    old.mkdir()
    for file_name, data in FILES.items():
        (old / file_name).write_bytes(data)
    (tmp_path / ".versions" / f"{'b' * 32}-sql").mkdir(parents=True)  # the version it was becoming, never linked
    store.clean_leftovers()
    assert {p.name: p.read_bytes() for p in store.path("sql").iterdir()} == FILES
    assert listing(tmp_path) == ["sql", "version of sql"]


def test_an_adoption_that_finished_drops_the_plain_folder_left_beside_it(tmp_path):
    store = AdapterStore(tmp_path)
    store.save("sql", NEW_FILES)
    old = tmp_path / f".old-{'c' * 32}-sql"
    old.mkdir()
    (old / "adapter_config.json").write_bytes(b"stale")
    AdapterStore(tmp_path).clean_leftovers()
    assert {p.name: p.read_bytes() for p in store.path("sql").iterdir()} == NEW_FILES
    assert listing(tmp_path) == ["sql", "version of sql"]


def test_a_replace_overtaking_a_read_is_read_again(tmp_path):
    store = AdapterStore(tmp_path)
    store.save("sql", FILES)
    first = store.version("sql")
    reads = []

    def read(folder):
        reads.append(folder.name)
        if len(reads) == 1:  # the replace lands while this read is under way
            store.save("sql", NEW_FILES, replace=True)
        return {p.name: p.read_bytes() for p in folder.iterdir()}  # the first: its folder is gone by now

    version, files = store.read("sql", read)
    assert version != first and files == NEW_FILES and len(reads) == 2


def version_files(i: int) -> dict[str, bytes]:
    # large enough that a reader could catch one half written
    return {"adapter_config.json": b'{"r": 4, "v": %d}' % i, "adapter_model.safetensors": b"weights %d " % i * 8192}


def poll(root, stop, problems, count) -> None:
    """A reader in another process, as a replica is: every look at "sql" must find one whole version."""
    store = AdapterStore(root)

    def read(folder):
        return {name: (folder / name).read_bytes() for name in version_files(0)}

    while not stop.is_set():
        found = store.read("sql", read)
        if found is None:
            problems.put("missing")
            return
        config = found[1]["adapter_config.json"]
        i = int(config.split(b'"v": ')[1].rstrip(b"}"))
        if found[1] != version_files(i):
            problems.put(f"version {i} half written")
            return
        count.value += 1
    problems.put(None)


def test_a_reader_in_another_process_always_finds_a_whole_version_while_a_name_is_replaced(tmp_path):
    store = AdapterStore(tmp_path)
    store.save("sql", version_files(0))
    fork = multiprocessing.get_context("fork")
    stop, problems, count = fork.Event(), fork.Queue(), fork.Value("l", 0)
    reader = fork.Process(target=poll, args=(tmp_path, stop, problems, count))
    reader.start()
    try:
        for i in range(1, 100):
            store.save("sql", version_files(i), replace=True)
    finally:
        stop.set()
        reader.join(timeout=30)
    assert problems.get(timeout=5) is None
    assert count.value > 100, "the reader should have looked many times during the replaces"
    assert store.read("sql", lambda folder: (folder / "adapter_config.json").read_bytes())[1] == \
        version_files(99)["adapter_config.json"]
    assert listing(tmp_path) == ["sql", "version of sql"], "every replaced version is removed"
