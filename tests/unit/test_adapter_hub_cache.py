"""--adapter-dir over a local Hugging Face hub cache: a request for `org/name` finds the PEFT adapter in
`models--org--name/snapshots/<commit>/` (the files there links into the cache's blobs, as huggingface_hub
leaves them) and registers it as `org--name`; nothing outside the dir is served, nothing is downloaded."""

import hashlib
import os

import pytest
import torch

from adapters import AdapterLimits, AdapterRegistry, AdapterStore, llama_base_shapes, random_adapter
from adapters import peft_folder_files
from adapters.errors import AdapterNotFound
from adapters.resolver import AdapterDirs

BASE = llama_base_shapes(num_layers=2, hidden=16, intermediate=32, kv_dim=8)
COMMIT, OLDER = "a" * 40, "b" * 40


def cache_repo(hub, repo: str, commits: dict[str, int], ref: str | None = None):
    """`hub/models--org--name` as the hub client writes it: each file a blob named by its hash, each snapshot
    a folder of relative links to the blobs, `refs/main` naming `ref`. The values of `commits` are seeds."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    for commit, seed in commits.items():
        snapshot = folder / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, data in peft_folder_files(random_adapter("x", BASE, seed=seed)).items():
            blob = hashlib.sha256(data).hexdigest()
            (folder / "blobs" / blob).write_bytes(data)
            os.symlink(f"../../blobs/{blob}", snapshot / name)
    if ref is not None:
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(ref)
    return folder


def resolver(tmp_path, *dirs) -> AdapterDirs:
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), BASE, AdapterLimits())
    return AdapterDirs(registry, list(dirs), max_bytes=2**20)


def same_weights(adapter, seed: int) -> bool:
    expected = random_adapter("x", BASE, seed=seed)
    return all(torch.equal(adapter.weights[k].B, expected.weights[k].B) for k in expected.weights)


def test_a_hub_repository_name_is_served_from_the_snapshot_refs_main_names(tmp_path):
    hub = tmp_path / "hub"
    cache_repo(hub, "org/pirate", {OLDER: 1, COMMIT: 2}, ref=COMMIT + "\n")
    dirs = resolver(tmp_path, hub)
    adapter = dirs.resolve("org/pirate")
    assert adapter.name == "org--pirate" and same_weights(adapter, seed=2)
    assert dirs.resolve("org--pirate") is adapter and dirs.resolve("org/pirate") is adapter, "registered once"
    assert "org--pirate" in dirs.registry


def test_without_a_ref_the_only_snapshot_is_served_and_several_are_not_guessed_between(tmp_path):
    hub = tmp_path / "hub"
    cache_repo(hub, "org/only", {COMMIT: 3})
    cache_repo(hub, "org/many", {COMMIT: 4, OLDER: 5})
    dirs = resolver(tmp_path, hub)
    assert same_weights(dirs.resolve("org/only"), seed=3)
    with pytest.raises(AdapterNotFound):
        dirs.resolve("org/many")


def test_plain_folders_and_hub_repositories_share_a_dir_and_the_first_dir_wins(tmp_path):
    first, hub = tmp_path / "first", tmp_path / "hub"
    (first / "butler").mkdir(parents=True)
    for name, data in peft_folder_files(random_adapter("x", BASE, seed=6)).items():
        (first / "butler" / name).write_bytes(data)
    cache_repo(hub, "butler", {COMMIT: 7}, ref=COMMIT)  # a repository without an org: models--butler
    cache_repo(hub, "org/coach", {COMMIT: 8}, ref=COMMIT)
    dirs = resolver(tmp_path, first, hub)
    assert same_weights(dirs.resolve("butler"), seed=6) and same_weights(dirs.resolve("org/coach"), seed=8)


def test_nothing_outside_the_dir_is_served_however_the_cache_points_there(tmp_path):
    hub, outside = tmp_path / "hub", tmp_path / "outside"
    cache_repo(outside, "org/escape", {COMMIT: 9}, ref=COMMIT)
    (hub).mkdir()
    os.symlink(outside / "models--org--escape", hub / "models--org--escape")  # the repository linked in
    linked = cache_repo(hub, "org/blob", {COMMIT: 10}, ref=COMMIT)
    blob = next((linked / "snapshots" / COMMIT).iterdir())
    os.replace(blob.resolve(), outside / "stolen")
    blob.unlink()
    os.symlink(outside / "stolen", blob)  # one file a link out of the dir
    cache_repo(hub, "org/walk", {COMMIT: 11}, ref="../../../outside/models--org--escape/snapshots/" + COMMIT)
    dirs = resolver(tmp_path, hub)
    for name in ("org/escape", "org/blob", "org/walk", "org/../outside", "a/b/c", "/etc", "models--org--blob"):
        with pytest.raises(AdapterNotFound):
            dirs.resolve(name)
    assert len(dirs.registry) == 0
