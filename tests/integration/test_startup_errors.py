"""A model folder the server cannot serve stops `python -m server` with one line that says why and a
non-zero exit, not a traceback from inside the server's start-up."""

import json
import os
import subprocess
import sys

import pytest
from transformers import PhiConfig

from tests.integration.server_process import free_port
from tests.integration.tiny_models import tiny_llama

pytestmark = pytest.mark.integration


def phi2(folder, tokenizer_from):
    PhiConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2).save_pretrained(folder)


def without_tokenizer(folder, tokenizer_from):
    tiny_llama(folder)


def biases_the_config_does_not_declare(folder, tokenizer_from):
    tiny_llama(folder, tokenizer_from, attention_bias=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"attention_bias": False}))


def truncated_gguf(folder, tokenizer_from):
    """Not a folder: the first MiB of the default model's GGUF file, as `--model FILE.gguf`."""
    from server.model.loader import default_gguf_path

    path = folder / "cut.gguf"
    path.write_bytes(default_gguf_path().read_bytes()[: 1 << 20])
    return path


@pytest.mark.parametrize("make, says", [
    (phi2, "model_type 'phi': Phi-2"),
    (without_tokenizer, "holds no tokenizer"),
    (biases_the_config_does_not_declare, "the checkpoint holds model.layers.0.self_attn.k_proj.bias"),
    (truncated_gguf, "cut.gguf: transformers cannot read it as a GGUF model"),
])
def test_an_unservable_folder_exits_with_one_line_naming_the_cause(tmp_path, default_model_folder, make, says):
    folder = tmp_path / "model"
    folder.mkdir()
    model = make(folder, default_model_folder.path) or folder
    done = subprocess.run([sys.executable, "-m", "server", "--model", str(model), "--port", str(free_port()),
                           "--store-dir", str(tmp_path / "store")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LORAPLEX_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("loraplex: cannot start: ") and says in last, done.stderr
    assert not any((tmp_path / "cache").rglob("*.safetensors"))  # no half-converted folder is left
