"""A Llama-family decoder in plain torch, shaped for serving.

Tokens of all sequences in a step are flattened into one [tokens, hidden] matrix, so every projection is
one matmul for the whole batch. q/k/v and gate/up are fused: fewer, larger products (docs/decisions.md).
Attention reads and writes the preallocated KV cache in place (server.model.attention). LoRA side branches
are added at four sites per layer (qkv, o, gate_up, down) by the step's LoRA plan (`StepContext.lora`),
where the step has one. Where the backend has the native decoder stack (CPU, fp32) a decode step runs all
layers in one call (`server.model.native_stack`) through the same kernels; `DecoderLayer` is what it is
held to, and the path for steps with prompt chunks; it is bypassed for a model whose layers do more than
Llama's (`ModelConfig.beyond_llama_layer`: Gemma's norms, soft-capping, GeLU...). Nothing here knows about
requests or HTTP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from server.kernels.pointwise import PointwiseKernels
from server.model.attention import KVTensors, attend, soft_cap
from server.model.backend import Backend
from server.model.config import ModelConfig
from server.model.context import StepContext
from server.model.geometry import module_key, projection_shapes
from server.model.linear import Linear
from server.model.native_stack import NativeStack


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: PointwiseKernels | None = None,
             offset: float = 0.0) -> torch.Tensor:
    """Llama's: weight * x-hat, x-hat rounded to x's dtype first. With an offset (Gemma's 1), as Gemma rounds:
    x-hat * (offset + weight) in fp32, rounded once at the end."""
    if offset:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (xf * (offset + weight.float())).to(x.dtype)
    if fused is not None and (out := fused.rms_norm(x, weight, eps)) is not None:
        return out
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """The global layers' frequencies, or (local) those of the layers with their own base, unscaled."""
    theta, scaling = (cfg.local_rope_theta, None) if local else (cfg.rope_theta, cfg.rope_scaling)
    dims = torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim
    inv_freq = 1.0 / (theta ** dims)
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else "default"
    if kind == "linear":  # positions divided by factor
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":  # stretch low frequencies, keep high ones, blend between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * torch.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, scaling, theta, cfg.head_dim)
    elif kind == "longrope":  # per-dimension factors, the long ones where the served length passes the original
        long = cfg.max_position_embeddings > scaling["original_max_position_embeddings"]
        inv_freq = inv_freq / torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
    # dynamic NTK equals the default up to max_position_embeddings, all a model is served to (served_up_to)
    return inv_freq.float()


def rope_attention_factor(cfg: ModelConfig, local: bool = False) -> float:
    """What YaRN and LongRoPE multiply cos and sin by (1 for every other rope)."""
    return 1.0 if local or not cfg.rope_scaling else cfg.rope_scaling.get("attention_factor", 1.0)


def _yarn_inv_freq(inv_freq: torch.Tensor, scaling: dict, theta: float, dim: int) -> torch.Tensor:
    """YaRN: frequencies that turn fewer than beta_slow times over the original length are interpolated
    (divided by factor), those turning more than beta_fast times kept, a linear ramp between (transformers')."""
    original = scaling["original_max_position_embeddings"]

    def turning_dim(turns: float) -> float:
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = turning_dim(scaling.get("beta_fast") or 32), turning_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    return inv_freq / scaling["factor"] * ramp + inv_freq * (1 - ramp)


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


def gated(gate_up: torch.Tensor, activation: str, fused: PointwiseKernels | None = None) -> torch.Tensor:
    """act(gate) * up, for gate_up [rows, 2n] holding gate then up."""
    if activation == "silu":
        return silu_mul(gate_up, fused)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh").mul_(up)  # gelu_pytorch_tanh, the one other ACTIVATIONS holds


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer:
    def __init__(self, index: int, cfg: ModelConfig, linears: dict[str, Linear],
                 norms: tuple[torch.Tensor, torch.Tensor], qk_norms: tuple[torch.Tensor, torch.Tensor] | None,
                 backend: Backend, output_norms: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.index = index
        self.cfg = cfg
        self.linears = linears
        # the norms attention and the MLP read (Llama's input and post_attention, Gemma's input and pre_feedforward)
        self.input_norm, self.post_attention_norm = norms
        self.qk_norms = qk_norms  # (q, k) weights over one head, where the family norms each head (Qwen3, Gemma 3)
        self.output_norms = output_norms  # (attention's, the MLP's) before each residual add (Gemma)
        self.local_rope = cfg.uses_local_rope(index)
        self.pointwise = backend.pointwise
        self.decode_attention = backend.decode_attention

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.cfg.rms_norm_eps, self.pointwise, self.cfg.norm_offset)

    def _project(self, site: str, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        y = self.linears[site](x)
        if ctx.lora is not None:
            ctx.lora.add(y, x, self.index, site)
        return y

    def _norm_heads(self, qk: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)
        q = self._norm(q.reshape(-1, cfg.head_dim), self.qk_norms[0]).view_as(q)
        k = self._norm(k.reshape(-1, cfg.head_dim), self.qk_norms[1]).view_as(k)
        return torch.cat((q, k), dim=1)

    def __call__(self, h: torch.Tensor, ctx: StepContext, cos: torch.Tensor, sin: torch.Tensor,
                 kv: KVTensors) -> torch.Tensor:
        cfg = self.cfg
        x = self._norm(h, self.input_norm)
        qkv = self._project("qkv", x, ctx)
        # q and k sit side by side in the fused output: rotated in one pass, as heads + kv_heads heads
        qk = qkv[:, : cfg.q_size + cfg.kv_size].view(-1, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        if self.qk_norms is not None:
            qk = self._norm_heads(qk)
        qk = rotate(qk, cos, sin, self.pointwise)
        q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(-1, cfg.num_kv_heads, cfg.head_dim)
        attn = attend(kv, self.index, q, k, v, ctx, cfg.window(self.index), self.decode_attention,
                      cfg.attention_scale, cfg.attn_softcap)
        # in place: h is this step's own tensor (the embedding lookup's, then each layer's), never an input's
        h = h.add_(self._output(0, self._project("o", attn.reshape(-1, cfg.q_size), ctx)))
        x = self._norm(h, self.post_attention_norm)
        mlp = self._project("down", gated(self._project("gate_up", x, ctx), cfg.activation, self.pointwise), ctx)
        return h.add_(self._output(1, mlp))

    def _output(self, block: int, y: torch.Tensor) -> torch.Tensor:
        return y if self.output_norms is None else self._norm(y, self.output_norms[block])


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
        # as transformers scales them: the factor rounded to fp32, then to the model's dtype
        self.embed_scale = torch.tensor(cfg.embed_scale).to(self.dtype) if cfg.embed_scale != 1.0 else None
        self.inv_freq = rope_inv_freq(cfg).to(self.device)
        self.rope_scale = rope_attention_factor(cfg)
        self.local_inv_freq = rope_inv_freq(cfg, local=True).to(self.device) if cfg.local_rope_layers else None
        # the decode steps' layers in one native call where they can be (None: always layer by layer); the
        # kernel computes Llama's layer and nothing more
        stack_kernel = None if cfg.beyond_llama_layer() else backend.decoder_layers
        self.native_stack = NativeStack.build(self, stack_kernel)

    def rope_tables(self, positions: torch.Tensor, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * (self.local_inv_freq if local else self.inv_freq)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # broadcast over heads
        cos, sin = emb.cos(), emb.sin()
        if self.rope_scale != 1.0 and not local:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        return cos.to(self.dtype), sin.to(self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: StepContext, kv: KVTensors) -> torch.Tensor:
        """Returns float32 logits [seqs, vocab] for the rows in ctx.logits_rows."""
        h = self.embed(input_ids)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        tables = {False: self.rope_tables(ctx.positions)}
        if self.local_inv_freq is not None:
            tables[True] = self.rope_tables(ctx.positions, local=True)
        if self.native_stack is None or not self.native_stack.run(h, ctx, *tables[False], kv):
            for layer in self.layers:
                h = layer(h, ctx, *tables[layer.local_rope], kv)
        h = rms_norm(h[ctx.logits_rows], self.norm, self.cfg.rms_norm_eps, self.backend.pointwise,
                     self.cfg.norm_offset)
        logits = self.lm_head(h)
        if self.cfg.final_softcap is not None:
            logits = soft_cap(logits, self.cfg.final_softcap)
        return logits.float()

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
