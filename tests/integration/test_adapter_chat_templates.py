"""An adapter's own chat template: a PEFT folder that carries one (as `tokenizer.save_pretrained` leaves it)
has its chat requests rendered by it, whether uploaded, found in an --adapter-dir or read back after a
restart; one that cannot render a conversation is refused with the reason; one with a tool format is given the
tools in it. The base here has no template."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from adapters import llama_base_shapes, peft_folder_files, random_adapter, write_peft_folder
from tests.integration.server_process import ServerProcess
from tests.integration.tiny_models import tiny_llama

pytestmark = pytest.mark.integration

TINY = llama_base_shapes(num_layers=2, hidden=64, intermediate=128, kv_dim=32)  # tiny_llama's projections
TEMPLATE = ("{% for m in messages %}<|{{ m.role }} said|> {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|now the adapter answers|>{% endif %}")
TOOL_TEMPLATE = ("{% if tools %}<|tools|>{{ tools | tojson }}\n{% endif %}" + TEMPLATE)
CITY = {"type": "function", "function": {"name": "city_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tide?"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory, default_model_folder):
    return tiny_llama(tmp_path_factory.mktemp("model") / "tiny", default_model_folder.path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, model):
    """A PEFT folder with a tokenizer saved beside it (its template), in an --adapter-dir."""
    root = tmp_path_factory.mktemp("dir")
    folder = root / "found"
    write_peft_folder(random_adapter("x", TINY, seed=2), folder)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return root, folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, model, folders):
    proc = ServerProcess(tmp_path_factory.mktemp("store"), "--model", str(model), "--adapter-dir", str(folders[0]))
    proc.start()
    yield proc
    proc.stop()


def expected_prompt_tokens(model, template: str = TEMPLATE, tools: list | None = None) -> int:
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    return len(tokenizer.apply_chat_template(CHAT, chat_template=template, tools=tools, add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"])


def upload(c, name: str, folder=None, **extra: bytes):
    files = {} if folder is None else {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    files = files or peft_folder_files(random_adapter(name, TINY, seed=1))
    parts = [("files", (f, data)) for f, data in {**files, **extra}.items()]
    return c.post("/adapters", data={"name": name}, files=parts)


def chat_prompt_tokens(c, adapter: str):
    r = c.post("/v1/chat/completions", json={"model": adapter, "messages": CHAT, "max_tokens": 2})
    return r.json()["usage"]["prompt_tokens"] if r.status_code == 200 else r.status_code


def test_an_uploaded_folder_as_a_tokenizer_saved_it_chats_with_its_template(server, model, folders):
    with server.client() as c:
        assert upload(c, "saved", folders[1]).status_code == 201
        assert chat_prompt_tokens(c, "saved") == expected_prompt_tokens(model)
        r = c.post("/generate", json={"adapter": "saved", "messages": CHAT, "max_new_tokens": 2})
        assert r.json()["usage"]["prompt_tokens"] == expected_prompt_tokens(model)
        assert chat_prompt_tokens(c, "tiny") == 400, "the base has no template of its own"


def test_an_adapter_without_a_template_chats_with_the_base_template(server):
    with server.client() as c:
        assert upload(c, "plain").status_code == 201
        r = c.post("/v1/chat/completions", json={"model": "plain", "messages": CHAT, "max_tokens": 2})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_a_template_in_tokenizer_config_json_is_used(server, model):
    with server.client() as c:
        config = json.dumps({"chat_template": TEMPLATE, "model_max_length": 2048}).encode()
        assert upload(c, "configured", **{"tokenizer_config.json": config}).status_code == 201
        assert chat_prompt_tokens(c, "configured") == expected_prompt_tokens(model)


def test_an_adapter_template_with_a_tool_format_is_given_the_tools_in_it(server, model):
    with server.client() as c:
        assert upload(c, "tooled", **{"chat_template.jinja": TOOL_TEMPLATE.encode()}).status_code == 201
        r = c.post("/v1/chat/completions", json={"model": "tooled", "messages": CHAT, "tools": [CITY],
                                                 "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == expected_prompt_tokens(model, TOOL_TEMPLATE, [CITY])


def test_a_folder_found_in_an_adapter_dir_chats_with_its_template(server, model):
    with server.client() as c:
        assert chat_prompt_tokens(c, "found") == expected_prompt_tokens(model)


@pytest.mark.parametrize("template, reason", [
    ("{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}", "no_such_filter"),
    ("{{ raise_exception('system messages are not supported') }}", "system messages are not supported"),
    ("{% if messages %}", "TemplateSyntaxError"),
    ("{# nothing #}", "renders a conversation as nothing"),
])
def test_a_template_that_cannot_render_a_conversation_is_refused_with_the_reason(server, template, reason):
    with server.client() as c:
        r = upload(c, "broken", **{"chat_template.jinja": template.encode()})
        assert r.status_code == 422 and reason in r.json()["error"]["message"]
        assert c.get("/adapters/broken").status_code == 404


def test_the_template_survives_a_restart(server, tmp_path, model):
    with server.client() as c:
        assert upload(c, "kept", **{"chat_template.jinja": TEMPLATE.encode()}).status_code == 201
    shutil.copytree(server.store_dir, tmp_path / "store", symlinks=True)  # the store as a restart finds it
    restarted = ServerProcess(tmp_path / "store", "--model", str(model))
    restarted.start()
    try:
        with restarted.client() as c:
            assert chat_prompt_tokens(c, "kept") == expected_prompt_tokens(model)
    finally:
        restarted.stop()


def test_the_python_client_uploads_a_folder_with_its_template_and_shows_it(server, model, folders, tmp_path):
    from clients.python import LoraplexClient

    write_peft_folder(random_adapter("plain", TINY, seed=4), tmp_path / "plain")
    with LoraplexClient(server.url) as client:
        client.upload_adapter(folders[1], "by-client")
        client.upload_adapter(tmp_path / "plain", "plain-by-client")
        assert client.get_adapter("by-client").chat_template == TEMPLATE
        assert client.get_adapter("plain-by-client").chat_template is None
    with server.client() as c:
        assert chat_prompt_tokens(c, "by-client") == expected_prompt_tokens(model)
