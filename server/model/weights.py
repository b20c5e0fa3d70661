"""Builds the serving `Transformer` from a checkpoint: fused projections, chosen dtype, device and kernel."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from server.model.backend import Backend
from server.model.checkpoint import MappedCheckpoint, checkpoint_tensor
from server.model.embedding import BlockEmbedding, TableEmbedding
from server.model.config import ModelConfig
from server.model.linear import Linear
from server.model.checkpoint_layout import UnfusedCheckpoint, check_checkpoint, layer_norms
from server.model.geometry import FUSED_SITES, biased_sites, hf_weight_name
from server.model.llama import DecoderLayer, Transformer
from server.model.loader import ModelFolder
from server.model.gguf_blocks import GGUFBlocks
from server.model.quantized_linear import FORMATS, QuantizedLinear, quantize


class LoadedModel:
    """The transformer plus the read-only checkpoint it came from (the exact-restore source for hot-swap).

    `quantization` names the base weights' format, chosen once here for the whole model: "none" (the
    checkpoint in the backend's dtype, multiplied by its linear kernel), "int8"/"int4" (quantized as read),
    "gguf" (the GGUF file the folder was converted from, its blocks as they are)."""

    def __init__(self, folder: ModelFolder, backend: Backend, quantization: str = "none",
                 max_seq_len: int | None = None):
        """`max_seq_len`: the positions it is served to (a rope may depend on it: `ModelConfig.served_up_to`)."""
        self.folder = folder
        self.config = ModelConfig.from_hf(folder.config)
        if max_seq_len is not None:
            self.config = self.config.served_up_to(max_seq_len)
        self.checkpoint = MappedCheckpoint(folder.weight_files())
        if self.config.fused_in_checkpoint:
            self.checkpoint = UnfusedCheckpoint(self.checkpoint, self.config)
        check_checkpoint(self.config, {name: self.checkpoint[name].shape for name in self.checkpoint.keys()},
                         str(folder.path))
        formats = weight_format(quantization, self.checkpoint, backend, folder, self.config)
        self.transformer = build_transformer(self.config, self.checkpoint, backend, formats)
        self.weight_format = formats.name


class FullPrecision:
    """The checkpoint's weights in the serving dtype, multiplied by the backend's linear kernel."""

    def __init__(self, ckpt: MappedCheckpoint, backend: Backend):
        self.ckpt, self.device, self.dtype, self.backend = ckpt, backend.device, backend.dtype, backend
        self.name = str(self.dtype).removeprefix("torch.")

    def projection(self, layer: int, projs: list[str], bias: torch.Tensor | None):
        return Linear(_fused(self.ckpt, [hf_weight_name(layer, p) for p in projs], self.device, self.dtype), bias,
                      self.backend)

    def head(self, weight: Callable[[], torch.Tensor]):
        return Linear(weight(), None, self.backend, editable=False)

    def embedding(self, table: Callable[[], torch.Tensor], head):
        return TableEmbedding(table())


class QuantizedAtLoad:
    """Each projection read in full precision, quantized and dropped, so the whole model never exists in full
    precision; the lm_head in int8."""

    def __init__(self, ckpt: MappedCheckpoint, backend: Backend, fmt: str):
        self.ckpt, self.device, self.dtype, self.name = ckpt, backend.device, backend.dtype, fmt
        self.kernel = backend.block

    def projection(self, layer: int, projs: list[str], bias: torch.Tensor | None):
        weight = _fused(self.ckpt, [hf_weight_name(layer, p) for p in projs], self.device, self.dtype)
        return QuantizedLinear(quantize(weight, self.name), bias, self.name, self.kernel)

    def head(self, weight: Callable[[], torch.Tensor]):
        return QuantizedLinear(quantize(weight(), "int8"), None, "int8", self.kernel)

    def embedding(self, table: Callable[[], torch.Tensor], head):  # the int8 head rounds: lookups keep the exact table
        return TableEmbedding(table())


class FromGGUF:
    """The projections and the lm_head as the GGUF file stores them (server.model.gguf_blocks)."""

    def __init__(self, blocks: GGUFBlocks, backend: Backend):
        self.blocks = blocks
        self.kernel = backend.block

    @property
    def name(self) -> str:
        requantized = f" ({'+'.join(sorted(self.blocks.requantized))} as 8-bit)" if self.blocks.requantized else ""
        return f"gguf {'+'.join(sorted(self.blocks.types))}{requantized}"

    def projection(self, layer: int, projs: list[str], bias: torch.Tensor | None):
        return QuantizedLinear(self.blocks.fused(layer, projs), bias, "gguf", self.kernel)

    def head(self, weight: Callable[[], torch.Tensor]):  # the file's own output (or tied embedding) blocks
        return QuantizedLinear(self.blocks.output(), None, "gguf", self.kernel)

    def embedding(self, table: Callable[[], torch.Tensor], head):
        """Tokens are looked up in the file's own embedding blocks (a tied file's are its lm_head's): the
        checkpoint's table, that file dequantized to fp32, is never read."""
        return BlockEmbedding(head.quantized if self.blocks.tied else self.blocks.token_embedding())


def weight_format(quantization: str, ckpt: MappedCheckpoint, backend: Backend, folder: ModelFolder | None = None,
                  cfg: ModelConfig | None = None):
    if quantization == "none":
        return FullPrecision(ckpt, backend)
    if quantization in FORMATS:
        return QuantizedAtLoad(ckpt, backend, quantization)
    if quantization == "gguf":
        if folder is None or folder.gguf is None:
            raise ValueError("--quantization gguf serves a GGUF file's own blocks; this model folder was not "
                             "converted from one")
        return FromGGUF(GGUFBlocks(folder.gguf, cfg), backend)
    raise ValueError(f"unknown quantization {quantization!r}")


def _tensor(ckpt: MappedCheckpoint, name: str, device, dtype) -> torch.Tensor:
    if name not in ckpt:
        raise KeyError(f"checkpoint has no tensor {name}")
    return checkpoint_tensor(ckpt, name, device, dtype)


def _fused(ckpt, names: list[str], device, dtype) -> torch.Tensor:
    return torch.cat([_tensor(ckpt, n, device, dtype) for n in names], dim=0).contiguous()


def build_transformer(cfg: ModelConfig, ckpt: MappedCheckpoint, backend: Backend, formats) -> Transformer:
    """`formats` (FullPrecision, QuantizedAtLoad, FromGGUF) builds each projection and the lm_head; norms,
    biases and the embedding table (for lookups) come from the checkpoint in the backend's dtype."""
    device, dtype = backend.device, backend.dtype
    layers = []
    for i in range(cfg.num_layers):
        linears = {}
        for site, projs in FUSED_SITES.items():
            bias = None
            if site in biased_sites(cfg):
                bias = _fused(ckpt, [hf_weight_name(i, p).replace(".weight", ".bias") for p in projs], device, dtype)
            linears[site] = formats.projection(i, projs, bias)
        norm = {name: _tensor(ckpt, f"model.layers.{i}.{name}.weight", device, dtype) for name in layer_norms(cfg)}
        norms, output_norms = (norm["input_layernorm"], norm["post_attention_layernorm"]), None
        if cfg.sandwich_norms:  # Gemma's post_attention norm is on attention's output; pre_feedforward feeds the MLP
            norms = (norm["input_layernorm"], norm["pre_feedforward_layernorm"])
            output_norms = (norm["post_attention_layernorm"], norm["post_feedforward_layernorm"])
        qk_norms = None
        if cfg.qk_norm:
            qk_norms = tuple(_tensor(ckpt, f"model.layers.{i}.self_attn.{n}.weight", device, dtype)
                             for n in ("q_norm", "k_norm"))
        layers.append(DecoderLayer(i, cfg, linears, norms, qk_norms, backend, output_norms))
    # read when a format asks (once): a tied GGUF never needs the table in full precision
    table = functools.cache(lambda: _tensor(ckpt, "model.embed_tokens.weight", device, dtype))
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in ckpt
    # The tied head shares the embedding's storage on the plain path; the packed kernel is a separate layout.
    head = formats.head(table if tied else lambda: _tensor(ckpt, "lm_head.weight", device, dtype))
    norm = _tensor(ckpt, "model.norm.weight", device, dtype)
    return Transformer(cfg, formats.embedding(table, head), layers, norm, head, backend)
