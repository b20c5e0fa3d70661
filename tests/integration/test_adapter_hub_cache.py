"""--adapter-dir over a local Hugging Face hub cache, on a real server: `org/name` on /generate and as /v1's
model is served from `models--org--name/snapshots/<commit>/` without an upload and listed as `org--name`."""

import hashlib
import os

import pytest

from adapters import llama_base_shapes, peft_folder_files, random_adapter
from tests.integration.server_process import ServerProcess
from tests.integration.tiny_models import tiny_llama

pytestmark = pytest.mark.integration
COMMIT = "c" * 40
TINY = llama_base_shapes(num_layers=2, hidden=64, intermediate=128, kv_dim=32)  # tiny_llama's projections


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_folder):
    root = tmp_path_factory.mktemp("hub")
    folder = tiny_llama(root / "model", default_model_folder.path)
    repo = root / "hub" / "models--org--pirate"
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in peft_folder_files(random_adapter("x", TINY, seed=1, init_std=0.5)).items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", repo / "snapshots" / COMMIT / name)
    proc = ServerProcess(root / "store", "--model", str(folder), "--adapter-dir", str(root / "hub"))
    proc.start()
    yield proc
    proc.stop()


def test_a_hub_repository_in_the_cache_is_served_by_its_name_without_an_upload(server):
    with server.client() as c:
        ask = {"prompt": "Ahoy", "max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
        base = c.post("/generate", json=ask).json()["text"]
        reply = c.post("/generate", json={**ask, "adapter": "org/pirate"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["text"] != base
        v1 = c.post("/v1/completions", json={"model": "org/pirate", "prompt": "Ahoy", "max_tokens": 6,
                                              "temperature": 0, "ignore_eos": True})
        assert v1.status_code == 200, v1.text
        assert v1.json()["choices"][0]["text"] == reply.json()["text"]
        assert [a["name"] for a in c.get("/adapters").json()["adapters"]] == ["org--pirate"]
        assert c.post("/generate", json={**ask, "adapter": "org/absent"}).status_code == 404
