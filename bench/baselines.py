"""The reference points, in-process on the same model, prompt and adapter folders: transformers and PEFT.

- transformers `generate` at batch 16, base model: what a plain batched HF loop does.
- PEFT served the naive way: one request at a time, `set_adapter` then batch-1 `generate` (an HTTP server
  doing this holds a lock around both, so requests run one after another; in-process is the same minus
  the HTTP overhead, which flatters the baseline).
- PEFT's mixed-batch `generate(adapter_names=...)` at batch 16 over 8 adapters.
- PEFT `merge_adapter` + `unmerge_adapter`, timed in turns with loraplex's own hot-swap of the same
  adapter; and load_adapter-to-first-token, for the upload figure.

`run_all` is meant to run in a fresh process (see bench.run), after the server under test has stopped, so
it neither competes with it for cores nor inherits its memory. `batch16` measures the two batch-16 figures
again, each time in a fresh process: before the servers and between them. The targets take the median of
the three readings, spread over the run as the servers' own base-only runs are, so no one slow spell on a
shared host decides a ratio (the readings' spread: docs/decisions.md).
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters import read_peft_folder
from bench.fixtures import NEW_TOKENS, PROMPT
from bench.micro import SwapCycle
from server.heap import back_with_huge_pages, huge_page_bytes
from server.model.backend import resolve_backend
from server.model.loader import resolve_model
from server.model.weights import LoadedModel


def _generate(model, input_ids: torch.Tensor, new_tokens: int, **kwargs) -> float:
    """Seconds for one fixed-length greedy generate of the whole batch."""
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=2, **kwargs)
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return time.perf_counter() - started


def batch_tokens_per_s(model, prompt_ids: list[int], batch: int, reps: int, **kwargs) -> float:
    ids = torch.tensor([prompt_ids] * batch)
    _generate(model, ids, 4, **kwargs)
    seconds = min(_generate(model, ids, NEW_TOKENS, **kwargs) for _ in range(reps))
    return batch * NEW_TOKENS / seconds


def naive_peft(model: PeftModel, prompt_ids: list[int], names: list[str], requests: int) -> dict:
    """One request at a time, each switching the active adapter first."""
    ids = torch.tensor([prompt_ids])
    model.set_adapter(names[0])
    _generate(model, ids, 4)
    latencies = []
    for i in range(requests):
        started = time.perf_counter()
        model.set_adapter(names[i % len(names)])
        _generate(model, ids, NEW_TOKENS)
        latencies.append(time.perf_counter() - started)
    return {"tokens_per_s": requests * NEW_TOKENS / sum(latencies), "latency_p50": statistics.median(latencies)}


def swaps_in_turns(ours: SwapCycle, model: PeftModel, name: str, reps: int) -> dict:
    """loraplex's hot-swap and PEFT's merge_adapter + unmerge_adapter of the same adapter, timed in turns
    (ours, PEFT's, ours, ...) so that the machine's drift hits both alike."""
    model.set_adapter(name)
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    before = weight.detach().clone()

    def peft_cycle() -> None:
        model.merge_adapter()
        model.unmerge_adapter()

    times: dict[str, list[float]] = {"loraplex": [], "peft": []}
    for i in range(reps + 1):
        for label, cycle in (("loraplex", ours), ("peft", peft_cycle)):
            started = time.perf_counter()
            cycle()
            if i:  # the first turn warms up
                times[label].append(time.perf_counter() - started)
    drift = (weight.detach() - before).abs()
    return {"loraplex": {"seconds": statistics.median(times["loraplex"]), "restore_exact": ours.exact()},
            "peft": {"seconds": statistics.median(times["peft"]), "restore_exact": bool(drift.max() == 0),
                     "changed_fraction": float((drift > 0).float().mean())}}


def peft_load_to_first_token(model: PeftModel, folder: Path, prompt_ids: list[int]) -> float:
    started = time.perf_counter()
    model.load_adapter(str(folder), adapter_name="fresh-upload")
    model.set_adapter("fresh-upload")
    _generate(model, torch.tensor([prompt_ids]), 1)
    return time.perf_counter() - started


def loraplex_model() -> LoadedModel:
    # No keep_freed_memory() here, unlike the server: it is process-wide and would spare PEFT's merges
    # their page faults too; loraplex's in-place swap allocates nothing large either way.
    cpu = torch.device("cpu")
    return LoadedModel(resolve_model(None), resolve_backend(cpu, torch.float32))


def _load(model_dir: str):
    """The bench prompt's ids and the transformers model, fp32."""
    return (AutoTokenizer.from_pretrained(model_dir)(PROMPT).input_ids,
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())


def hf_batch16_in_huge_pages(model_dir: str, quick: bool) -> dict:
    """transformers generate at batch 16 with its weights in huge pages, as loraplex's server keeps its own
    (server.heap.back_with_huge_pages): run in a fresh process, since huge pages once made stay."""
    prompt_ids, model = _load(model_dir)
    with torch.no_grad():
        for param in model.parameters():  # loaded as views of the mapped checkpoint file: anonymous memory first
            param.data = param.data.clone()
    back_with_huge_pages(list(model.parameters()))
    return {"tokens_per_s": batch_tokens_per_s(model, prompt_ids, 16, 1 if quick else 2),
            "huge_page_bytes": huge_page_bytes()}


def _with_adapters(model, folders: dict[str, Path]) -> PeftModel:
    names = list(folders)
    model = PeftModel.from_pretrained(model, str(folders[names[0]]), adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    return model


def _mixed16_tokens_per_s(model: PeftModel, prompt_ids: list[int], names: list[str], reps: int) -> float:
    mixed = [names[i % len(names)] for i in range(16)]
    return batch_tokens_per_s(model, prompt_ids, 16, reps, adapter_names=mixed)


def batch16(model_dir: str, folders: dict[str, Path], quick: bool) -> dict:
    """transformers and PEFT mixed-batch generate at batch 16, the figures `run_all` measures after the servers."""
    prompt_ids, model = _load(model_dir)
    reps = 1 if quick else 2
    hf = batch_tokens_per_s(model, prompt_ids, 16, reps)
    return {"hf_batch16_tokens_per_s": hf, "peft_mixed16_tokens_per_s": _mixed16_tokens_per_s(
        _with_adapters(model, folders), prompt_ids, list(folders), reps)}


def run_all(model_dir: str, folders: dict[str, Path], fresh_folder: Path, quick: bool) -> dict:
    """All baseline figures; `folders` are the 8 adapters of the mixed workload, `fresh_folder` one more."""
    torch.manual_seed(0)
    prompt_ids, model = _load(model_dir)
    reps = 1 if quick else 2
    out = {"threads": torch.get_num_threads(), "prompt_tokens": len(prompt_ids)}
    out["hf_batch16_tokens_per_s"] = batch_tokens_per_s(model, prompt_ids, 16, reps)
    out["hf_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    names = list(folders)
    model = _with_adapters(model, folders)
    out["peft_naive"] = naive_peft(model, prompt_ids, names, requests=3 if quick else 8)
    out["peft_mixed16_tokens_per_s"] = _mixed16_tokens_per_s(model, prompt_ids, names, reps)
    out["swap"] = swaps_in_turns(SwapCycle(loraplex_model(), read_peft_folder(folders[names[0]], names[0])),
                                 model, names[0], reps=5 if quick else 15)
    out["peft_load_to_first_token_s"] = peft_load_to_first_token(model, fresh_folder, prompt_ids)
    return out


def pooled(earlier: list[dict], after: dict) -> dict:
    """`after` (run_all's figures) with each figure that `earlier` readings (in time order) measured too
    replaced by the median of all its readings, which are kept, in time order, under "readings"."""
    readings = {key: [reading[key] for reading in earlier] + [after[key]] for key in earlier[0]}
    return after | {key: statistics.median(values) for key, values in readings.items()} | {"readings": readings}
