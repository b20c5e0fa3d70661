"""`python -m bench.micro_linear`: the base-matmul backends of `server.model.linear.Linear`, as ratios.

One decode step multiplies the batch's rows by every projection once: 121 distinct SmolLM2-135M weights
(30 layers x qkv, o, gate_up, down, and the tied lm_head), 540 MB in fp32, far more than any cache. So this
times one pass over that many distinct weights per backend (in turns, median), not one cache-hot weight
repeated, and prints each backend's time, the rate it streamed the weights at, and its speed as a multiple
of `F.linear` (the "torch" backend, MKL sgemm on CPU) measured in the same run. The same weights quantized
(int4, int8: `server.kernels.block_linear`, where it runs) are timed beside them, streaming their own bytes.
"""

from __future__ import annotations

import torch

from bench.micro import interleaved_medians
from server.model.backend import linear_kinds, resolve_backend
from server.model.linear import Linear
from server.model.quantized_linear import FORMATS, QuantizedLinear, quantize

LAYERS = 30
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
LM_HEAD = (49152, 576)


def main() -> None:
    cpu = torch.device("cpu")
    backends = linear_kinds(cpu, torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, backends: {', '.join(backends)}")
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(*shape, generator=generator) * 0.02 for shape in LAYER_SHAPES * LAYERS + [LM_HEAD]]
    linears = {b: [Linear(w, None, resolve_backend(cpu, torch.float32, b), editable=False) for w in weights]
               for b in backends}
    block = resolve_backend(cpu, torch.float32, quantization="int4").block
    if block is not None:
        linears |= {fmt: [QuantizedLinear(quantize(w, fmt), None, fmt, block) for w in weights] for fmt in FORMATS}
    fp32_bytes = sum(w.numel() * w.element_size() for w in weights)
    weight_bytes = {b: sum(linear.quantized.nbytes for linear in ls) if b in FORMATS else fp32_bytes
                    for b, ls in linears.items()}
    print(f"{'batch':>5} " + " ".join(f"{b + ' ms':>11} {'GB/s':>5} {'vs torch':>8}" for b in linears))
    for batch in (1, 16, 64, 256):
        inputs = {n: torch.randn(batch, n, generator=generator) for n in (576, 1536)}

        def one_pass(layer_linears):
            return lambda: [linear(inputs[linear.in_features]) for linear in layer_linears]

        seconds = interleaved_medians({b: one_pass(ls) for b, ls in linears.items()}, reps=5)
        print(f"{batch:5d} " + " ".join(
            f"{seconds[b] * 1e3:11.1f} {weight_bytes[b] / seconds[b] / 1e9:5.1f} {seconds['torch'] / seconds[b]:7.2f}x"
            for b in linears))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
