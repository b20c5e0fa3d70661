"""`python -m adapters.training.ship [NAME ...]`: retrains the shipped adapters from `adapters/training/data`,
one after another.

The recipes below are the ones the committed weights were trained with; `python -m adapters.training.evaluate`
afterwards measures them and rewrites the cards.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from adapters.training.train import train

RECIPES = {
    "pirate": dict(steps=100, lr=1e-3),
    "butler": dict(steps=100, lr=1e-3),
    "coach": dict(steps=100, lr=1e-3),
    "summarizer": dict(steps=120, lr=1e-3),
    "qa": dict(steps=120, lr=1e-3),
}
COMMON = dict(rank=8, alpha=16.0, targets=["q_proj", "v_proj"], batch_size=8, max_len=128, warmup=10, seed=0)


def main(argv: list[str] | None = None) -> None:
    from server.model.loader import resolve_model

    parser = argparse.ArgumentParser(prog="python -m adapters.training.ship", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"default: all of {', '.join(RECIPES)}")
    parser.add_argument("--data", type=Path, default=Path("adapters/training/data"))
    parser.add_argument("--shipped", type=Path, default=Path("adapters/shipped"))
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(RECIPES)
    if unknown:
        parser.error(f"unknown adapters {sorted(unknown)}; shipped: {', '.join(RECIPES)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_path = str(resolve_model(None).path)
    for name in args.names or list(RECIPES):
        summary = train(args.data / name / "train.jsonl", args.shipped / name, model_path, **COMMON, **RECIPES[name])
        logging.info("%s: %.1f min, loss %.3f -> %.3f", name, summary["train_seconds"] / 60, summary["loss_first10"],
                     summary["loss_last10"])


if __name__ == "__main__":
    main()
