"""Zero-copy, read-only views of safetensors checkpoints.

The hot-swap path restores merged weights from these views, so they must stay bit-identical to the file:
the file is memory-mapped read-only and never written. The OS page cache shares the pages, so holding
the views costs no resident memory beyond what is being read.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
}


class MappedCheckpoint:
    """Tensors of one or more safetensors files, by name, backed by read-only memory maps."""

    def __init__(self, files: list[Path]):
        self._maps: list[mmap.mmap] = []
        self._tensors: dict[str, torch.Tensor] = {}
        for file in files:
            self._map_file(file)

    def _map_file(self, file: Path) -> None:
        with open(file, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._maps.append(mm)
        (header_len,) = struct.unpack("<Q", mm[:8])
        header = json.loads(mm[8 : 8 + header_len])
        data_start = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            count = (end - begin) // torch.empty((), dtype=dtype).element_size()
            # ACCESS_READ maps are not writable; torch warns and then only reads them.
            with _quiet_nonwritable_warning():
                flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin)
            self._tensors[name] = flat.view(info["shape"])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def keys(self):
        return self._tensors.keys()


def checkpoint_tensor(ckpt: MappedCheckpoint, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A checkpoint tensor converted to the serving device and dtype, as loaded at start-up."""
    return ckpt[name].to(device=device, dtype=dtype, copy=True)


def copy_checkpoint_tensor(ckpt: MappedCheckpoint, name: str, out: torch.Tensor) -> None:
    """Writes a checkpoint tensor into `out` (its device and dtype) with no temporary: `Tensor.to` is
    itself an empty tensor plus `copy_`, so this converts exactly as `checkpoint_tensor` does and restored
    weights are bit-identical to loaded ones."""
    out.copy_(ckpt[name])


class _quiet_nonwritable_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message=".*non-writable.*")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
