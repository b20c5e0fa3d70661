"""The CPU panel kernel (`kernels/panel_linear.c`): fp32 y = x W^T with W stored as [out/16, in, 16] panels.

It is compiled once per machine with the system C compiler (`$CC`, else `cc`) into the loraplex cache and
loaded with ctypes; `python -m server.model.prepare` builds it ahead of time (the Docker image does so at
build time). Where there is no compiler, no AVX2/FMA, or the built kernel disagrees with `F.linear` on a
self-check, `panel_kernel()` returns None and `Linear` keeps to oneDNN: the kernel is an optimisation, never
a requirement.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from server.model.loader import cache_root

log = logging.getLogger("loraplex.kernel")

PANEL = 16  # output rows per panel, fixed by the C kernel's 2 x 8-float accumulators
SOURCE = Path(__file__).with_name("kernels") / "panel_linear.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


class PanelKernel:
    """The loaded shared library; `__call__` is one fp32 product against packed panels."""

    def __init__(self, library: ctypes.CDLL):
        self._fn = library.panel_linear
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
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("panel kernel: CPU lacks AVX2/FMA; using oneDNN")
        return None
    library = build_library(cache_root() / "kernels")
    if library is None:
        return None
    kernel = PanelKernel(ctypes.CDLL(str(library)))
    if not _agrees_with_f_linear(kernel):
        log.warning("panel kernel: self-check against F.linear failed; using oneDNN")
        return None
    return kernel


def build_library(cache_dir: Path) -> Path | None:
    """Compiles the kernel into `cache_dir` unless a build of this exact source is there already."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir / f"panel_linear-{digest}.so"
    if target.exists():
        return target
    if compiler is None:
        log.info("panel kernel: no C compiler found; using oneDNN")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary name, renamed into place: concurrent builds (test workers, replicas) never load
    # a half-written library.
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], check=True, capture_output=True, timeout=120)
        os.replace(partial, target)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("panel kernel: build failed (%s) %s; using oneDNN", exc, detail.decode(errors="replace")[-500:])
        return None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _agrees_with_f_linear(kernel: PanelKernel) -> bool:
    generator = torch.Generator().manual_seed(0)
    for rows, out, inp in ((1, 16, 8), (7, 40, 130), (13, 48, 300)):  # partial tiles, panels and K blocks
        weight = torch.randn(out, inp, generator=generator)
        x = torch.randn(rows, inp, generator=generator)
        if not torch.allclose(kernel(x, pack_panels(weight), out), F.linear(x, weight), atol=1e-4, rtol=1e-4):
            return False
    return True
