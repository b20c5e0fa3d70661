"""What every part of the benchmark shares: the prompt, the request length and the adapters.

Adapters are made once with `adapters.random_adapter` and written as PEFT folders, so the server (which
receives the folder's bytes over HTTP) and PEFT (which loads the folder) serve the very same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters import Adapter, llama_base_shapes, random_adapter, write_peft_folder

SMOLLM2_SHAPES = llama_base_shapes(num_layers=30, hidden=576, intermediate=1536, kv_dim=192)
NEW_TOKENS = 64
PROMPT = ("The lighthouse keeper wrote in her log every night. Tonight the storm had passed, the lamp was "
          "steady, and a small boat was drifting toward the rocks. She picked up her pen and wrote:")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterKind:
    prefix: str
    rank: int
    targets: tuple[str, ...]


QV_R8 = AdapterKind("qv", 8, ("q_proj", "v_proj"))
ALL_R16 = AdapterKind("all", 16, ALL_PROJECTIONS)


def adapter_names(kind: AdapterKind, count: int) -> list[str]:
    return [f"{kind.prefix}-{i:04d}" for i in range(count)]


def make_adapter(kind: AdapterKind, name: str) -> Adapter:
    seed = int(name.rsplit("-", 1)[1]) + 1000 * kind.rank
    return random_adapter(name, SMOLLM2_SHAPES, kind.rank, 2.0 * kind.rank, kind.targets, seed, init_std=0.02)


def write_adapters(kind: AdapterKind, count: int, root: Path) -> dict[str, Path]:
    """PEFT folders root/<name>, made once per run and shared by the server uploads and the PEFT baselines."""
    folders = {}
    for name in adapter_names(kind, count):
        folders[name] = root / name
        if not (root / name / "adapter_model.safetensors").exists():
            write_peft_folder(make_adapter(kind, name), root / name)
    return folders


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
