"""The CPU panel kernel (`panel_linear.c`): fp32 y = x W^T with W stored as [out/16, in, 16] panels.

Where the kernel cannot be built here, or disagrees with `F.linear` on a self-check, `panel_kernel()` returns
None and the backend (server.model.backend) keeps to oneDNN: the kernel is an optimisation, never a
requirement.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch
import torch.nn.functional as F

from server.kernels.build import load_library

log = logging.getLogger("loraplex.kernels")

PANEL = 16  # output rows per panel, fixed by the C kernel's tiles (2 ymm or 1 zmm per panel row)


class PanelKernel:
    """One entry point of the loaded library; `__call__` is one fp32 product against packed panels.

    `panel_linear` picks the AVX-512 tile at run time where the CPU has it, else the AVX2 one;
    `panel_linear_avx2` and `panel_linear_avx512` are each tile on its own (see `isa_variants`)."""

    def __init__(self, library: ctypes.CDLL, entry: str = "panel_linear"):
        self._fn = getattr(library, entry)
        self._fn.restype = None
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                             ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]

    def __call__(self, x: torch.Tensor, panels: torch.Tensor, out_features: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        lead, inp = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, inp)
        if x2.stride(1) != 1 or x2.dtype != torch.float32:
            x2 = x2.contiguous().float()
        n_panels = panels.shape[0]
        y = torch.empty(x2.shape[0], n_panels * PANEL, dtype=torch.float32, device=x.device)
        if x2.shape[0]:
            self._fn(x2.data_ptr(), x2.shape[0], inp, x2.stride(0), panels.data_ptr(), n_panels, y.data_ptr(),
                     y.stride(0), torch.get_num_threads())
        if y.shape[1] != out_features:
            y = y[:, :out_features]
        if bias is not None:
            y.add_(bias)
        return y.view(*lead, out_features) if y.is_contiguous() else y.reshape(*lead, out_features)


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] fp32 -> [ceil(out/16), in, 16]; rows past `out` are zeros (their outputs are dropped)."""
    out, inp = weight.shape
    padded = -(-out // PANEL) * PANEL
    if padded != out:
        weight = torch.cat([weight, weight.new_zeros(padded - out, inp)])
    return weight.reshape(padded // PANEL, PANEL, inp).transpose(1, 2).contiguous()


@functools.cache
def panel_kernel() -> PanelKernel | None:
    """The kernel for this machine, built on first use; None where it cannot run here (logged once)."""
    library = load_library("panel_linear")
    if library is None:
        return None
    kernel = PanelKernel(library)
    if not _agrees_with_f_linear(kernel):
        log.warning("panel kernel: self-check against F.linear failed; using oneDNN")
        return None
    return kernel


def isa_variants() -> dict[str, PanelKernel]:
    """Each instruction-set variant this CPU can run ("avx2", "avx512"), so tests cover both tiles where the
    dispatching entry point would only ever run one."""
    library = load_library("panel_linear")
    if library is None:
        return {}
    variants = {"avx2": PanelKernel(library, "panel_linear_avx2")}
    if library.panel_linear_has_avx512():
        variants["avx512"] = PanelKernel(library, "panel_linear_avx512")
    return variants


def _agrees_with_f_linear(kernel: PanelKernel) -> bool:
    generator = torch.Generator().manual_seed(0)
    for rows, out, inp in ((1, 16, 8), (7, 40, 130), (13, 48, 300)):  # partial tiles, panels and K blocks
        weight = torch.randn(out, inp, generator=generator)
        x = torch.randn(rows, inp, generator=generator)
        if not torch.allclose(kernel(x, pack_panels(weight), out), F.linear(x, weight), atol=1e-4, rtol=1e-4):
            return False
    return True
