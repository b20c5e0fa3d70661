"""Uploading a PEFT folder as `save_pretrained` leaves it: its README.md is kept as the adapter's card and
shown by GET /adapters/{name}, across a restart; the other text files are dropped; pickle is still refused."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.integration.server_process import ServerProcess
from tests.integration.tiny_models import tiny_llama

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def saved(tmp_path_factory, default_model_folder):
    """A tiny base and a PEFT adapter of it saved with its tokenizer, as a training script leaves one."""
    root = tmp_path_factory.mktemp("cards")
    base = tiny_llama(root / "model", default_model_folder.path)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(root / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "adapter")
    return root


@pytest.fixture(scope="module")
def server(saved):
    proc = ServerProcess(saved / "store", "--model", str(saved / "model"), "--adapter-root", str(saved))
    proc.start()
    yield proc
    proc.stop()


def upload(c, name, files: dict[str, bytes]):
    return c.post("/adapters", data={"name": name}, files=[("files", item) for item in files.items()])


def folder_files(saved) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (saved / "adapter").iterdir() if p.is_file()}


def test_a_folder_as_saved_uploads_whole_and_its_readme_is_the_card(server, saved):
    files = folder_files(saved)
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(files)
    with server.client() as c:
        created = upload(c, "saved", files)
        assert created.status_code == 201, created.text
        assert c.get("/adapters/saved").json()["card"] == files["README.md"].decode()
        assert "card" not in c.get("/adapters").json()["adapters"][0]  # the list stays small
        reply = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 4, "adapter": "saved"})
        assert reply.status_code == 200, reply.text
    assert sorted(p.name for p in (server.store_dir / "saved").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_an_adapter_without_a_readme_has_no_card(server, saved):
    files = {k: v for k, v in folder_files(saved).items() if k != "README.md"}
    with server.client() as c:
        assert upload(c, "plain", files).status_code == 201
        assert c.get("/adapters/plain").json()["card"] is None


@pytest.mark.parametrize("extra, status", [({"training_args.bin": b"\x80\x04"}, 422),
                                           ({"README.md": b"\xff not utf-8"}, 422),
                                           ({"README.md": b"#" * (64 * 1024 + 1)}, 413)])
def test_pickle_and_unreadable_cards_are_refused(server, saved, extra, status):
    with server.client() as c:
        refused = upload(c, "refused", folder_files(saved) | extra)
        assert refused.status_code == status, refused.text
        assert c.get("/adapters/refused").status_code == 404


def test_a_folder_loaded_by_path_keeps_its_card(server, saved):
    with server.client() as c:
        loaded = c.post("/v1/load_lora_adapter", json={"lora_name": "bypath", "lora_path": str(saved / "adapter")})
        assert loaded.status_code == 200, loaded.text
        assert c.get("/adapters/bypath").json()["card"] == (saved / "adapter" / "README.md").read_text()


def test_the_card_survives_a_restart(server, saved):
    server.stop()
    server.start()
    with server.client() as c:
        assert c.get("/adapters/saved").json()["card"] == (saved / "adapter" / "README.md").read_text()
