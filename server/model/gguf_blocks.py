"""A GGUF file's quantized projections as `BlockWeight`s, taken as they are stored (no dequantizing).

Q4_0, Q4_1 and Q8_0 are blocks of 32 inputs of one output row: Q4_1 holds w = d * q + m (q in 0..15),
Q4_0 w = d * (q - 8), Q8_0 w = d * q (q signed); d and m are fp16. Each maps onto the block kernel's
w = d * q + m exactly. Q4_K (the bulk of the common Q4_K_M files) is super-blocks of 256 inputs, eight
blocks of 32 each with 6-bit scale and min under two fp16 super-scales: w = (d * sc) * q - (dmin * mn); the
products are stored as the kernel's fp16 block scale and offset, a rounding of at most 2^-11 of each.
Any other type gguf can read (Q6_K, Q5_K, Q5_0, F16, ...) is dequantized and requantized to 8-bit blocks of
32 (Q8_0's rule) at load, and the log says which types were. llama.cpp's converter permutes the rows of
attn_q and attn_k of a Llama-family file (its rope pairs halves differently); they are put back in Hugging
Face's order here. Phi-3's files hold q/k/v and gate/up fused, as the model's sites are (WHOLE_SITES). Gemma's
projections are stored as Hugging Face's; its norms (stored as 1 + w) and the embedding's sqrt(hidden) scale are
the model's, not the blocks'. Files of other architectures (ARCHITECTURES) are refused before any tensor is read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from server.kernels.block_linear import BLOCK, BlockWeight, from_blocks
from server.model.config import ModelConfig
from server.model.geometry import projection_shapes

log = logging.getLogger(__name__)

# GGUF type name -> (bytes per block, bits of q) of the types served in their own blocks
BLOCK_TYPES = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q8_0": (34, 8), "Q4_K": (144, 4)}
SUPER_BLOCK = 256  # inputs per K-quant super-block
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


# GGUF architecture -> whether llama.cpp's converter permuted the rows of attn_q and attn_k (its Llama
# family does, for its rope's pairing; Qwen's, Phi-3's and Gemma's keep Hugging Face's order).
ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False, "phi3": False, "gemma2": False, "gemma3": False}
# a converted folder's model_type where it is not the GGUF architecture's name (transformers reads a gemma3 file
# as the text-only model)
MODEL_TYPES = {"gemma3_text": "gemma3"}
# the tensors that hold a fused site whole, by architecture: Phi-3's files keep q/k/v and gate/up fused as the
# model computes them (rows in the same order)
WHOLE_SITES = {"phi3": {("q_proj", "k_proj", "v_proj"): "attn_qkv", ("gate_proj", "up_proj"): "ffn_up"}}


class UnsupportedTensor(ValueError):
    pass


def serves_model_type(model_type: str | None) -> bool:
    """Whether a folder converted from a GGUF file, by its config's model_type, is served from the file's blocks
    (else dequantized). transformers names each of ARCHITECTURES' files' configs after the architecture (or as
    MODEL_TYPES says), so the converted config answers without parsing the file's header again (seconds for a
    49k vocabulary)."""
    return MODEL_TYPES.get(model_type, model_type) in ARCHITECTURES


def gguf_architecture(reader) -> str:
    field = reader.fields.get("general.architecture")
    return field.contents() if field is not None else "llama"


class GGUFBlocks:
    """The projections of one GGUF file, by layer and Hugging Face projection name."""

    def __init__(self, path: Path, cfg: ModelConfig):
        from gguf import GGUFReader

        self.path = Path(path)
        self.cfg = cfg
        try:
            reader = GGUFReader(str(path))
            self._tensors = {t.name: t for t in reader.tensors}
        except Exception as e:  # a truncated or foreign file fails in many ways inside the reader
            raise UnsupportedTensor(f"{self.path} cannot be read as a GGUF file ({type(e).__name__}: {e})") from e
        self.arch = gguf_architecture(reader)
        if self.arch not in ARCHITECTURES:
            raise UnsupportedTensor(f"{self.path.name}: architecture {self.arch!r} is not served from its blocks "
                                    f"(served: {', '.join(ARCHITECTURES)}); --quantization none serves it dequantized")
        self.types: set[str] = set()  # the block types served so far, for the log and /health
        self.requantized: set[str] = set()  # the types read as 8-bit blocks instead

    def rows(self, name: str) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bits, q [out, in/32, 32], d [out, in/32], m [out, in/32]) of the tensor `name`."""
        tensor = self._tensors.get(name)
        if tensor is None:
            raise UnsupportedTensor(f"{self.path.name} has no tensor {name}")
        kind = tensor.tensor_type.name
        if len(tensor.shape) != 2:
            raise UnsupportedTensor(f"{self.path.name}: tensor {name} ({kind}) has {len(tensor.shape)} dimensions, "
                                    "not a weight matrix's 2")
        out, inp = int(tensor.shape[1]), int(tensor.shape[0])
        if kind not in BLOCK_TYPES:
            return self._requantized(name, tensor, kind, out, inp)
        size, bits = BLOCK_TYPES[kind]
        self.types.add(kind)
        if kind == "Q4_K":
            return bits, *_q4_k_blocks(np.array(tensor.data), out, inp)
        raw = torch.from_numpy(np.array(tensor.data)).view(out, inp // BLOCK, size)  # a copy: the map is read-only
        d = raw[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
        if kind == "Q8_0":
            return bits, raw[..., 2:].contiguous().view(torch.int8), d, torch.zeros_like(d)
        nibbles = raw[..., 4:] if kind == "Q4_1" else raw[..., 2:]
        q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1)  # weight j in byte j's low, j + 16 in its high nibble
        m = raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float() if kind == "Q4_1" else -8 * d
        return bits, q, d, m

    def _requantized(self, name: str, tensor, kind: str, out: int, inp: int):
        """A tensor of a type without its own kernel path: dequantized by gguf, then 8-bit blocks of 32 with
        d = max|w| / 127 on fp16's grid (Q8_0's rule)."""
        from gguf.quants import dequantize

        if inp % BLOCK:
            raise UnsupportedTensor(f"{self.path.name}: tensor {name} has {inp} inputs, not a multiple of {BLOCK}")
        try:
            weight = torch.from_numpy(dequantize(np.array(tensor.data), tensor.tensor_type)).float()
        except NotImplementedError as e:
            raise UnsupportedTensor(f"{self.path.name}: tensor {name} is {kind}, which gguf cannot read; served "
                                    f"natively: {', '.join(BLOCK_TYPES)}") from e
        if kind not in self.requantized:
            log.info("%s: %s tensors (first: %s) are requantized to 8-bit blocks of 32 at load",
                     self.path.name, kind, name)
            self.requantized.add(kind)
        blocks = weight.reshape(out, inp // BLOCK, BLOCK)
        d = (blocks.abs().amax(-1) / 127).half().float()
        inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = (blocks * inverse[..., None]).round().clamp(-127, 127).to(torch.int8)
        return 8, q, d, torch.zeros_like(d)

    def _site(self, name: str, projs: list[str]) -> BlockWeight:
        bits, q, d, m = self.rows(name)
        shapes = [projection_shapes(self.cfg)[proj] for proj in projs]
        self._check_shape(name, q, (sum(rows for rows, _ in shapes), shapes[0][1]))
        return _block_weight(bits, q, d, m)

    def _check_shape(self, name: str, q: torch.Tensor, expected: tuple[int, int]) -> None:
        if (q.shape[0], q.shape[1] * BLOCK) != expected:
            raise UnsupportedTensor(f"{self.path.name}: tensor {name} is {q.shape[0]}x{q.shape[1] * BLOCK}; the "
                                    f"model's config.json says {expected[0]}x{expected[1]}")

    def projection(self, layer: int, proj: str) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        name = f"blk.{layer}.{GGUF_NAMES[proj]}.weight"
        bits, q, d, m = self.rows(name)
        self._check_shape(name, q, projection_shapes(self.cfg)[proj])
        if proj in ("q_proj", "k_proj") and ARCHITECTURES[self.arch]:
            heads = self.cfg.num_heads if proj == "q_proj" else self.cfg.num_kv_heads
            order = _unpermute(q.shape[0], heads)
            q, d, m = q[order], d[order], m[order]
        return bits, q, d, m

    def fused(self, layer: int, projs: list[str]) -> BlockWeight:
        """The projections of one fused site, rows stacked in `projs` order (as the model fuses them)."""
        whole = WHOLE_SITES.get(self.arch, {}).get(tuple(projs))
        if whole is not None:
            return self._site(f"blk.{layer}.{whole}.weight", projs)
        parts = [self.projection(layer, proj) for proj in projs]
        bits = max(part[0] for part in parts)
        # a 4-bit part among 8-bit ones (Q4_K_M's attn_v is Q6_K) widens exactly: q 0..15 is an int8 too
        q = torch.cat([part[1].to(torch.int8) if bits == 8 else part[1] for part in parts])
        d, m = (torch.cat([part[i] for part in parts]) for i in (2, 3))
        return _block_weight(bits, q, d, m)

    @property
    def tied(self) -> bool:
        """Whether the lm_head is the token embedding (no `output.weight` of its own)."""
        return "output.weight" not in self._tensors

    def output(self) -> BlockWeight:
        """The lm_head: `output.weight`, or the tied `token_embd.weight`."""
        return _block_weight(*self.rows("output.weight" if "output.weight" in self._tensors else "token_embd.weight"))

    def token_embedding(self) -> BlockWeight:
        """`token_embd.weight` in its blocks, for lookups (an untied file's; a tied one's is `output()`)."""
        return _block_weight(*self.rows("token_embd.weight"))


def _block_weight(bits: int, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> BlockWeight:
    """The kernel's weight from per-row blocks as `GGUFBlocks.rows` gives them."""
    return from_blocks(bits, (q.shape[0], q.shape[1] * BLOCK), q, d, m)


def _q4_k_blocks(data: np.ndarray, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks as blocks of 32: (q [out, in/32, 32] 0..15, d, m [out, in/32]), following llama.cpp's
    dequantize_row_q4_K: fp16 d and dmin, 12 bytes of 6-bit scales and mins, then 4 x 32 bytes whose low
    nibbles are block 2k and high nibbles block 2k + 1."""
    supers = inp // SUPER_BLOCK
    raw = torch.from_numpy(data).view(out, supers, 144)
    d, dmin = (raw[..., i:i + 2].contiguous().view(torch.float16).float() for i in (0, 2))  # [out, supers, 1]
    packed = raw[..., 4:16].int()
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat([low & 63, (high & 0xF) | ((low >> 6) << 4)], dim=-1)   # get_scale_min_k4's d
    mins = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=-1)      # and its m
    nibbles = raw[..., 16:].reshape(out, supers, 4, 1, 32)
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=3).reshape(out, supers * 8, BLOCK)
    return q, (d * scales).reshape(out, -1), (-dmin * mins).reshape(out, -1)


def _unpermute(rows: int, heads: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's q/k permute (reshape(heads, 2, half, ...).swapaxes(1, 2))."""
    permuted = torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)
    return torch.argsort(permuted)
