"""Builds a kernel's C source (`server/kernels/<name>.c`) once per machine into the loraplex cache and loads
it with ctypes; `python -m server.model.prepare` builds them ahead of time (the Docker image does so at
build time). Built with -fopenmp, a library links against libgomp.so.1, the soname of the copy torch has
already loaded, so its parallel loops share torch's thread pool rather than adding a second spinning one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from server.cache_dir import cache_root

log = logging.getLogger("loraplex.kernels")

SOURCES = Path(__file__).parent
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)


def load_library(name: str) -> ctypes.CDLL | None:
    """The built kernel `name`, or None (logged) where this CPU lacks AVX2/FMA or no build is possible."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("%s kernel: CPU lacks AVX2/FMA; using torch", name)
        return None
    library = build_library(SOURCES / f"{name}.c", cache_root() / "kernels")
    return ctypes.CDLL(str(library)) if library else None


def build_library(source: Path, cache_dir: Path) -> Path | None:
    """Compiles `source` into `cache_dir` unless a build of this exact source (and of the headers beside it,
    which it may include) is there already."""
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(FLAGS + LIBS).encode()).hexdigest()[:16]
    target = cache_dir / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("%s kernel: no C compiler found; using torch", source.stem)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary name, renamed into place: concurrent builds (test workers, replicas) never load
    # a half-written library.
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(source), "-o", partial, *LIBS], check=True, capture_output=True, timeout=120)
        os.replace(partial, target)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = (getattr(exc, "stderr", b"") or b"").decode(errors="replace")[-500:]
        log.warning("%s kernel: build failed (%s) %s; using torch", source.stem, exc, detail)
        return None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target
