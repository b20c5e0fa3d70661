"""The OpenAI-compatible routes, driven by the official `openai` package, unchanged, over loopback."""

import json

import httpx
import openai
import pytest

from adapters import llama_base_shapes, random_adapter, write_peft_folder
from tests.integration.test_http_api import adapter_files, upload

pytestmark = pytest.mark.integration

BASE_ID = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        assert upload(c, "oa-persona", adapter_files(seed=11)).status_code == 201
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with server.client() as c:
        c.delete("/adapters/oa-persona")


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert BASE_ID in models and "oa-persona" in models
    assert models["oa-persona"].model_extra["parent"] == BASE_ID


@pytest.mark.parametrize("model", [BASE_ID, "oa-persona"])
def test_chat_and_stream_agree(client, model):
    full = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content
    assert full.usage.completion_tokens <= 8 and full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_adapter_changes_chat_output(client):
    outs = {m: client.chat.completions.create(model=m, messages=CHAT, max_tokens=10, temperature=0).choices[0].message.content
            for m in (BASE_ID, "oa-persona")}
    assert outs[BASE_ID] != outs["oa-persona"]


def test_completions_with_logprobs_and_ignore_eos(client):
    resp = client.completions.create(model="oa-persona", prompt="The sky is", max_tokens=6, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert resp.usage.completion_tokens == 6 and choice.finish_reason == "length"
    assert len(choice.logprobs.token_logprobs) == 6 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    # greedy: the chosen token is the most likely one
    for token, lp, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert lp == pytest.approx(max(top.values()), abs=1e-5)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="oa-persona", prompt="The sky is", max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == choice.text


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=BASE_ID, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(e.top_logprobs) == 3 for e in content)


def test_errors_use_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-adapter", messages=CHAT, max_tokens=4)
    assert err.value.body["code"] == "adapter_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE_ID, messages=CHAT, max_tokens=4, n=9)
    assert err.value.body["param"] == "n"


@pytest.mark.parametrize("field,value", [
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
    ("store", True), ("best_of", 2), ("no_such_field", 1),
])
def test_a_field_not_served_is_refused_naming_it_never_ignored(client, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE_ID, messages=CHAT, max_tokens=4, extra_body={field: value})
    assert err.value.body["param"] == field and field in err.value.body["message"]


def test_a_frequency_penalty_changes_a_repetitive_greedy_output(client):
    ask = dict(model=BASE_ID, max_tokens=48, temperature=0,
               messages=[{"role": "user", "content": "Repeat the word 'tree' as many times as you can."}])
    plain = client.chat.completions.create(**ask).choices[0].message.content
    penalized = client.chat.completions.create(**ask, frequency_penalty=2.0).choices[0].message.content
    assert penalized != plain
    assert penalized.lower().count("tree") < plain.lower().count("tree"), (plain, penalized)


def test_logit_bias_forces_a_token_and_a_token_outside_the_vocabulary_is_refused(client):
    forced = client.completions.create(model=BASE_ID, prompt="Hello", max_tokens=3, temperature=0,
                                       logit_bias={"42": 100})
    with httpx.Client(base_url=str(client.base_url).rstrip("/").removesuffix("/v1"), timeout=60) as c:
        expected = c.post("/detokenize", json={"tokens": [42, 42, 42]}).json()["prompt"]
        counted = c.post("/tokenize", json={"prompt": "Hello there", "add_special_tokens": False}).json()
        assert c.post("/detokenize", json={"tokens": counted["tokens"]}).json()["prompt"] == "Hello there"
        assert counted["count"] == len(counted["tokens"]) > 0
        assert c.post("/detokenize", json={"tokens": [-1]}).status_code == 422
    assert forced.choices[0].text == expected
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE_ID, prompt="Hello", max_tokens=3, logit_bias={"10000000": 1})


def test_fields_at_openais_defaults_and_bookkeeping_fields_are_accepted(client):
    reply = client.chat.completions.create(model=BASE_ID, messages=CHAT, max_tokens=4, temperature=0, n=1,
                                           presence_penalty=0, frequency_penalty=0, response_format={"type": "text"},
                                           user="u-1")
    plain = client.chat.completions.create(model=BASE_ID, messages=CHAT, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content == plain.choices[0].message.content != ""
    assert reply.usage.completion_tokens == plain.usage.completion_tokens


def test_vllm_style_load_and_unload(server, client, tmp_path):
    folder = server.adapter_root / "runtime-lora"
    write_peft_folder(random_adapter("x", llama_base_shapes(30, 576, 1536, 192), seed=12, init_std=0.05), folder)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "rt", "lora_path": str(folder)}).status_code == 200
        assert "rt" in {m.id for m in client.models.list().data}
        assert client.completions.create(model="rt", prompt="Hi", max_tokens=3).choices[0].text is not None
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "rt"}).status_code == 200
        missing = c.post("/v1/load_lora_adapter", json={"lora_name": "rt2", "lora_path": str(server.adapter_root / "none")})
        assert missing.status_code == 400 and missing.json()["error"]["type"] == "invalid_request_error"
        write_peft_folder(random_adapter("y", llama_base_shapes(30, 576, 1536, 192), seed=13), tmp_path / "outside")
        (server.adapter_root / "link").symlink_to(tmp_path / "outside")
        for path in (tmp_path / "outside", server.adapter_root / "link", "/etc"):  # all outside the root
            refused = c.post("/v1/load_lora_adapter", json={"lora_name": "rt3", "lora_path": str(path)})
            assert refused.status_code == 400
            assert refused.json()["error"]["message"] == missing.json()["error"]["message"]  # says nothing more
    assert "rt" not in {m.id for m in client.models.list().data}


def test_n_choices_for_one_prompt_each_sampled_on_its_own(client):
    ask = dict(model=BASE_ID, max_tokens=12, temperature=1.0, seed=7, messages=CHAT, extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(n=3, **ask)
    alone = client.chat.completions.create(n=1, **ask)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1 and texts[0] == alone.choices[0].message.content  # seeds 7, 8, 9
    assert reply.usage.prompt_tokens == alone.usage.prompt_tokens and reply.usage.completion_tokens == 3 * 12
    streamed = {}
    for chunk in client.chat.completions.create(n=2, stream=True, stream_options={"include_usage": True}, **ask):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == 2 * 12
    assert streamed == {0: texts[0], 1: texts[1]}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(n=9, **ask)
    assert err.value.body["param"] == "n"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 32},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 16}}, "required": ["zone"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_required_or_named_tool_choice_returns_a_call_whose_arguments_parse(client, choice):
    reply = client.chat.completions.create(model=BASE_ID, messages=ASK_WEATHER, tools=[WEATHER, TIME],
                                           tool_choice=choice, max_tokens=64, temperature=0)
    choice_out = reply.choices[0]
    assert choice_out.finish_reason == "tool_calls" and choice_out.message.content is None
    (call,) = choice_out.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(choice, dict):
        assert call.function.name == "get_weather" and set(arguments) == {"city", "unit"}
    assert call.function.name in ("get_weather", "get_time")


def test_a_streamed_tool_call_and_the_tools_answer_in_the_next_turn(client):
    calls = {}
    for chunk in client.chat.completions.create(model=BASE_ID, messages=ASK_WEATHER, tools=[WEATHER],
                                                tool_choice="required", max_tokens=64, temperature=0, stream=True):
        for delta_call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            calls[delta_call.index] = delta_call
        if chunk.choices and chunk.choices[0].finish_reason:
            assert chunk.choices[0].finish_reason == "tool_calls"
    call = calls[0]
    json.loads(call.function.arguments)
    followed = client.chat.completions.create(model=BASE_ID, max_tokens=24, temperature=0, tools=[WEATHER], messages=[
        *ASK_WEATHER,
        {"role": "assistant", "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'}])
    assert followed.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_must_name_a_given_tool(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE_ID, messages=ASK_WEATHER, tools=[WEATHER], max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "tool_choice" in err.value.body["message"]


def test_an_earlier_tool_call_whose_arguments_are_not_a_json_object_is_refused(client):
    bad = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                "function": {"name": "get_weather", "arguments": "not json"}}]}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE_ID, max_tokens=4, tools=[WEATHER], messages=[*ASK_WEATHER, bad])
    assert err.value.body["param"] == "messages.1.tool_calls.0.function.arguments"


def test_tokenize_writes_an_earlier_call_into_the_text_for_a_template_without_a_tool_format(server):
    # the default model's template has no tool format: the call is shown as the model was asked to write it
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    structured = [*ASK_WEATHER, {"role": "assistant", "content": "", "tool_calls": [call]}]
    text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    written = [*ASK_WEATHER, {"role": "assistant", "content": text}]
    with httpx.Client(base_url=server.url) as c:
        tokens = [c.post("/tokenize", json={"messages": m}).json()["tokens"] for m in (structured, written)]
    assert tokens[0] == tokens[1]
