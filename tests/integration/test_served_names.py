"""A server on a folder of the user's: the base answers to every --served-model-name, /v1/models lists it
under each with the adapters' `parent` set to it, and --chat-template replaces a tokenizer without one (here
a template with a tool format of its own, which then gets the tools and earlier calls; an adapter whose own
template has none is shown them in a system message)."""

import json

import pytest
import torch

from adapters import random_adapter, write_peft_folder
from server.model.backend import resolve_backend
from server.model.loader import ModelFolder
from server.model.weights import LoadedModel
from server.tool_calls import INSTRUCTIONS
from tests.integration.server_process import ServerProcess
from tests.integration.tiny_models import tiny_llama

pytestmark = pytest.mark.integration

TEMPLATE = ("{% if tools %}<<tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}>>{% endif %}"
            "{% for m in messages %}<<{{ m['role'] }}: {{ m['content'] }}{% for c in m.tool_calls or [] %}"
            "[call {{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}]{% endfor %}>>{% endfor %}")
PLAIN = "{% for m in messages %}<<{{ m['role'] }}: {{ m['content'] }}>>{% endfor %}"  # no tool format
CITY = {"type": "function", "function": {"name": "city_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_folder):
    root = tmp_path_factory.mktemp("named")
    folder = tiny_llama(root / "model", default_model_folder.path)
    base = LoadedModel(ModelFolder(folder), resolve_backend(torch.device("cpu"), torch.float32, "torch"))
    shapes = base.transformer.lora_target_shapes()
    write_peft_folder(random_adapter("style", shapes), root / "preload" / "style")
    write_peft_folder(random_adapter("plain-chat", shapes, seed=3), root / "preload" / "plain-chat")
    (root / "preload" / "plain-chat" / "chat_template.jinja").write_text(PLAIN)
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


CALLED_BEFORE = [{"role": "user", "content": "weather in Rome?"},
                 {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                     "name": "city_weather", "arguments": json.dumps({"city": "Rome"})}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                 {"role": "user", "content": "and Paris?"}]


def test_a_template_with_a_tool_format_renders_the_tools_and_earlier_calls_itself(server):
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": CALLED_BEFORE, "tools": [CITY],
                                                 "tool_choice": "required", "max_tokens": 64, "temperature": 0})
        rendered = ('<<tools: city_weather>><<user: weather in Rome?>><<assistant: [call city_weather {"city": '
                    '"Rome"}]>><<tool: sunny>><<user: and Paris?>>')
        plain = c.post("/tokenize", json={"prompt": rendered, "add_special_tokens": False}).json()["tokens"]
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["usage"]["prompt_tokens"] == len(plain)  # the template's rendering, not a system message's
    (call,) = reply["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "city_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")


def test_an_adapter_template_without_a_tool_format_is_shown_the_tools_in_a_system_message(server):
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "plain-chat", "messages": CALLED_BEFORE, "tools": [CITY],
                                                 "tool_choice": "required", "max_tokens": 64, "temperature": 0})
        described = f"{INSTRUCTIONS}\n<tools>\n{json.dumps([CITY['function']])}\n</tools>"
        rendered = (f"<<system: {described}>><<user: weather in Rome?>><<assistant: "
                    f'{json.dumps({"name": "city_weather", "arguments": {"city": "Rome"}})}>><<tool: sunny>>'
                    "<<user: and Paris?>>")
        plain = c.post("/tokenize", json={"prompt": rendered, "add_special_tokens": False}).json()["tokens"]
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(plain)  # the adapter's template, the tools described
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "city_weather"


def test_tools_count_toward_the_prompt_characters_however_the_template_shows_them(server):
    limit = 1 << 18  # --max-prompt-chars' default
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "x" * (limit // 64),
                                               "parameters": {"type": "object", "properties": {}}}}
             for i in range(64)]
    with server.client() as c:
        refusals = [c.post("/v1/chat/completions", json={"model": "tiny-llama", "max_tokens": 2, **ask})
                    for ask in ({"messages": [{"role": "user", "content": "x" * (limit + 1)}]},
                                {"messages": [{"role": "user", "content": "hi"}], "tools": tools})]
    assert [r.status_code for r in refusals] == [400, 400]
    assert all("characters; the limit is" in r.json()["error"]["message"] for r in refusals)
