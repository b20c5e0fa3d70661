"""The names the base model answers to: given ones first, else a Hugging Face cache snapshot's hub id, never
its commit hash, else the folder's name."""

from pathlib import Path

from server.model.loader import ModelFolder, served_names

SNAPSHOT = Path("/home/u/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/7ae557604adf67be50")


def test_a_cache_snapshot_is_served_under_its_hub_id():
    assert served_names([], ModelFolder(SNAPSHOT)) == ["Qwen/Qwen2.5-0.5B-Instruct"]
    assert served_names([], ModelFolder(Path(f"{SNAPSHOT}/"))) == ["Qwen/Qwen2.5-0.5B-Instruct"]


def test_a_plain_folder_is_served_under_its_name():
    assert served_names([], ModelFolder(Path("/models/my-llama"))) == ["my-llama"]


def test_given_names_win_in_their_order_once_each():
    assert served_names(["chat", "org/alias", "chat"], ModelFolder(SNAPSHOT)) == ["chat", "org/alias"]
