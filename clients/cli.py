"""`loraplex`: serve the API, manage adapters, generate and chat from a terminal."""

from __future__ import annotations

import json

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import httpx
import typer

from clients.python import DEFAULT_URL, AdapterInfo, LoraplexClient, LoraplexError, Message

app = typer.Typer(help="loraplex: one frozen base LLM, many LoRA adapters.", no_args_is_help=True,
                  add_completion=False)
adapters_app = typer.Typer(help="List, upload and delete adapters.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")

BASE = "base"
CHAT_HELP = "Type a message and press Enter. /adapter NAME switches persona (/adapter base: none), /quit exits."

AdapterOption = Annotated[list[str] | None, typer.Option(
    "--adapter", "-a", help="adapter NAME or NAME:WEIGHT; repeat it to mix adapters "
    "(--adapter pirate:0.7 --adapter butler:0.3); the base model if left out")]
MaxTokensOption = Annotated[int, typer.Option(min=1, help="most tokens to generate")]
TemperatureOption = Annotated[float | None, typer.Option(min=0.0, help="0 is greedy; the server's default if left out")]


def adapter_choice(values: list[str] | None) -> str | dict[str, float] | None:
    """--adapter values as the client takes them: one plain name, or {name: weight} for a weighted mix."""
    if not values:
        return None
    if len(values) == 1 and ":" not in values[0]:
        return values[0]
    mix: dict[str, float] = {}
    for value in values:
        name, _, weight = value.rpartition(":") if ":" in value else (value, "", "1")
        try:
            number = float(weight)
        except ValueError:
            number = None
        if not name or number is None or name in mix:
            raise typer.BadParameter(f"{value!r}: give NAME or NAME:WEIGHT, each name once", param_hint="--adapter")
        mix[name] = number
    return mix


def adapter_label(adapter: str | dict[str, float] | None) -> str:
    if isinstance(adapter, dict):
        return "+".join(f"{name}:{weight:g}" for name, weight in adapter.items())
    return adapter or BASE


@dataclass(frozen=True)
class Target:
    """The server every command talks to (the global options)."""

    url: str
    api_key: str | None


class LoraMode(str, Enum):
    auto = "auto"
    merged = "merged"
    unmerged = "unmerged"


@app.callback()
def main(ctx: typer.Context,
         url: Annotated[str, typer.Option(envvar="LORAPLEX_URL", help="the server's address")] = DEFAULT_URL,
         api_key: Annotated[str | None, typer.Option(envvar="LORAPLEX_API_KEY",
                                                     help="sent as 'Authorization: Bearer KEY'")] = None):
    ctx.obj = Target(url, api_key)


@contextmanager
def connect(ctx: typer.Context) -> Iterator[LoraplexClient]:
    """A client of the --url server; server errors and unreachable servers end the command with status 1."""
    try:
        with LoraplexClient(ctx.obj.url, api_key=ctx.obj.api_key) as client:
            yield client
    except LoraplexError as exc:
        fail(f"{exc.message} ({exc.code})")
    except httpx.TransportError as exc:
        fail(f"cannot reach the server at {ctx.obj.url}: {exc}")


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context,
          model: Annotated[Path | None, typer.Option(help="a local Hugging Face model folder")] = None,
          host: Annotated[str | None, typer.Option()] = None,
          port: Annotated[int | None, typer.Option()] = None,
          lora_mode: Annotated[LoraMode | None, typer.Option(help="merged, unmerged, or auto")] = None):
    """Serve the API here (other `python -m server` flags such as --store-dir pass through)."""
    from server.__main__ import main as serve_main  # torch loads only for this command

    argv = []
    for flag, value in (("--model", model), ("--host", host), ("--port", port), ("--lora-mode", lora_mode)):
        if value is not None:
            argv += [flag, value.value if isinstance(value, Enum) else str(value)]
    serve_main(argv + ctx.args)


@adapters_app.command("list")
def list_adapters(ctx: typer.Context):
    """List the registered adapters."""
    with connect(ctx) as client:
        adapters = client.list_adapters()
    if not adapters:
        typer.echo("no adapters")
        return
    rows = [("NAME", "RANK", "ALPHA", "TARGETS", "SIZE")] + [_row(a) for a in adapters]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _row(adapter: AdapterInfo) -> tuple[str, ...]:
    return (adapter.name, str(adapter.rank), f"{adapter.alpha:g}", ",".join(adapter.target_modules),
            _size(adapter.size_bytes))


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@adapters_app.command("upload")
def upload_adapter(ctx: typer.Context,
                   path: Annotated[Path, typer.Argument(exists=True, help="a PEFT adapter folder")],
                   name: Annotated[str, typer.Option("--name", "-n", help="the name requests will use")],
                   replace: Annotated[bool, typer.Option(help="swap an existing adapter of this name")] = False):
    """Upload a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    with connect(ctx) as client:
        info = client.upload_adapter(path, name, replace=replace)
    typer.echo(f"uploaded {info.name}: rank {info.rank}, alpha {info.alpha:g}, "
               f"{','.join(info.target_modules)}, {_size(info.size_bytes)}")


@adapters_app.command("delete")
def delete_adapter(ctx: typer.Context, name: str):
    """Delete an adapter; requests already running finish with it."""
    with connect(ctx) as client:
        client.delete_adapter(name)
    typer.echo(f"deleted {name}")


@app.command()
def generate(ctx: typer.Context, prompt: str, adapter: AdapterOption = None, max_new_tokens: MaxTokensOption = 128,
             temperature: TemperatureOption = None,
             chat: Annotated[bool, typer.Option(help="send PROMPT as a user message (the chat template)")] = False,
             json_schema: Annotated[Path | None, typer.Option(
                 exists=True, dir_okay=False, help="a JSON schema file the output must validate against")] = None,
             regex: Annotated[str | None, typer.Option(help="a regex the output must match")] = None,
             n: Annotated[int, typer.Option("--n", "-n", min=1, help="choices for the prompt, printed one after "
                                            "another once all are done")] = 1):
    """Stream a continuation of PROMPT to stdout (with -n, print each of the choices)."""
    inputs = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    if json_schema is not None:
        inputs["json_schema"] = json.loads(json_schema.read_text())
    if regex is not None:
        inputs["regex"] = regex
    params = dict(adapter=adapter_choice(adapter), max_new_tokens=max_new_tokens, temperature=temperature)
    with connect(ctx) as client:
        if n > 1:
            for i, choice in enumerate(client.generate(**inputs, **params, n=n).choices):
                typer.echo(f"--- choice {i} ({choice.finish_reason}) ---\n{choice.text}")
            return
        for piece in client.stream(**inputs, **params).text():
            typer.echo(piece, nl=False)
    typer.echo()


@app.command()
def chat(ctx: typer.Context, adapter: AdapterOption = None, max_new_tokens: MaxTokensOption = 256,
         temperature: TemperatureOption = None,
         system: Annotated[str | None, typer.Option(help="a system message opening the conversation")] = None):
    """Chat line by line from stdin, keeping the history; /adapter NAME switches persona, /quit exits."""
    adapter = adapter_choice(adapter)
    interactive = sys.stdin.isatty()
    history: list[Message] = [{"role": "system", "content": system}] if system else []
    if interactive:
        typer.echo(CHAT_HELP)
    with connect(ctx) as client:
        for line in _read_lines("you> " if interactive else ""):
            command, _, argument = line.strip().partition(" ")
            if command == "/quit":
                break
            if command == "/adapter":
                adapter = _switch(client, adapter, argument.strip())
            elif line.strip():
                _reply(client, history, line.strip(), adapter, max_new_tokens=max_new_tokens, temperature=temperature)


def _read_lines(prompt: str) -> Iterator[str]:
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            return


def _switch(client: LoraplexClient, current, name: str) -> str | None:
    if name in ("", BASE):
        typer.echo(f"persona: {BASE}")
        return None
    try:
        client.get_adapter(name)
    except LoraplexError as exc:
        typer.echo(f"error: {exc.message}; still talking to {adapter_label(current)}", err=True)
        return current
    typer.echo(f"persona: {name}")
    return name


def _reply(client: LoraplexClient, history: list[Message], text: str, adapter, **params) -> None:
    history.append({"role": "user", "content": text})
    typer.echo(f"{adapter_label(adapter)}> ", nl=False)
    stream = client.stream(messages=history, adapter=adapter, **params)
    try:
        for piece in stream.text():
            typer.echo(piece, nl=False)
    except LoraplexError as exc:
        history.pop()  # the turn never happened; the next message must not follow an unanswered one
        typer.echo()
        typer.echo(f"error: {exc.message} ({exc.code})", err=True)
        return
    typer.echo()
    history.append({"role": "assistant", "content": stream.result.text})


if __name__ == "__main__":
    app()
