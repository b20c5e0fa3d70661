"""The one place where activations meet frozen weights.

Every base matmul goes through `Linear`, so the fast path is chosen once at start-up and CUDA takes its own.
On CPU, oneDNN with the weight reordered ("prepacked") once into its blocked layout ran 2.5-3x the
throughput of `F.linear` (MKL sgemm) at batch 16-64 on this machine's EPYC (fp32, 2 threads; see
bench/micro_linear.py). The plain `weight` stays the canonical tensor: hot-swap merges edit it, and the
packed `kernel` is derived from it by `refresh()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "mkldnn")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    if name not in BACKENDS:
        raise ValueError(f"linear backend {name!r} is not one of {BACKENDS}")
    if name != "auto":
        return name
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _mkldnn_linear_works(dtype):
        return "mkldnn"
    return "torch"


def _mkldnn_linear_works(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(8, 16, dtype=dtype)
        x = torch.randn(3, 16, dtype=dtype)
        got = _mkldnn_apply(x, _mkldnn_pack(w), None)
        return torch.allclose(got.float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2)
    except RuntimeError:
        return False


def _mkldnn_pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)


def _mkldnn_apply(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, kernel, bias, "none", [], "")


class Linear:
    """y = x W^T (+ b) for a frozen W of shape [out, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str):
        self.weight = weight
        self.bias = bias
        self.backend = backend
        self.kernel = weight
        self.refresh()

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def refresh(self) -> None:
        """Re-derives the kernel after `weight` was edited in place."""
        self.kernel = _mkldnn_pack(self.weight) if self.backend == "mkldnn" else self.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "mkldnn":
            return _mkldnn_apply(x, self.kernel, self.bias)
        return F.linear(x, self.kernel, self.bias)
