"""A GGUF file's quantized projections as `BlockWeight`s, taken as they are stored (no dequantizing).

Q4_0, Q4_1 and Q8_0 are blocks of 32 inputs of one output row: Q4_1 holds w = d * q + m (q in 0..15),
Q4_0 w = d * (q - 8), Q8_0 w = d * q (q signed); d and m are fp16. Each maps onto the block kernel's
w = d * q + m exactly. Any other type is refused naming the tensor. llama.cpp's converter permutes the rows of
attn_q and attn_k (its rope pairs halves differently); they are put back in Hugging Face's order here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from server.kernels.block_linear import BLOCK, BlockWeight, from_blocks
from server.model.config import ModelConfig
from server.model.geometry import projection_shapes

# GGUF type name -> (bytes per block, bits of q)
BLOCK_TYPES = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q8_0": (34, 8)}
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


class UnsupportedTensor(ValueError):
    pass


class GGUFBlocks:
    """The projections of one GGUF file, by layer and Hugging Face projection name."""

    def __init__(self, path: Path, cfg: ModelConfig):
        from gguf import GGUFReader

        self.path = Path(path)
        self.cfg = cfg
        try:
            self._tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
        except Exception as e:  # a truncated or foreign file fails in many ways inside the reader
            raise UnsupportedTensor(f"{self.path} cannot be read as a GGUF file ({type(e).__name__}: {e})") from e
        self.types: set[str] = set()  # the block types served so far, for the log and /health

    def rows(self, name: str) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bits, q [out, in/32, 32], d [out, in/32], m [out, in/32]) of the tensor `name`."""
        tensor = self._tensors.get(name)
        if tensor is None:
            raise UnsupportedTensor(f"{self.path.name} has no tensor {name}")
        kind = tensor.tensor_type.name
        if kind not in BLOCK_TYPES:
            raise UnsupportedTensor(f"{self.path.name}: tensor {name} is {kind}; served natively: "
                                    f"{', '.join(BLOCK_TYPES)}")
        size, bits = BLOCK_TYPES[kind]
        self.types.add(kind)
        out, inp = int(tensor.shape[1]), int(tensor.shape[0])
        raw = torch.from_numpy(np.array(tensor.data)).view(out, inp // BLOCK, size)  # a copy: the map is read-only
        d = raw[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
        if kind == "Q8_0":
            return bits, raw[..., 2:].contiguous().view(torch.int8), d, torch.zeros_like(d)
        nibbles = raw[..., 4:] if kind == "Q4_1" else raw[..., 2:]
        q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1)  # weight j in byte j's low, j + 16 in its high nibble
        m = raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float() if kind == "Q4_1" else -8 * d
        return bits, q, d, m

    def projection(self, layer: int, proj: str) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        name = f"blk.{layer}.{GGUF_NAMES[proj]}.weight"
        bits, q, d, m = self.rows(name)
        expected = projection_shapes(self.cfg)[proj]
        if (q.shape[0], q.shape[1] * BLOCK) != expected:
            raise UnsupportedTensor(f"{self.path.name}: tensor {name} is {q.shape[0]}x{q.shape[1] * BLOCK}; the "
                                    f"model's config.json says {expected[0]}x{expected[1]}")
        if proj in ("q_proj", "k_proj"):
            heads = self.cfg.num_heads if proj == "q_proj" else self.cfg.num_kv_heads
            order = _unpermute(q.shape[0], heads)
            q, d, m = q[order], d[order], m[order]
        return bits, q, d, m

    def fused(self, layer: int, projs: list[str]) -> BlockWeight:
        """The projections of one fused site, rows stacked in `projs` order (as the model fuses them)."""
        parts = [self.projection(layer, proj) for proj in projs]
        if len({bits for bits, *_ in parts}) != 1:
            raise UnsupportedTensor(f"{self.path.name}: layer {layer} mixes block types within {projs}")
        q, d, m = (torch.cat([part[i] for part in parts]) for i in (1, 2, 3))
        return from_blocks(parts[0][0], (q.shape[0], q.shape[1] * BLOCK), q, d, m)

    @property
    def tied(self) -> bool:
        """Whether the lm_head is the token embedding (no `output.weight` of its own)."""
        return "output.weight" not in self._tensors

    def output(self) -> BlockWeight:
        """The lm_head: `output.weight`, or the tied `token_embd.weight`."""
        name = "output.weight" if "output.weight" in self._tensors else "token_embd.weight"
        bits, q, d, m = self.rows(name)
        return from_blocks(bits, (q.shape[0], q.shape[1] * BLOCK), q, d, m)


def _unpermute(rows: int, heads: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's q/k permute (reshape(heads, 2, half, ...).swapaxes(1, 2))."""
    permuted = torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)
    return torch.argsort(permuted)
