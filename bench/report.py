"""Writes a run's results: the JSON of every figure, the printed table, and one PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write(results: dict, table: str, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.txt", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(results, indent=2, default=float) + "\n")
    paths[1].write_text(table + "\n")
    plot(results, paths[2])
    return paths


def _throughput_bars(results: dict) -> list[tuple[str, float, str]]:
    bars = []
    b = results["baselines"]
    bars.append(("transformers b16 (base)", b["hf_batch16_tokens_per_s"], "tab:gray"))
    bars.append(("PEFT naive (set_adapter, b1)", b["peft_naive"]["tokens_per_s"], "tab:gray"))
    bars.append(("PEFT mixed b16 (8 adapters)", b["peft_mixed16_tokens_per_s"], "tab:gray"))
    colors = {"auto": "tab:blue", "merged": "tab:orange", "unmerged": "tab:green", "nocache": "tab:purple"}
    for mode, server in results["servers"].items():
        for name, w in server.get("workloads", {}).items():
            if name != "lone":
                bars.append((f"loraplex {mode}: {name}", w["tokens_per_s"], colors.get(mode, "tab:blue")))
    return bars


def plot(results: dict, path: Path) -> None:
    bars = _throughput_bars(results)
    targets = results["targets"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 0.32 * len(bars) + 2.5),
                                      gridspec_kw={"width_ratios": [1.25, 1]})
    labels, values, colors = zip(*bars)
    left.barh(range(len(bars)), values, color=colors)
    left.set_yticks(range(len(bars)), labels, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("generated tokens/s (64 new tokens per request)")
    left.set_title("Throughput: loraplex workloads vs same-run baselines")
    for i, v in enumerate(values):
        left.text(v, i, f" {v:.0f}", va="center", fontsize=7)

    # Each target as measured/goal, flipped for lower-is-better ones so > 1 always passes; bars grow from 1
    # on a log axis, right (green) for a pass, left (red) for a miss.
    scores = [min(100.0, max(0.01, t["ratio"] / t["goal"] if t["higher_is_better"] else t["goal"] / t["ratio"]))
              for t in targets]
    right.barh(range(len(targets)), [s - 1 for s in scores], left=1,
               color=["tab:green" if t["passed"] else "tab:red" for t in targets])
    right.set_xscale("log")
    right.axvline(1.0, color="black", lw=1)
    right.set_yticks(range(len(targets)),
                     [f"{t['name']}\n{t['ratio']:.2f} ({'>=' if t['higher_is_better'] else '<='} {t['goal']})"
                      for t in targets], fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("measured / goal, log scale (>= 1 passes)")
    right.set_title("Targets")
    meta = results["meta"]
    fig.suptitle(f"loraplex bench, {meta['model']} {meta['dtype']}, {meta['cpu']} ({meta['threads']} threads), "
                 f"{'quick' if meta['quick'] else 'full'} run {meta['started']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
