"""`python -m adapters.training.train --data D.jsonl --out DIR`: trains a LoRA adapter with PEFT on the frozen
base.

Each record's user messages go through the model's chat template exactly as the server encodes a request,
the `response` follows as the assistant turn, and the loss covers only the response tokens and its end of
turn. A is Gaussian and B zero (PEFT's "gaussian" init), so step 0 is the base model; only A and B train,
with AdamW. The output folder is what `peft.PeftModel.save_pretrained` writes, in float32, plus
`training.json` (the recipe, the loss curve and the wall time).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
try:
    from peft import LoraConfig, get_peft_model
except ModuleNotFoundError as missing:  # serving installs without it (make serve)
    raise SystemExit("python -m adapters.training.train needs PEFT: .venv/bin/pip install -e '.[train]'") from missing
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

from adapters.training.datasets import read_jsonl

log = logging.getLogger(__name__)
IGNORE = -100


def encode_example(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are IGNORE over the prompt and the ids over the response + end of turn."""
    prompt = _ids(tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=True))
    turn = record["messages"] + [{"role": "assistant", "content": record["response"]}]
    full = _ids(tokenizer.apply_chat_template(turn, tokenize=True))
    end = full.index(tokenizer.eos_token_id, len(prompt)) + 1  # drop what the template adds after the turn
    if full[:len(prompt)] != prompt:
        raise ValueError("the chat template does not extend the generation prompt with the response")
    return full[:end], [IGNORE] * len(prompt) + full[len(prompt):end]


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, steps: int, seed: int, pad_id: int):
    """`steps` right-padded batches, reshuffling each epoch with a seeded generator."""
    rng, order = random.Random(seed), []
    for _ in range(steps):
        if len(order) < batch_size:
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            order += epoch
        chosen, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.full((len(chosen), width), pad_id)
        labels = torch.full((len(chosen), width), IGNORE)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, (x, y) in enumerate(chosen):
            ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        yield ids, labels, mask


def response_loss(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The 49k-word head is applied only where a response token is predicted: over every position it was
    # about a fifth of a training step for no gradient.
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def train(data: Path, out: Path, model_path: str, rank: int, alpha: float, targets: list[str], steps: int,
          lr: float, batch_size: int, max_len: int, warmup: int, seed: int) -> dict:
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = [encode_example(tokenizer, r) for r in read_jsonl(data)]
    examples = [e for e in encoded if len(e[0]) <= max_len]
    if len(examples) < len(encoded):
        log.warning("skipped %d of %d examples longer than %d tokens", len(encoded) - len(examples), len(encoded),
                    max_len)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                        init_lora_weights="gaussian", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)  # freezes every base weight; only lora_A and lora_B require grad
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    model.train()
    losses, started = [], time.perf_counter()
    bar = tqdm(batches(examples, batch_size, steps, seed, tokenizer.pad_token_id), total=steps, desc=out.name)
    for ids, labels, mask in bar:
        loss = response_loss(model, ids.to(device), labels.to(device), mask.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - started
    save(model, out, os.path.basename(os.path.normpath(model_path)))
    summary = {
        "data": str(data), "examples": len(examples), "rank": rank, "alpha": alpha, "targets": targets,
        "steps": steps, "lr": lr, "batch_size": batch_size, "max_len": max_len, "warmup": warmup, "seed": seed,
        "device": str(device), "threads": torch.get_num_threads(), "train_seconds": round(seconds, 1),
        "trainable_params": sum(p.numel() for p in params),
        "loss_first10": _mean(losses[:10]), "loss_last10": _mean(losses[-10:]),
        "loss_every10": [_mean(losses[i:i + 10]) for i in range(0, len(losses), 10)],
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def save(model, out: Path, base_name: str) -> None:
    card = out / "README.md"
    kept = card.read_text() if card.exists() else None
    model.save_pretrained(out, safe_serialization=True)
    # The config names the base by its folder name, not by this machine's cache path.
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": base_name}, indent=2))
    # PEFT writes (or edits) a template card; the real one is written by adapters.training.evaluate.
    if kept is None:
        card.unlink(missing_ok=True)
    else:
        card.write_text(kept)


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else math.nan


def main(argv: list[str] | None = None) -> None:
    from server.model.loader import resolve_model

    parser = argparse.ArgumentParser(prog="python -m adapters.training.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="jsonl of {messages, response}")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="local base model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=None, help="default: 2 x rank")
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=128, help="longer examples are skipped")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_path = str(resolve_model(args.model).path)
    summary = train(args.data, args.out, model_path, args.rank, args.alpha or 2.0 * args.rank,
                    args.targets.split(","), args.steps, args.lr, args.batch, args.max_len, args.warmup, args.seed)
    log.info("trained %s in %.0f s: loss %.3f -> %.3f", args.out, summary["train_seconds"], summary["loss_first10"],
             summary["loss_last10"])


if __name__ == "__main__":
    main()
