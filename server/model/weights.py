"""Builds the serving `Transformer` from a checkpoint: fused projections, chosen dtype, device and kernel."""

from __future__ import annotations

import torch

from server.model.checkpoint import MappedCheckpoint, checkpoint_tensor
from server.model.config import ModelConfig
from server.model.linear import Linear
from server.model.llama import FUSED_SITES, DecoderLayer, Transformer, hf_weight_name
from server.model.loader import ModelFolder
from server.model.gguf_blocks import GGUFBlocks
from server.model.quantized_linear import QuantizedLinear, quantize


class LoadedModel:
    """The transformer plus the read-only checkpoint it came from (the exact-restore source for hot-swap)."""

    def __init__(self, folder: ModelFolder, device: torch.device, dtype: torch.dtype, backend: str,
                 quantization: str = "none"):
        self.folder = folder
        self.config = ModelConfig.from_hf(folder.config)
        self.checkpoint = MappedCheckpoint(folder.weight_files())
        self.quantization = quantization
        gguf = None
        if quantization == "gguf":
            if folder.gguf is None:
                raise ValueError(f"--quantization gguf serves a GGUF file's own blocks; {folder.path} was not "
                                 "converted from one")
            gguf = GGUFBlocks(folder.gguf, self.config)
        self.transformer = build_transformer(self.config, self.checkpoint, device, dtype, backend, quantization, gguf)
        self.weight_format = (f"gguf {'+'.join(sorted(gguf.types))}" if gguf is not None
                              else quantization if quantization != "none" else str(dtype).removeprefix("torch."))


def _tensor(ckpt: MappedCheckpoint, name: str, device, dtype) -> torch.Tensor:
    if name not in ckpt:
        raise KeyError(f"checkpoint has no tensor {name}")
    return checkpoint_tensor(ckpt, name, device, dtype)


def _fused(ckpt, names: list[str], device, dtype) -> torch.Tensor:
    return torch.cat([_tensor(ckpt, n, device, dtype) for n in names], dim=0).contiguous()


def build_transformer(cfg: ModelConfig, ckpt: MappedCheckpoint, device: torch.device, dtype: torch.dtype,
                      backend: str, quantization: str = "none", gguf: GGUFBlocks | None = None) -> Transformer:
    """`quantization` int8/int4 quantizes each projection as it is read, so the whole model never exists in
    full precision; the lm_head then is int8. `gguf` serves the projections and the lm_head from the file's
    own blocks. The embedding table stays in `dtype` for lookups."""
    def linear(weight, bias, fmt: str, editable: bool = True):
        if fmt == "none":
            return Linear(weight, bias, backend, editable)
        return QuantizedLinear(quantize(weight, fmt), bias, fmt)

    layers = []
    for i in range(cfg.num_layers):
        linears = {}
        for site, projs in FUSED_SITES.items():
            bias = None
            if site == "qkv" and cfg.attention_bias:
                bias = _fused(ckpt, [hf_weight_name(i, p).replace(".weight", ".bias") for p in projs], device, dtype)
            if gguf is not None:
                linears[site] = QuantizedLinear(gguf.fused(i, projs), bias, "gguf")
            else:
                linears[site] = linear(_fused(ckpt, [hf_weight_name(i, p) for p in projs], device, dtype), bias,
                                       quantization)
        norms = (_tensor(ckpt, f"model.layers.{i}.input_layernorm.weight", device, dtype),
                 _tensor(ckpt, f"model.layers.{i}.post_attention_layernorm.weight", device, dtype))
        layers.append(DecoderLayer(i, cfg, linears, norms))
    embed = _tensor(ckpt, "model.embed_tokens.weight", device, dtype)
    head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings or "lm_head.weight" not in ckpt else "lm_head.weight"
    # The tied head shares the embedding's storage on the plain path; the packed kernel is a separate layout.
    if gguf is not None:
        head = QuantizedLinear(gguf.output(), None, "gguf")
    else:
        head = linear(embed if head_name == "model.embed_tokens.weight" else _tensor(ckpt, head_name, device, dtype),
                      None, "none" if quantization == "none" else "int8", editable=False)
    norm = _tensor(ckpt, "model.norm.weight", device, dtype)
    return Transformer(cfg, embed, layers, norm, head, device)
