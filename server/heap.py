"""Process memory settings: glibc's heap for the multi-megabyte buffers a hot-swap frees and reallocates,
and Python's collector for the objects start-up leaves behind.

By default glibc serves blocks above a (dynamic) threshold with fresh mmap()s and returns free memory at
the top of the heap to the OS once it exceeds a trim threshold. A hot-swap that re-packs its kernels frees
about 70 MB of them and allocates them again on the next merge; with the defaults every such buffer came
back as new pages, and the page faults doubled the swap's time (38 vs 20 ms for merge_into_base +
restore_base of a q/v r8 adapter on SmolLM2, in-process, median of 15, when fp32 kernels were still
re-packed; they are now written in place, bf16 ones still re-pack). Keeping up to `trim_mb` of freed
memory in the heap costs at most that much resident memory. Other C libraries (musl, macOS) have no
mallopt: nothing to do there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import platform
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc rejects larger values on 64-bit


def keep_freed_memory(trim_mb: int = 256) -> bool:
    """Returns whether the settings took effect."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _GLIBC_MAX_MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_mb * 2**20) == 1
    if not ok:
        log.info("mallopt refused the heap settings; allocations keep glibc's defaults")
    return ok


# glibc madvises its main heap and its own mmaps for huge pages, not the other arenas' heaps: the model
# loads on the engine thread (see server.runtime), whose allocations came from a second arena, and 380 MB of
# the server's 1.3 GB sat in huge pages instead of all of it. With one arena every thread allocates from the
# main heap (resident memory unchanged; the threads that allocate are the engine's and the event loop's).
HUGE_PAGE_TUNABLES = {"glibc.malloc.hugetlb": "1", "glibc.malloc.arena_max": "1"}
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_env(environ: Mapping[str, str], thp_mode: Path = THP_MODE) -> dict[str, str] | None:
    """The environment to restart the server in so that glibc's malloc backs its memory with transparent
    huge pages, or None where that is already so, cannot be, or LORAPLEX_HUGE_PAGES=0 opts out.

    Why: a decode step streams every weight from DRAM once, 540 MB for SmolLM2 fp32, and with 4 KB pages
    that is 130,000 TLB misses, each a page walk (two-dimensional in a VM). With the weights, KV cache and
    adapter slots in 2 MB pages, a 16-row decode step took 34.2 vs 36.2 ms and a 1-row one 19.1 vs 20.4 ms
    on a 2-core Zen 3 EPYC VM (in-process, in turns; resident memory unchanged). The kernel only gives
    huge pages to memory that asks (`madvise`, the common default) or to all (`always`, where this is not
    needed); glibc asks for its heap once these tunables are set, and it reads tunables only when a process
    starts. Tunables the user set keep their values."""
    if environ.get("LORAPLEX_HUGE_PAGES", "1") == "0" or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    named = {t.split("=", 1)[0] for t in tunables}
    if "glibc.malloc.hugetlb" in named:
        return None
    try:
        if "[madvise]" not in thp_mode.read_text():
            return None
    except OSError:
        return None
    ours = [f"{name}={value}" for name, value in HUGE_PAGE_TUNABLES.items() if name not in named]
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables + ours)}


def huge_page_bytes() -> int | None:
    """Bytes of this process's memory in transparent huge pages (None where the kernel does not say)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def freeze_startup_objects() -> int:
    """Moves every object alive now out of the cyclic collector's reach; returns how many it froze.

    After start-up the server holds about 350,000 long-lived objects (torch, transformers, the tokenizer).
    A full collection walks all of them: the ones during start-up took 170-250 ms each on this 2-core CPU,
    holding the GIL, so one during serving would stall the engine thread and every stream by as much.
    Frozen (as vLLM does once its engine is up), they are skipped; they are never freed either, which costs
    nothing for objects that live as long as the process. Called by the serving process once it is up, not
    by Runtime: tests build several runtimes in one process and drop them, and frozen cycles stay forever.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%d start-up objects frozen out of the garbage collector", frozen)
    return frozen


class CollectionTimer:
    """Reports each run of the cyclic garbage collector, `observe(generation, seconds)`, while installed.

    A collection holds the GIL, so the engine thread's Python (every step's glue between kernels) waits it
    out: the pauses are what a token stall without an engine cause looks like. gc.callbacks is
    process-wide; install once per serving process and remove on shutdown."""

    def __init__(self, observe: Callable[[int, float], None]):
        self._observe = observe
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            self._observe(info["generation"], time.perf_counter() - self._started)
            self._started = 0.0

    def install(self) -> CollectionTimer:
        gc.callbacks.append(self)
        return self

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
