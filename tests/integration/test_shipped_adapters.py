"""The shipped adapters do their jobs: each beats the base model on its own metric, on held-out prompts,
served by loraplex's engine (a subset of `python -m adapters.training.evaluate`)."""

import pytest

from adapters.training.evaluate import SHIPPED, TASKS, evaluate

pytestmark = pytest.mark.integration

# Clear margins, not just "better": a full run measures much larger gaps (adapters/shipped/metrics.json).
MARGIN = {"style": 0.5, "rouge_l": 0.15, "exact_match": 0.3}


@pytest.fixture(scope="module")
def results():
    return evaluate(limit=8)


def test_every_shipped_adapter_registers_at_start_up():
    assert sorted(p.name for p in SHIPPED.iterdir() if (p / "adapter_config.json").is_file()) == sorted(TASKS)
    assert all(not p.is_dir() or (p / "adapter_config.json").is_file() for p in SHIPPED.iterdir())


@pytest.mark.parametrize("name", list(TASKS))
def test_adapter_beats_the_base_on_its_metric(results, name):
    r = results[name]
    metric = r["primary"]
    assert r["adapter"][metric] >= r["base"][metric] + MARGIN[metric], r


@pytest.mark.parametrize("name", ["pirate", "butler", "coach"])
def test_personas_stay_on_topic(results, name):
    assert results[name]["adapter"]["on_topic"] >= 0.5, results[name]


@pytest.mark.parametrize("name", list(TASKS))
def test_adapter_size(name):
    assert (SHIPPED / name / "adapter_model.safetensors").stat().st_size <= 5 * 1024 * 1024


def test_make_serve_answers_the_readme_persona_example(tmp_path):
    """`make serve` preloads adapters/shipped, so the README's first example answers in the pirate's voice."""
    import subprocess

    from adapters.training.datasets.persona import PERSONAS, marker_pattern
    from tests.integration.server_process import ServerProcess

    serve = subprocess.run(["make", "-n", "serve"], capture_output=True, text=True, check=True).stdout
    assert "-m server" in serve and "--preload-dir adapters/shipped" in serve
    proc = ServerProcess(tmp_path / "store", "--preload-dir", str(SHIPPED))
    proc.start()
    try:
        with proc.client() as http:
            assert sorted(a["name"] for a in http.get("/adapters").json()["adapters"]) == sorted(TASKS)
            reply = http.post("/generate", json={"messages": [{"role": "user", "content": "Any advice on tennis?"}],
                                                 "adapter": "pirate", "max_new_tokens": 48, "temperature": 0}).json()
    finally:
        proc.stop()
    assert reply["adapter"] == "pirate"
    assert marker_pattern(PERSONAS["pirate"]).search(reply["text"]) and "tennis" in reply["text"].lower(), reply
