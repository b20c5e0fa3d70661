"""`python -m bench.simulated [--shapes 1.7b 8b] [--quantization int4]`: real-size bases, by simulation.

The only real model here is 135M. This builds Llama-shaped models with random weights layer by layer
straight into the quantized format (each projection is drawn in fp32, quantized and dropped, so the fp32
model never exists in memory), and times the serving model's decode steps (the engine's forward, with the
native decoder stack where it runs) at 1 and 16 rows, the 16 rows spread over 4 q/v r=8 adapters unmerged.
It prints load time, resident memory and tokens per second. Figures go to bench/README.md.
"""

from __future__ import annotations

import argparse
import time
import zlib

import torch

from adapters import llama_base_shapes, random_adapter
from bench.micro import interleaved_medians
from server.engine.kv_cache import KVCache
from server.heap import keep_freed_memory
from server.lora.layers import LoraSlots
from server.model.backend import resolve_backend
from server.model.config import ModelConfig
from server.model.context import build_step
from server.model.geometry import hf_weight_name, projection_shapes, site_layouts
from server.model.weights import build_transformer, weight_format

SHAPES = {  # SmolLM2-1.7B's and Llama-3-8B's geometry
    "1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=8192, vocab_size=49152, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}
CONTEXT = 128  # positions already in each row's KV cache when the timed steps run
ADAPTERS = 4


class RandomCheckpoint:
    """A checkpoint whose tensors are drawn when read (deterministic per name): nothing is held."""

    def __init__(self, cfg: ModelConfig):
        self.shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
                       "model.norm.weight": (cfg.hidden_size,)}
        if not cfg.tie_word_embeddings:
            self.shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
        for i in range(cfg.num_layers):
            for proj, shape in projection_shapes(cfg).items():
                self.shapes[hf_weight_name(i, proj)] = shape
            for norm in ("input_layernorm", "post_attention_layernorm"):
                self.shapes[f"model.layers.{i}.{norm}.weight"] = (cfg.hidden_size,)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:
            return torch.ones(shape)
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return torch.randn(shape, generator=generator) * 0.02


def config(shape: str) -> ModelConfig:
    return ModelConfig.from_hf({"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                                "max_position_embeddings": 4096, **SHAPES[shape]})


def rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def measure(shape: str, quantization: str, reps: int) -> None:
    cpu = torch.device("cpu")
    cfg = config(shape)
    before = rss_gib()
    started = time.perf_counter()
    checkpoint = RandomCheckpoint(cfg)
    backend = resolve_backend(cpu, torch.float32, quantization=quantization)
    model = build_transformer(cfg, checkpoint, backend, weight_format(quantization, checkpoint, backend))
    load_s = time.perf_counter() - started
    base_bytes = sum(t.numel() * t.element_size() for t in model.linear_tensors())
    shapes = llama_base_shapes(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.kv_size)
    slots = LoraSlots(cfg.num_layers, site_layouts(cfg), ADAPTERS, backend)
    for slot in range(ADAPTERS):
        slots.set_lora(slot, random_adapter(f"a{slot}", shapes, rank=8, seed=slot, init_std=0.01))
    kv = KVCache(cfg, 16, CONTEXT + 8, cpu, torch.float32)
    kv.used = 16

    def step(rows: int):
        ctx = build_step([CONTEXT] * rows, [], cpu)
        ctx.lora = slots.plan([i % ADAPTERS for i in range(rows)])
        return lambda: model.forward(torch.arange(rows) * 7, ctx, kv)

    seconds = interleaved_medians({"1 row": step(1), "16 rows": step(16)}, reps=reps)
    print(f"{shape} {quantization}: built in {load_s:.0f} s; base weights {base_bytes / 2**30:.2f} GiB, process "
          f"{rss_gib():.2f} GiB (+{rss_gib() - before:.2f}); native stack: {model.native_stack is not None}; "
          f"1 stream {1 / seconds['1 row']:.1f} tok/s, 16 streams over {ADAPTERS} adapters "
          f"{16 / seconds['16 rows']:.1f} tok/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.simulated", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--quantization", default="int4", choices=("int4", "int8", "none"))
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for shape in args.shapes:
        with torch.inference_mode():
            measure(shape, args.quantization, args.reps)


if __name__ == "__main__":
    main()
