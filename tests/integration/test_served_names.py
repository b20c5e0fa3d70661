"""A server on a folder of the user's: the base answers to every --served-model-name, /v1/models lists it
under each with the adapters' `parent` set to it, and --chat-template replaces a tokenizer without one."""

import pytest
import torch

from adapters import random_adapter, write_peft_folder
from server.model.loader import ModelFolder
from server.model.weights import LoadedModel
from tests.integration.server_process import ServerProcess
from tests.integration.tiny_models import tiny_llama

pytestmark = pytest.mark.integration

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}: {{ m['content'] }}>>{% endfor %}"


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_folder):
    root = tmp_path_factory.mktemp("named")
    folder = tiny_llama(root / "model", default_model_folder.path)
    base = LoadedModel(ModelFolder(folder), torch.device("cpu"), torch.float32, "torch")
    shapes = base.transformer.lora_target_shapes()
    write_peft_folder(random_adapter("style", shapes), root / "preload" / "style")
    (root / "template.jinja").write_text(TEMPLATE)
    proc = ServerProcess(root / "store", "--model", str(folder), "--served-model-name", "tiny-llama", "org/alias",
                         "--chat-template", str(root / "template.jinja"), "--preload-dir", str(root / "preload"))
    proc.start()
    yield proc
    proc.stop()


def test_models_lists_the_base_under_each_name_and_adapters_under_the_first(server):
    with server.client() as c:
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        health = c.get("/health").json()
    assert models["tiny-llama"]["parent"] is None and models["org/alias"]["parent"] is None
    assert models["style"]["parent"] == "tiny-llama"
    assert health["model"] == "tiny-llama"


@pytest.mark.parametrize("model", ["tiny-llama", "org/alias", "style"])
def test_each_name_serves_a_completion(server, model):
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model


def test_the_chat_template_file_renders_the_messages(server):
    messages = [{"role": "user", "content": "hi there"}]
    with server.client() as c:
        templated = c.post("/tokenize", json={"messages": messages}).json()["tokens"]
        plain = c.post("/tokenize", json={"prompt": "<<user: hi there>>", "add_special_tokens": False}).json()["tokens"]
    assert templated == plain
