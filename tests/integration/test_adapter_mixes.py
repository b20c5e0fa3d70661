"""Weighted mixes of the shipped personas on the real default model: a 50/50 mix of pirate and butler in a
batch with a single-adapter and a base request equals PEFT's add_weighted_adapter(combination_type="cat")
greedy, token for token; a scale of 0 is the base, a scale of 1 the adapter; a mix is never merged; and over
HTTP `/generate` and `/v1` take the mix and refuse bad ones with a reason.

The engine tests serve the base in fp32 (quantization none), as PEFT computes it.
"""

import asyncio

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters import read_peft_folder
from adapters.training.evaluate import SHIPPED
from adapters.mix import mix_adapters
from server.engine.request import SamplingParams
from server.runtime import Runtime
from server.settings import Settings
from tests.integration.server_process import ServerProcess

pytestmark = pytest.mark.integration

MAX_NEW = 24
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0)
QUESTION = "Any advice on learning to play tennis?"
PERSONAS = ("pirate", "butler")


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    runtime = Runtime(Settings(store_dir=tmp_path_factory.mktemp("store"), max_batch=8, max_seq_len=512, threads=1,
                               quantization="none"))
    for name in PERSONAS:
        runtime.registry.add(read_peft_folder(SHIPPED / name, name), persist=False)
    yield runtime
    runtime.stop()


@pytest.fixture(scope="module")
def prompt(rt) -> list[int]:
    return rt.encode(messages=[{"role": "user", "content": QUESTION}])


async def _tokens(rt: Runtime, prompt_ids: list[int], adapter) -> list[int]:
    tokens = []
    async for event in rt.engine.stream(prompt_ids, GREEDY, adapter):
        tokens += event.token_ids
        if event.finished:
            assert event.finish_reason in ("stop", "length"), event
            return tokens
    raise AssertionError("the stream ended without a finished event")


def run_together(rt: Runtime, prompt_ids: list[int], adapters: list) -> list[list[int]]:
    async def all_at_once():
        return await asyncio.gather(*(_tokens(rt, prompt_ids, adapter) for adapter in adapters))
    return asyncio.run(all_at_once())


@pytest.fixture(scope="module")
def peft_cat(rt, prompt) -> list[int]:
    """transformers + PEFT, fp32: pirate and butler combined by add_weighted_adapter("cat", [0.5, 0.5])."""
    hf = AutoModelForCausalLM.from_pretrained(str(rt.folder.path), dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, str(SHIPPED / "pirate"), adapter_name="pirate")
    model.load_adapter(str(SHIPPED / "butler"), adapter_name="butler")
    model.add_weighted_adapter(["pirate", "butler"], [0.5, 0.5], "mix", combination_type="cat")
    model.set_adapter("mix")
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(prompt):]
    eos = set(rt.engine.eos_ids)
    tokens = out.tolist()
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)  # the engine sends no EOS token


def test_a_half_and_half_mix_in_a_mixed_batch_equals_peft_cat(rt, prompt, peft_cat):
    pirate, butler = (rt.registry.get(name) for name in PERSONAS)
    mix = rt.mixes.get([(pirate, 0.5), (butler, 0.5)])
    steps = rt.engine.stats.steps
    got_mix, got_pirate, got_base = run_together(rt, prompt, [mix, pirate, None])
    assert rt.engine.stats.steps - steps <= MAX_NEW + 1  # one batch, not three runs
    assert got_mix == peft_cat and len(peft_cat) > MAX_NEW // 2
    assert got_mix != got_pirate and got_mix != got_base  # the mix is neither of its neighbours


def test_a_scale_of_zero_is_the_base_and_a_scale_of_one_the_adapter(rt, prompt):
    pirate = rt.registry.get("pirate")
    assert rt.mixes.get([(pirate, 1.0)]) is pirate  # served as the adapter itself, slot and all
    at_one = mix_adapters([(pirate, 1.0)])  # and the concatenated form of it computes the same
    zero, base, one, plain = run_together(rt, prompt, [rt.mixes.get([(pirate, 0.0)]), None, at_one, pirate])
    assert zero == base
    assert one == plain != base


def test_a_lone_mix_is_served_unmerged(rt, prompt):
    """auto merges an adapter that has the batch to itself (fp32); a mix it leaves as side branches."""
    mix = rt.mixes.get([(rt.registry.get("pirate"), 0.7), (rt.registry.get("butler"), 0.3)])
    merges = rt.engine.stats.merges
    run_together(rt, prompt, [mix])
    assert rt.engine.stats.merges == merges


# ---- over HTTP

@pytest.fixture(scope="module")
def http(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("store"), "--preload-dir", str(SHIPPED), "--threads", "1")
    proc.start()
    try:
        with proc.client() as client:
            yield client
    finally:
        proc.stop()


MIX = [{"name": "pirate", "weight": 0.5}, {"name": "butler", "weight": 0.5}]
ASK = {"messages": [{"role": "user", "content": QUESTION}], "max_new_tokens": 12, "temperature": 0}


def test_generate_and_chat_completions_serve_the_same_mix(http):
    native = http.post("/generate", json={**ASK, "adapters": MIX})
    assert native.status_code == 200, native.text
    assert native.json()["adapters"] == MIX and native.json()["adapter"] is None
    model = http.get("/v1/models").json()["data"][0]["id"]
    chat = http.post("/v1/chat/completions", json={"model": model, "messages": ASK["messages"], "max_tokens": 12,
                                                   "temperature": 0, "adapters": MIX})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == native.json()["text"]
    plain = http.post("/generate", json={**ASK, "adapter": "pirate"}).json()["text"]
    scaled = http.post("/generate", json={**ASK, "adapters": [{"name": "pirate"}]}).json()["text"]
    assert scaled == plain != native.json()["text"]


@pytest.mark.parametrize("adapters, reason", [
    ([{"name": "pirate", "weight": 0.1}] * 5, "5 adapters in one request; the limit is 4"),
    ([{"name": "pirate", "weight": 2.5}], "outside"),
    ([{"name": "pirate", "weight": -3}], "outside"),
    ([], "at least 1"),
    ([{"name": "pirate", "scale": 0.5}], "scale"),
])
def test_a_bad_mix_is_refused_with_a_reason(http, adapters, reason):
    r = http.post("/generate", json={**ASK, "adapters": adapters})
    assert r.status_code == 422 and reason in r.json()["error"]["message"], r.text


def test_adapter_and_adapters_together_are_refused(http):
    r = http.post("/generate", json={**ASK, "adapter": "pirate", "adapters": MIX})
    assert r.status_code == 422 and "not both" in r.json()["error"]["message"], r.text
    chat = http.post("/v1/chat/completions", json={"model": "pirate", "messages": ASK["messages"], "adapters": MIX})
    assert chat.status_code == 400 and "`adapters`" in chat.json()["error"]["message"], chat.text


def test_an_unknown_name_in_a_mix_fails_as_it_does_alone(http):
    alone = http.post("/generate", json={**ASK, "adapter": "kraken"})
    mixed = http.post("/generate", json={**ASK, "adapters": [*MIX, {"name": "kraken", "weight": 1}]})
    assert mixed.status_code == alone.status_code and mixed.json() == alone.json()


def test_completions_refuse_an_out_of_range_weight_as_openai_clients_expect(http):
    model = http.get("/v1/models").json()["data"][0]["id"]
    r = http.post("/v1/completions", json={"model": model, "prompt": "Ahoy", "max_tokens": 4,
                                          "adapters": [{"name": "pirate", "weight": 9}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
