"""Structured output on a real server: JSON schemas, any JSON object and regexes, through the official
`openai` package and /generate, with persona adapters, inside mixed batches with unconstrained requests."""

import asyncio
import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.integration.server_process import ServerProcess

pytestmark = pytest.mark.integration

SHIPPED = Path(__file__).resolve().parents[2] / "adapters" / "shipped"
BASE_ID = "SmolLM2-135M-Instruct"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
SHIP = {"type": "object", "properties": {"ship": {"type": "string", "maxLength": 24},
                                         "crew": {"type": "array", "items": {"type": "string", "maxLength": 16},
                                                  "maxItems": 3}},
        "required": ["ship", "crew"], "additionalProperties": False}
ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
          "required": ["answer", "sure"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("store"), "--preload-dir", str(SHIPPED), "--threads", "1")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_a_json_schema_request_through_a_persona_returns_json_that_validates(client):
    reply = client.chat.completions.create(
        model="pirate", max_tokens=80, temperature=0, response_format=json_format(PERSON),
        messages=[{"role": "user", "content": "Invent a sailor and give his name and age."}])
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_returns_an_object(client):
    reply = client.chat.completions.create(
        model=BASE_ID, max_tokens=80, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as JSON."}])
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_eight_constrained_requests_for_different_adapters_run_with_unconstrained_ones(server):
    adapters = ["pirate", "butler", "coach", "summarizer", "qa", BASE_ID, "pirate", "butler"]
    schemas = [PERSON, SHIP, ANSWER, PERSON, ANSWER, SHIP, ANSWER, PERSON]
    ask = [{"role": "user", "content": "Answer in JSON about the sea."}]

    async def everything():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        constrained = [client.chat.completions.create(model=a, messages=ask, max_tokens=96, temperature=0.7, seed=1,
                                                      response_format=json_format(s))
                       for a, s in zip(adapters, schemas)]
        free = [client.chat.completions.create(model=a, max_tokens=32, temperature=0,
                                               messages=[{"role": "user", "content": "Tell me about the sea."}])
                for a in ("pirate", BASE_ID, "coach", "qa")]
        try:
            return await asyncio.gather(*constrained, *free)
        finally:
            await client.close()

    replies = [r.choices[0] for r in asyncio.run(everything())]
    for reply, schema in zip(replies, schemas):
        assert reply.finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.message.content), schema)
    assert all(r.finish_reason in ("stop", "length") and r.message.content for r in replies[len(schemas):])


def test_a_regex_holds_the_output_on_generate(server):
    with server.client() as c:
        r = c.post("/generate", json={"prompt": "The year the ship sailed:", "max_new_tokens": 16, "temperature": 0,
                                      "regex": "[12][0-9]{3}"})
    assert r.status_code == 200, r.text
    assert re.fullmatch("[12][0-9]{3}", r.json()["text"])


def test_an_unusable_schema_is_refused_before_anything_is_queued(server, client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE_ID, max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                                       response_format=json_format({"type": "object", "properties": 5}))
    assert "schema" in err.value.body["message"]
    with server.client() as c:
        r = c.post("/generate", json={"prompt": "x", "regex": "(unclosed", "max_new_tokens": 4})
        both = c.post("/generate", json={"prompt": "x", "regex": "a", "json_schema": {}, "max_new_tokens": 4})
    assert r.status_code == 422 and "regex" in r.text
    assert both.status_code == 422 and "not both" in both.text


def test_an_unknown_response_format_is_refused_naming_it(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE_ID, max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "xml"})
    assert err.value.body["param"] == "response_format.type"
