"""The trainer on the real base model: two steps on a tiny dataset give a PEFT folder that PEFT and loraplex load."""

import json

import pytest
import torch
from safetensors.torch import load_file

from adapters import read_peft_folder
from adapters.training.datasets import chat, write_jsonl
from adapters.training.train import encode_example, train

pytestmark = pytest.mark.integration


def test_labels_cover_only_the_response_and_its_end_of_turn(default_model_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_folder.path))
    ids, labels = encode_example(tokenizer, chat("Ahoy?", "Arr, matey!"))
    answer = [i for i in labels if i != -100]
    assert tokenizer.decode(answer) == "Arr, matey!<|im_end|>"
    assert ids[-len(answer):] == answer and len(ids) == len(labels)


def test_two_steps_write_a_folder_peft_and_loraplex_load(tmp_path, default_model_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "tiny.jsonl"
    write_jsonl(data, [chat(f"Tell me about {t}.", f"Arr, {t} be grand, matey!") for t in ("tea", "rain", "cats")])
    out = tmp_path / "tiny"
    summary = train(data, out, str(default_model_folder.path), rank=4, alpha=8.0, targets=["q_proj", "v_proj"],
                    steps=2, lr=1e-3, batch_size=2, max_len=64, warmup=0, seed=0)
    assert summary["steps"] == 2 and json.loads((out / "training.json").read_text())["examples"] == 3

    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 30 * 2 * 2 and all(t.dtype == torch.float32 for t in tensors.values())
    assert all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert any(t.abs().max() > 0 for k, t in tensors.items() if ".lora_B." in k)  # B left zero init: it trained

    base = AutoModelForCausalLM.from_pretrained(str(default_model_folder.path), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out)
    loaded = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.equal(loaded, tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    adapter = read_peft_folder(out, "tiny")
    assert (adapter.rank, adapter.alpha, adapter.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
