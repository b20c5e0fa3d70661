"""An adapter's chat template read from its folder: the template file wins over tokenizer_config.json, links
are passed over, and a mix keeps a template only its members share."""

import dataclasses
import json
import os

import pytest

from adapters import llama_base_shapes, random_adapter, read_peft_folder, write_peft_folder
from adapters.chat_template import read_template
from adapters.errors import AdapterInvalid, AdapterTooLarge
from adapters.mix import mix_adapters

BASE = llama_base_shapes(num_layers=2, hidden=16, intermediate=32, kv_dim=8)
ROLES = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"


def test_the_template_file_wins_over_the_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config " + ROLES}))
    assert read_template(tmp_path) == "config " + ROLES
    (tmp_path / "chat_template.jinja").write_text("file " + ROLES)
    assert read_template(tmp_path) == "file " + ROLES


def test_named_templates_serve_chats_with_the_default_one(tmp_path):
    named = [{"name": "tool_use", "template": "tools " + ROLES}, {"name": "default", "template": ROLES}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert read_template(tmp_path) == ROLES
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named[:1]}))
    with pytest.raises(AdapterInvalid, match="default"):
        read_template(tmp_path)


def test_a_linked_template_is_passed_over_and_a_huge_one_refused(tmp_path):
    (tmp_path / "elsewhere.jinja").write_text(ROLES)
    os.symlink(tmp_path / "elsewhere.jinja", tmp_path / "chat_template.jinja")
    assert read_template(tmp_path) is None
    os.unlink(tmp_path / "chat_template.jinja")
    (tmp_path / "chat_template.jinja").write_text(ROLES + " " * 70_000)
    with pytest.raises(AdapterTooLarge):
        read_template(tmp_path)


def test_a_folder_read_carries_its_template_and_writes_it_back(tmp_path):
    write_peft_folder(random_adapter("x", BASE), tmp_path / "a")
    (tmp_path / "a" / "chat_template.jinja").write_text(ROLES)
    adapter = read_peft_folder(tmp_path / "a", "a")
    assert adapter.chat_template == ROLES
    write_peft_folder(adapter, tmp_path / "b")
    assert read_peft_folder(tmp_path / "b", "b").chat_template == ROLES


def test_a_mix_keeps_a_template_only_its_members_share():
    with_template = [random_adapter(n, BASE, seed=i) for i, n in enumerate("ab")]
    with_template = [dataclasses.replace(a, chat_template=ROLES) for a in with_template]
    plain = random_adapter("c", BASE, seed=3)
    assert mix_adapters([(with_template[0], 0.5)]).chat_template == ROLES
    assert mix_adapters([(with_template[0], 0.5), (with_template[1], 0.5)]).chat_template == ROLES
    assert mix_adapters([(with_template[0], 0.5), (plain, 0.5)]).chat_template is None
