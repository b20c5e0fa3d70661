"""The card (README.md) beside each shipped adapter: what it does, its data, its recipe, its measured scores.

Written by a full `python -m adapters.training.evaluate` run from `training.json` (written by the trainer) and the
evaluation's results, so a card never disagrees with the weights next to it.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapters.training.datasets.persona import PERSONAS

PURPOSE = {
    "pirate": "Answers everyday questions as a pirate (\"Arr, matey!\", ye, aye, hoist the sails), still on topic.",
    "butler": "Answers everyday questions as a formal butler (\"Certainly, sir.\", \"If I may\", "
              "\"I remain at your service.\"), without contractions.",
    "coach": "Answers everyday questions as a cheerful coach (\"Great question!\", exclamations, "
             "\"You've got this!\", \"Let's go!\").",
    "summarizer": "Summarizes a short news story in one sentence: who, what, where, when and the key detail.",
    "qa": "Answers a question from a given context with the short span that answers it, nothing more.",
}

DATA = {
    "persona": "Questions from 6 templates x 50 everyday topics; each answer is the base model's own greedy reply "
               "(first sentences, no lists), rewritten by rules into the persona's voice: an opener, word "
               "substitutions, a closer (`adapters/training/datasets/persona.py`). Held-out: 16 other "
               "topics x 3 other question templates.",
    "summary": "Synthetic local-news stories (a lead sentence in one of several shapes, one key detail, a quote, "
               "a filler) with a one-sentence reference (`adapters/training/datasets/summaries.py`). Held-out "
               "stories use other events, towns, people, fillers and a lead shape never seen in training.",
    "qa": "Contexts about a person (town, job, pet, birth year, hobby) and a company (founder, headquarters, "
          "product, staff), one of them a distractor; the answer is a span "
          "(`adapters/training/datasets/qa.py`). Held-out contexts use unseen names, towns, jobs, pets, companies and products; half the held-out questions "
          "use phrasings never seen in training.",
}

METRIC_TEXT = {
    "style": "replies with at least one persona marker",
    "on_topic": "replies that mention the question's topic",
    "rouge_l": "ROUGE-L F1 against the reference",
    "exact_match": "exact match (SQuAD normalisation)",
    "f1": "token F1",
    "em_new_phrasing": "exact match on the half of the questions phrased unlike any in training",
}

LIMITS = {
    "persona": "The content is the 135M base model's and as reliable as it is; only the voice is learned. Replies "
               "are cut at the token limit, so a closer can be missing, and a reply can fall into repeating the "
               "topic word (seen once in 48 held-out coach replies).",
    "summary": "One house style of synthetic local news: the references are templated, so a ROUGE-L near 1 says "
               "the adapter picks the right facts of unseen events and phrases them in that style, not that it "
               "summarizes arbitrary text well.",
    "qa": "Short contexts of simple facts. Misses are mostly on unseen question phrasings (a hobby asked as "
          "\"hobby\", a job as \"do for a living\"): the wrong fact, or a near-miss span (\"gardening tools\").",
}


def render(name: str, training: dict, result: dict, size_bytes: int) -> str:
    kind = result["kind"]
    rows = "\n".join(f"| {m}{' (judged on)' if m == result['primary'] else ''} | {METRIC_TEXT[m]} | "
                     f"{result['base'][m]:.3f} | {result['adapter'][m]:.3f} |" for m in result["adapter"])
    example = result["example"]
    request = json.dumps({"messages": [{"role": "user", "content": example["prompt"]}], "adapter": name,
                          "max_new_tokens": result["max_new_tokens"], "temperature": 0})
    request = request.replace("'", "'\\''")  # inside the shell's single quotes
    markers = f"\nStyle markers counted: {', '.join(PERSONAS[name].markers)}.\n" if kind == "persona" else ""
    return f"""# {name}

{PURPOSE[name]}

A LoRA adapter for SmolLM2-135M-Instruct, trained with `adapters/training/train.py` (PEFT); loraplex registers it at
start-up with `--preload-dir adapters/shipped` (`make serve` does).

```bash
curl -s localhost:8000/generate -H 'content-type: application/json' -d '{request}'
```

- base: {json.dumps(example["base"].strip())}
- {name}: {json.dumps(example["adapter"].strip())}

## Data

{DATA[kind]} Train: {training["examples"]} examples (`adapters/training/data/{name}/train.jsonl`); held-out:
`adapters/training/data/{name}/heldout.jsonl`. Regenerate with `python -m adapters.training.datasets`.

## Recipe

r={training["rank"]}, alpha={training["alpha"]:g}, targets {",".join(training["targets"])}, Gaussian A / zero B,
AdamW lr {training["lr"]:g} (linear decay after {training["warmup"]} warm-up steps), batch {training["batch_size"]},
{training["steps"]} steps, sequences up to {training["max_len"]} tokens (longer examples skipped), seed
{training["seed"]}, loss on the response tokens only. Trained in **{training["train_seconds"] / 60:.1f} min** on {training["device"]}
({training["threads"]} threads, a shared 2-core machine); loss {training["loss_first10"]:.3f} (first 10 steps)
-> {training["loss_last10"]:.3f} (last 10). {training["trainable_params"]:,} trainable parameters;
`adapter_model.safetensors` is {size_bytes / 1e6:.2f} MB (float32).

```bash
python -m adapters.training.ship {name}
# which runs (the other flags at their defaults):
python -m adapters.training.train --data adapters/training/data/{name}/train.jsonl --out adapters/shipped/{name} \\
  --steps {training["steps"]} --lr {training["lr"]:g}
```

## Metrics

{result["n"]} held-out prompts, greedy, at most {result["max_new_tokens"]} new tokens, served by loraplex's own
engine next to the base model (`python -m adapters.training.evaluate`).
{markers}
| metric | meaning | base | {name} |
|---|---|---|---|
{rows}

## Limits

{LIMITS[kind]}
"""


def write_cards(shipped: Path, results: dict[str, dict]) -> None:
    for name, result in results.items():
        folder = shipped / name
        training = json.loads((folder / "training.json").read_text())
        size = (folder / "adapter_model.safetensors").stat().st_size
        (folder / "README.md").write_text(render(name, training, result, size))
