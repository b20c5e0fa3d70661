"""`python -m adapters.training.evaluate [--limit N]`: every shipped adapter against the base model on
held-out prompts.

Both sides are served by the same Runtime (the shipped folder preloaded), greedy, concurrently: an adapter
and the base answer the same prompts in mixed batches, as a client's requests would be answered.

- persona (pirate, butler, coach): `style`, the fraction of replies with at least one of the persona's
  markers, and `on_topic`, the fraction mentioning the question's topic keyword;
- summarizer: mean ROUGE-L F1 against the reference sentence;
- qa: exact match and token F1 (SQuAD normalisation) against the answer span, and exact match on the
  questions phrased in ways training never used.

A full run (no --limit) writes `metrics.json` beside the adapters and rewrites each adapter's card.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from adapters.training.datasets import read_jsonl
from adapters.training.datasets.persona import PERSONAS, marker_pattern
from adapters.training.metrics import exact_match, has_marker, mean, on_topic, rouge_l_f, token_f1
from adapters.training.replies import Job, greedy_replies, serving_runtime

SHIPPED = Path("adapters/shipped")
DATA = Path("adapters/training/data")


@dataclass(frozen=True)
class Task:
    kind: str            # "persona" | "summary" | "qa"
    primary: str         # the metric the adapter is judged on
    max_new_tokens: int


TASKS = {
    "pirate": Task("persona", "style", 48),
    "butler": Task("persona", "style", 48),
    "coach": Task("persona", "style", 48),
    "summarizer": Task("summary", "rouge_l", 64),
    "qa": Task("qa", "exact_match", 16),
}


def score(name: str, task: Task, records: list[dict], replies: list[str]) -> dict[str, float]:
    if task.kind == "persona":
        markers = marker_pattern(PERSONAS[name])
        return {"style": mean(has_marker(r, markers) for r in replies),
                "on_topic": mean(on_topic(r, rec["keyword"]) for r, rec in zip(replies, records))}
    if task.kind == "summary":
        return {"rouge_l": mean(rouge_l_f(r, rec["response"]) for r, rec in zip(replies, records))}
    matches = [exact_match(r, rec["response"]) for r, rec in zip(replies, records)]
    return {"exact_match": mean(matches),
            "f1": mean(token_f1(r, rec["response"]) for r, rec in zip(replies, records)),
            "em_new_phrasing": mean(m for m, rec in zip(matches, records) if rec.get("new_phrasing"))}


def evaluate(shipped: Path = SHIPPED, data: Path = DATA, names: list[str] | None = None, limit: int | None = None,
             max_new_tokens: int | None = None, quantization: str = "none") -> dict[str, dict]:
    names = names or list(TASKS)
    held = {n: read_jsonl(data / n / "heldout.jsonl")[:limit] for n in names}
    tokens = {n: max_new_tokens or TASKS[n].max_new_tokens for n in names}
    jobs = {Job(rec["messages"][0]["content"], adapter, tokens[n])
            for n in names for rec in held[n] for adapter in (n, None)}  # a set: personas share base prompts
    jobs = sorted(jobs, key=lambda j: (j.adapter or "", j.user))
    with serving_runtime(shipped, quantization) as rt:
        replies = dict(zip(jobs, greedy_replies(rt, jobs)))
    results = {}
    for n in names:
        task = TASKS[n]
        prompts = [rec["messages"][0]["content"] for rec in held[n]]
        ours = [replies[Job(p, n, tokens[n])] for p in prompts]
        base = [replies[Job(p, None, tokens[n])] for p in prompts]
        results[n] = {"kind": task.kind, "primary": task.primary, "n": len(prompts), "max_new_tokens": tokens[n],
                      "base": score(n, task, held[n], base), "adapter": score(n, task, held[n], ours),
                      "example": {"prompt": prompts[0], "base": base[0], "adapter": ours[0]}}
    return results


def against_shipped(results: dict[str, dict], shipped: dict[str, dict], fmt: str) -> str:
    """Each adapter's metrics on this base beside the shipped (fp32 base) figures."""
    lines = [f"{'adapter':<11} {'metric':<16} {'fp32':>6} {fmt:>8} {'delta':>7}"]
    for name, r in results.items():
        for metric, ours in r["adapter"].items():
            fp32 = shipped[name]["adapter"][metric]
            lines.append(f"{name:<11} {metric:<16} {fp32:>6.3f} {ours:>8.3f} {ours - fp32:>+7.3f}")
    return "\n".join(lines)


def table(results: dict[str, dict]) -> str:
    lines = [f"{'adapter':<11} {'metric':<16} {'base':>6} {'adapter':>8} {'delta':>7}   n"]
    for name, r in results.items():
        for i, metric in enumerate(r["adapter"]):
            base, ours = r["base"][metric], r["adapter"][metric]
            lines.append(f"{name if i == 0 else '':<11} {metric + ('*' if metric == r['primary'] else ''):<16} "
                         f"{base:>6.3f} {ours:>8.3f} {ours - base:>+7.3f}   {r['n']}")
    return "\n".join(lines + ["* the metric each adapter is judged on"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m adapters.training.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shipped", type=Path, default=SHIPPED)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--adapters", default=",".join(TASKS), help="comma-separated names")
    parser.add_argument("--limit", type=int, default=None, help="first N held-out prompts per adapter (no files written)")
    parser.add_argument("--quantization", default="none", help="the base's weight format (see python -m server "
                        "--help); the shipped figures are fp32's (none): with any other, each metric is printed "
                        "beside the shipped figure and no files are written")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = evaluate(args.shipped, args.data, args.adapters.split(","), args.limit, quantization=args.quantization)
    print(table(results))
    if args.quantization != "none":
        print(against_shipped(results, json.loads((args.shipped / "metrics.json").read_text()), args.quantization))
    elif args.limit is None:
        from adapters.training.cards import write_cards

        (args.shipped / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        write_cards(args.shipped, results)
        print(f"wrote {args.shipped / 'metrics.json'} and the adapter cards")


if __name__ == "__main__":
    main()
