"""The `loraplex` command without a server: argument handling and unreachable servers."""

import pytest
from typer.testing import CliRunner

from clients.cli import adapter_choice, app

runner = CliRunner()


def test_serve_passes_given_flags_and_unknown_ones_through(monkeypatch):
    import server.__main__

    seen = []
    monkeypatch.setattr(server.__main__, "main", seen.append)
    result = runner.invoke(app, ["serve", "--port", "9001", "--lora-mode", "unmerged", "--store-dir", "/tmp/s"])
    assert result.exit_code == 0, result.output
    assert seen == [["--port", "9001", "--lora-mode", "unmerged", "--store-dir", "/tmp/s"]]


def test_serve_refuses_an_unknown_lora_mode():
    result = runner.invoke(app, ["serve", "--lora-mode", "sideways"])
    assert result.exit_code == 2


@pytest.mark.parametrize("args", [["adapters", "list"], ["generate", "hi"], ["adapters", "delete", "x"]])
def test_unreachable_server_is_a_clear_error(args):
    result = runner.invoke(app, ["--url", "http://127.0.0.1:9", *args])
    assert result.exit_code == 1
    assert "cannot reach the server at http://127.0.0.1:9" in result.stderr


def test_url_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LORAPLEX_URL", "http://127.0.0.1:9")
    result = runner.invoke(app, ["adapters", "list"])
    assert "http://127.0.0.1:9" in result.stderr


@pytest.mark.parametrize("values, choice", [
    (None, None),
    (["pirate"], "pirate"),
    (["pirate:0.5"], {"pirate": 0.5}),
    (["pirate:0.7", "butler:0.3"], {"pirate": 0.7, "butler": 0.3}),
    (["pirate", "butler:-1"], {"pirate": 1.0, "butler": -1.0}),
])
def test_adapter_options_become_a_name_or_a_weighted_mix(values, choice):
    assert adapter_choice(values) == choice


@pytest.mark.parametrize("values", [["pirate:lots"], [":0.5"], ["pirate:0.5", "pirate:0.2"]])
def test_a_malformed_adapter_option_is_a_usage_error(values):
    result = runner.invoke(app, ["--url", "http://127.0.0.1:9", "generate", "hi",
                                 *[arg for v in values for arg in ("--adapter", v)]])
    assert result.exit_code == 2 and "NAME:WEIGHT" in result.output + result.stderr
