"""A model folder's weights are the files transformers reads: a hub folder may hold another format's
weights beside them (Mistral's consolidated.safetensors), which must not reach the checkpoint."""

import json

from server.model.loader import ModelFolder


def touch(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"")


def test_a_sharded_checkpoint_is_the_files_its_index_names(tmp_path):
    touch(tmp_path, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "consolidated.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                  "c": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert [f.name for f in ModelFolder(tmp_path).weight_files()] == ["model-00001-of-00002.safetensors",
                                                                     "model-00002-of-00002.safetensors"]


def test_a_single_file_checkpoint_is_model_safetensors(tmp_path):
    touch(tmp_path, "model.safetensors", "consolidated.safetensors")
    assert [f.name for f in ModelFolder(tmp_path).weight_files()] == ["model.safetensors"]
