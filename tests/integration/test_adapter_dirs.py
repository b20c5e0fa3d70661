"""--adapter-dir: a request for an adapter nobody registered finds `<dir>/<name>/` and is served from it,
never from outside the dir, and only to keys that may see that name."""

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapters import random_adapter, write_peft_folder
from server.model.backend import resolve_backend
from server.model.loader import ModelFolder
from server.model.weights import LoadedModel
from tests.integration.server_process import ServerProcess
from tests.integration.tiny_models import tiny_llama

pytestmark = pytest.mark.integration

ADMIN = "admin-key-0123456789abcdef"
TENANT = "tenant-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_folder):
    root = tmp_path_factory.mktemp("dirs")
    folder = tiny_llama(root / "model", default_model_folder.path)
    backend = resolve_backend(torch.device("cpu"), torch.float32, "torch")
    shapes = LoadedModel(ModelFolder(folder), backend).transformer.lora_target_shapes()
    dirs = root / "first", root / "second"
    write_peft_folder(random_adapter("x", shapes, seed=1, init_std=0.5), dirs[0] / "pirate")
    write_peft_folder(random_adapter("x", shapes, seed=2, init_std=0.5), dirs[1] / "butler")
    for name in ("crowd", "secret"):
        write_peft_folder(random_adapter("x", shapes, seed=3, init_std=0.5), dirs[1] / name)
    write_peft_folder(random_adapter("x", shapes, seed=4), root / "outside" / "escape")
    os.symlink(root / "outside" / "escape", dirs[0] / "escape")  # a folder linked in from elsewhere
    write_peft_folder(random_adapter("x", shapes, seed=5), root / "x")  # what `../x` would name
    keys = root / "keys.json"
    keys.write_text(json.dumps([{"key": TENANT, "role": "user", "adapters": ["butler"]}]))
    proc = ServerProcess(root / "store", "--model", str(folder), "--adapter-dir", str(dirs[0]),
                         "--adapter-dir", str(dirs[1]),
                         env={"LORAPLEX_ADMIN_KEYS": ADMIN, "LORAPLEX_KEYS_FILE": str(keys)})
    proc.start()
    yield proc
    proc.stop()


def generate(c, adapter, key=ADMIN):
    return c.post("/generate", json={"prompt": "Ahoy", "max_new_tokens": 6, "temperature": 0, "adapter": adapter},
                  headers={"Authorization": f"Bearer {key}"})


def listed(c) -> list[str]:
    return [a["name"] for a in c.get("/adapters", headers={"Authorization": f"Bearer {ADMIN}"}).json()["adapters"]]


def test_a_folder_in_either_dir_is_served_by_name_and_then_listed(server):
    with server.client() as c:
        assert listed(c) == []
        base = generate(c, None).json()["text"]
        for name in ("pirate", "butler"):
            reply = generate(c, name)
            assert reply.status_code == 200, reply.text
            assert reply.json()["adapter"] == name and reply.json()["text"] != base
        assert {"pirate", "butler"} <= set(listed(c))
        info = c.get("/adapters/pirate", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert info["rank"] == 8
    assert not (server.store_dir / "pirate").exists()  # served in place, not copied into the store


def test_concurrent_requests_for_one_new_name_register_it_once(server):
    with server.client() as c, ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: generate(c, "crowd"), range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    assert len(re.findall(r"adapter 'crowd' registered from", server.log_path.read_text())) == 1


@pytest.mark.parametrize("name", ["missing", "escape", "../x", "first/pirate", ".."])
def test_a_name_not_inside_a_dir_is_unknown(server, name):
    with server.client() as c:
        reply = generate(c, name)
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "adapter_not_found", reply.text
        assert name not in listed(c)


def test_a_key_not_allowed_the_name_gets_the_same_404(server):
    with server.client() as c:
        hidden = generate(c, "secret", key=TENANT)
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "adapter_not_found"
        assert "secret" not in listed(c)  # nothing was read for a caller who may not see it
        assert generate(c, "butler", key=TENANT).status_code == 200
