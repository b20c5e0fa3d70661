"""`python -m bench.micro_linear`: the base-matmul paths of `server.model.linear.Linear`, as ratios.

For each SmolLM2-135M projection shape and batch size, times `F.linear` (the "torch" backend, MKL sgemm on
CPU) and oneDNN with the weight prepacked once (the "mkldnn" backend) in the same run, and prints the
packed path's throughput as a multiple of `F.linear`'s.
"""

from __future__ import annotations

import time

import torch

from server.model.linear import Linear

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def seconds_per_call(fn, repeats: int = 100) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    print(f"{'site':8} {'batch':>5} {'F.linear GFLOP/s':>17} {'packed GFLOP/s':>15} {'packed / F.linear':>18}")
    for site, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features)
        plain, packed = Linear(weight, None, "torch"), Linear(weight, None, "mkldnn", editable=False)
        for batch in (1, 16, 64):
            x = torch.randn(batch, in_features)
            flops = 2 * batch * out_features * in_features
            t_plain, t_packed = seconds_per_call(lambda: plain(x)), seconds_per_call(lambda: packed(x))
            print(f"{site:8} {batch:5d} {flops / t_plain / 1e9:17.1f} {flops / t_packed / 1e9:15.1f} "
                  f"{t_plain / t_packed:17.2f}x")


if __name__ == "__main__":
    main()
