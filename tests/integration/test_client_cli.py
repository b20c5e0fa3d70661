"""The Python client and the `loraplex` command against a real server process and the real default model."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters import llama_base_shapes, random_adapter, write_peft_folder
from clients.cli import app
from clients.python import (
    AdapterExistsError, AdapterNotFoundError, AsyncLoraplexClient, InvalidRequestError, LoraplexClient,
)

pytestmark = pytest.mark.integration

SMOLLM2_SHAPES = llama_base_shapes(30, 576, 1536, 192)
CHAT = [{"role": "user", "content": "Say hello to the crew."}]
FAST = {"max_new_tokens": 8, "temperature": 0.0}
FAST_FLAGS = ["--max-new-tokens", "8", "--temperature", "0"]

runner = CliRunner()


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("crew")
    write_peft_folder(random_adapter("crew", SMOLLM2_SHAPES, seed=1, init_std=0.05), folder)
    return folder


def cli(server, *args: str, input: str | None = None):
    return runner.invoke(app, ["--url", server.url, *args], input=input)


def test_client_upload_generate_stream_delete(server, peft_folder):
    with LoraplexClient(server.url) as client:
        info = client.upload_adapter(peft_folder, "crew")
        assert (info.name, info.rank, info.target_modules) == ("crew", 8, ["q_proj", "v_proj"])
        assert client.get_adapter("crew") == info and "crew" in [a.name for a in client.list_adapters()]
        with pytest.raises(AdapterExistsError):
            client.upload_adapter(peft_folder, "crew")

        base = client.chat(CHAT, **FAST)
        tuned = client.chat(CHAT, adapter="crew", **FAST)
        assert base.adapter is None and tuned.adapter == "crew"
        assert tuned.text and tuned.text != base.text, "the adapter should change the reply"

        stream = client.stream(messages=CHAT, adapter="crew", **FAST)
        pieces = list(stream.text())
        assert len(pieces) >= 2, "the reply should arrive in pieces"
        assert "".join(pieces) == stream.result.text == tuned.text
        assert stream.result.usage == tuned.usage and stream.result.finish_reason == tuned.finish_reason

        client.delete_adapter("crew")
        with pytest.raises(AdapterNotFoundError) as caught:
            client.chat(CHAT, adapter="crew", **FAST)
        assert caught.value.status == 404 and caught.value.code == "adapter_not_found"
        with pytest.raises(AdapterNotFoundError):
            list(client.stream(messages=CHAT, adapter="crew", **FAST))
        with pytest.raises(InvalidRequestError):
            client.generate("hi", max_new_tokens=0)
        assert client.health().status == "ok"


def test_async_client_matches_sync(server, peft_folder):
    async def run():
        async with AsyncLoraplexClient(server.url) as client:
            await client.upload_adapter(peft_folder, "async-crew")
            result = await client.chat(CHAT, adapter="async-crew", **FAST)
            stream = client.stream(messages=CHAT, adapter="async-crew", **FAST)
            text = "".join([piece async for piece in stream.text()])
            await client.delete_adapter("async-crew")
            return result, text

    result, streamed = asyncio.run(run())
    with LoraplexClient(server.url) as client:
        client.upload_adapter(peft_folder, "sync-crew")
        expected = client.chat(CHAT, adapter="sync-crew", **FAST).text
        client.delete_adapter("sync-crew")
    assert result.text == streamed == expected


def test_cli_adapters_and_generate(server, peft_folder):
    uploaded = cli(server, "adapters", "upload", str(peft_folder), "--name", "cli-crew")
    assert uploaded.exit_code == 0, uploaded.output
    assert "uploaded cli-crew: rank 8" in uploaded.stdout

    listed = cli(server, "adapters", "list")
    assert listed.exit_code == 0 and "cli-crew" in listed.stdout and "q_proj,v_proj" in listed.stdout

    generated = cli(server, "generate", CHAT[0]["content"], "--chat", "--adapter", "cli-crew", *FAST_FLAGS)
    assert generated.exit_code == 0, generated.output
    with LoraplexClient(server.url) as client:
        assert generated.stdout == client.chat(CHAT, adapter="cli-crew", **FAST).text + "\n"

    taken = cli(server, "adapters", "upload", str(peft_folder), "--name", "cli-crew")
    assert taken.exit_code == 1 and "adapter_exists" in taken.stderr
    replaced = cli(server, "adapters", "upload", str(peft_folder), "--name", "cli-crew", "--replace")
    assert replaced.exit_code == 0, replaced.output
    assert cli(server, "adapters", "delete", "cli-crew").stdout == "deleted cli-crew\n"
    gone = cli(server, "generate", "Ahoy", "--adapter", "cli-crew", *FAST_FLAGS)
    assert gone.exit_code == 1 and "adapter_not_found" in gone.stderr
    assert "cli-crew" not in cli(server, "adapters", "list").stdout


def test_cli_chat_keeps_history_across_a_persona_switch(server, peft_folder):
    with LoraplexClient(server.url) as client:
        client.upload_adapter(peft_folder, "chat-crew")
    lines = ["Say hello to the crew.", "/adapter chat-crew", "And now in one word?", "/adapter nobody",
             "/quit", "never sent"]
    result = cli(server, "chat", *FAST_FLAGS, input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output

    with LoraplexClient(server.url) as client:
        first = client.chat(CHAT, **FAST).text
        history = [*CHAT, {"role": "assistant", "content": first}, {"role": "user", "content": lines[2]}]
        second = client.chat(history, adapter="chat-crew", **FAST).text
        client.delete_adapter("chat-crew")
    assert result.stdout == f"base> {first}\npersona: chat-crew\nchat-crew> {second}\n"
    assert "still talking to chat-crew" in result.stderr


def test_console_script_is_installed(server):
    script = Path(sys.executable).parent / "loraplex"
    done = subprocess.run([str(script), "--url", server.url, "generate", "Ahoy", *FAST_FLAGS],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_structured_output_from_the_client_and_the_command(server, tmp_path):
    import json

    schema = {"type": "object", "properties": {"crew": {"type": "integer", "minimum": 1, "maximum": 99}},
              "required": ["crew"], "additionalProperties": False}
    with LoraplexClient(server.url) as client:
        result = client.chat(CHAT, json_schema=schema, max_new_tokens=24, temperature=0.0)
        assert set(json.loads(result.text)) == {"crew"}
        year = client.generate("The ship was built in the year", regex="1[0-9]{3}", max_new_tokens=8,
                               temperature=0.0)
        assert len(year.text) == 4 and year.text.startswith("1")
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    out = cli(server, "generate", "How many sailors?", "--chat", "--json-schema", str(tmp_path / "schema.json"),
              "--max-new-tokens", "24", "--temperature", "0")
    assert out.exit_code == 0, out.output
    assert set(json.loads(out.output)) == {"crew"}


def test_n_choices_from_the_client_its_streams_and_the_command(server):
    seeded = {"max_new_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3}
    with LoraplexClient(server.url) as client:
        result = client.generate("Ahoy", **seeded)
        stream = client.stream("Ahoy", **seeded)
        chunks = list(stream)
        solo = [client.generate("Ahoy", **{**seeded, "n": 1, "seed": 7 + i}).text for i in range(3)]
    assert [c.text for c in result.choices] == solo  # choice i samples with seed + i, as alone
    assert result.text == solo[0] and result.usage.completion_tokens == sum(c.completion_tokens for c in result.choices)
    assert {c.index for c in chunks} == {0, 1, 2} and [c.text for c in stream.result.choices] == solo
    assert stream.result.usage == result.usage

    async def run():
        async with AsyncLoraplexClient(server.url) as client:
            return await client.generate("Ahoy", **seeded)
    assert asyncio.run(run()) == result

    out = cli(server, "generate", "Ahoy", "-n", "2", *FAST_FLAGS)
    assert out.exit_code == 0, out.output
    assert "--- choice 0" in out.output and "--- choice 1" in out.output


def test_n_past_the_limit_is_refused(server):
    with LoraplexClient(server.url) as client, pytest.raises(InvalidRequestError):
        client.generate("Ahoy", n=9, **FAST)
