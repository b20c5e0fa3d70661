"""Training and held-out data for the shipped adapters, generated here without downloads.

Every record is one chat turn: {"messages": [{"role": "user", ...}], "response": "...", ...} plus what the
evaluation needs (a persona's topic `keyword`; for summaries and QA the `response` is the reference).
`python -m adapters.training.datasets --out adapters/training/data` writes `<adapter>/train.jsonl` and
`<adapter>/heldout.jsonl`.
"""

import json
from pathlib import Path


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def chat(user: str, response: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}], "response": response, **extra}
