"""`python -m adapters.training.datasets --out adapters/training/data`: writes every adapter's train.jsonl
and heldout.jsonl.

Summaries and QA are pure templates. Personas rewrite the base model's own greedy replies, generated once
through the serving engine (300 short replies; about 9 minutes on 2 busy CPU cores) and kept in
`base_replies.jsonl`, so later runs (and other machines, whose greedy replies could differ) rebuild the
same data without the model; `--refresh-base` asks the model again.
"""

import argparse
import logging
from pathlib import Path

from adapters.training.datasets import persona, qa, read_jsonl, summaries, write_jsonl

PERSONA_REPLY_TOKENS = 64


def base_replies(cache: Path, refresh: bool):
    """A function answering questions with the base model's greedy replies, remembered in `cache`."""
    def reply(questions: list[str]) -> list[str]:
        known = {} if refresh or not cache.exists() else {r["question"]: r["reply"] for r in read_jsonl(cache)}
        missing = [q for q in questions if q not in known]
        if missing:
            from adapters.training.replies import Job, greedy_replies, serving_runtime

            with serving_runtime() as rt:
                known |= dict(zip(missing, greedy_replies(rt, [Job(q, None, PERSONA_REPLY_TOKENS) for q in missing])))
            write_jsonl(cache, [{"question": q, "reply": known[q]} for q in questions])
        return [known[q] for q in questions]

    return reply


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m adapters.training.datasets", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("adapters/training/data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-personas", action="store_true", help="templates only; no model needed")
    parser.add_argument("--refresh-base", action="store_true", help="ask the base model again for persona content")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sets = {"summarizer": summaries.build(seed=args.seed), "qa": qa.build(seed=args.seed)}
    if not args.skip_personas:
        sets |= persona.build(base_replies(args.out / "base_replies.jsonl", args.refresh_base), seed=args.seed)
    for name, splits in sets.items():
        for split, records in splits.items():
            write_jsonl(args.out / name / f"{split}.jsonl", records)
            logging.info("%s/%s: %d records", name, split, len(records))


if __name__ == "__main__":
    main()
