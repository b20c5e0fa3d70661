"""A Llama-family decoder in plain torch, shaped for serving.

Tokens of all sequences in a step are flattened into one [tokens, hidden] matrix, so every projection is
one matmul for the whole batch. q/k/v and gate/up are fused: fewer, larger products (docs/decisions.md).
Attention reads and writes the preallocated KV cache in place (server.model.attention). LoRA side branches
are added at four sites per layer (qkv, o, gate_up, down) by the step's LoRA plan (`StepContext.lora`),
where the step has one. Where the backend has the native decoder stack (CPU, fp32) a decode step runs all
layers in one call (`server.model.native_stack`) through the same kernels; `DecoderLayer` is what it is
held to, and the path for steps with prompt chunks. Nothing here knows about requests or HTTP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.kernels.pointwise import PointwiseKernels
from server.model.attention import KVTensors, attend
from server.model.backend import Backend
from server.model.config import ModelConfig
from server.model.context import StepContext
from server.model.geometry import module_key, projection_shapes
from server.model.linear import Linear
from server.model.native_stack import NativeStack


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: PointwiseKernels | None = None) -> torch.Tensor:
    if fused is not None and (out := fused.rms_norm(x, weight, eps)) is not None:
        return out
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    if cfg.rope_scaling:  # llama3: stretch low frequencies, keep high ones, blend between
        s = cfg.rope_scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * torch.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           fused: PointwiseKernels | None = None) -> torch.Tensor:
    """x [rows, heads, d] rotated by each row's angles: in place where the fused kernel runs."""
    if fused is not None and fused.rope_(x, cos, sin):
        return x
    return apply_rope(x, cos, sin)


def silu_mul(gate_up: torch.Tensor, fused: PointwiseKernels | None = None) -> torch.Tensor:
    if fused is not None and (out := fused.silu_mul(gate_up)) is not None:
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer:
    def __init__(self, index: int, cfg: ModelConfig, linears: dict[str, Linear],
                 norms: tuple[torch.Tensor, torch.Tensor], qk_norms: tuple[torch.Tensor, torch.Tensor] | None,
                 backend: Backend):
        self.index = index
        self.cfg = cfg
        self.linears = linears
        self.input_norm, self.post_attention_norm = norms
        self.qk_norms = qk_norms  # (q, k) weights over one head, where the family norms each head (Qwen3)
        self.pointwise = backend.pointwise
        self.decode_attention = backend.decode_attention

    def _project(self, site: str, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        y = self.linears[site](x)
        if ctx.lora is not None:
            ctx.lora.add(y, x, self.index, site)
        return y

    def _norm_heads(self, qk: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)
        q = rms_norm(q.reshape(-1, cfg.head_dim), self.qk_norms[0], cfg.rms_norm_eps, self.pointwise).view_as(q)
        k = rms_norm(k.reshape(-1, cfg.head_dim), self.qk_norms[1], cfg.rms_norm_eps, self.pointwise).view_as(k)
        return torch.cat((q, k), dim=1)

    def __call__(self, h: torch.Tensor, ctx: StepContext, cos: torch.Tensor, sin: torch.Tensor,
                 kv: KVTensors) -> torch.Tensor:
        cfg = self.cfg
        x = rms_norm(h, self.input_norm, cfg.rms_norm_eps, self.pointwise)
        qkv = self._project("qkv", x, ctx)
        # q and k sit side by side in the fused output: rotated in one pass, as heads + kv_heads heads
        qk = qkv[:, : cfg.q_size + cfg.kv_size].view(-1, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        if self.qk_norms is not None:
            qk = self._norm_heads(qk)
        qk = rotate(qk, cos, sin, self.pointwise)
        q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(-1, cfg.num_kv_heads, cfg.head_dim)
        attn = attend(kv, self.index, q, k, v, ctx, cfg.window(self.index), self.decode_attention)
        # in place: h is this step's own tensor (the embedding lookup's, then each layer's), never an input's
        h = h.add_(self._project("o", attn.reshape(-1, cfg.q_size), ctx))
        x = rms_norm(h, self.post_attention_norm, cfg.rms_norm_eps, self.pointwise)
        return h.add_(self._project("down", silu_mul(self._project("gate_up", x, ctx), self.pointwise), ctx))


class Transformer:
    def __init__(self, cfg: ModelConfig, embed, layers: list[DecoderLayer], norm: torch.Tensor, lm_head: Linear,
                 backend: Backend):
        self.cfg = cfg
        self.embed = embed  # token ids -> rows (server.model.embedding)
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.backend = backend
        self.device = backend.device
        self.dtype = embed.dtype
        self.inv_freq = rope_inv_freq(cfg).to(self.device)
        # the decode steps' layers in one native call where they can be (None: always layer by layer)
        self.native_stack = NativeStack.build(self, backend.decoder_layers)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # broadcast over heads
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: StepContext, kv: KVTensors) -> torch.Tensor:
        """Returns float32 logits [seqs, vocab] for the rows in ctx.logits_rows."""
        h = self.embed(input_ids)
        cos, sin = self.rope_tables(ctx.positions)
        if self.native_stack is None or not self.native_stack.run(h, ctx, cos, sin, kv):
            for layer in self.layers:
                h = layer(h, ctx, cos, sin, kv)
        h = rms_norm(h[ctx.logits_rows], self.norm, self.cfg.rms_norm_eps, self.backend.pointwise)
        return self.lm_head(h).float()

    def linear_tensors(self) -> list[torch.Tensor]:
        """What every decode step streams: the projections' and the lm_head's kernels (and merge scratch)."""
        return [t for layer in self.layers for lin in layer.linears.values() for t in lin.tensors()] + \
            self.lm_head.tensors()

    def linear(self, layer: int, site: str) -> Linear:
        return self.layers[layer].linears[site]

    def lora_target_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each unfused projection, keyed as adapters name them (`module_key`)."""
        shapes = projection_shapes(self.cfg)
        return {module_key(i, p): s for i in range(self.cfg.num_layers) for p, s in shapes.items()}
