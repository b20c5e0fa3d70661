"""Process memory settings: glibc's heap for the multi-megabyte buffers a hot-swap frees and reallocates,
and Python's collector for the objects start-up leaves behind.

By default glibc serves blocks above a (dynamic) threshold with fresh mmap()s and returns free memory at
the top of the heap to the OS once it exceeds a trim threshold. A hot-swap that re-packs its kernels (bf16;
fp32 ones are written in place) frees tens of MB and allocates them again on the next merge; with the
defaults every such buffer comes back as new pages, whose faults can double the swap's time (`make bench`,
the swap row; docs/decisions.md). Keeping up to `trim_mb` of freed memory in the heap costs at most that
much resident memory. Other C libraries (musl, macOS) have no mallopt: nothing to do there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable
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


_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25  # Linux 6.1+
_HUGE_PAGE = 2 * 2**20


def back_with_huge_pages(tensors) -> bool:
    """Asks the kernel to hold these (long-lived, CPU) tensors' memory in 2 MB transparent huge pages;
    returns whether they are in huge pages now. False where the kernel or C library cannot, and before
    Linux 6.1 (no MADV_COLLAPSE), where the advice still lets khugepaged move them in its own time.

    Why: a decode step streams every weight from DRAM once, and with 4 KB pages that is a TLB miss, a page
    walk (two-dimensional in a VM), every 4 KB (`make bench`, base-16; docs/decisions.md). Only the weights:
    huge pages for the whole process (glibc's `glibc.malloc.hugetlb`) decode as fast but turn each KV slot's
    few touched 4 KB pages into whole 2 MB ones, costing peak RSS. The tensors' ranges are merged (the heap
    keeps them side by side) and their 2 MB-aligned insides advised (MADV_HUGEPAGE, so the kernel may) and
    collapsed (MADV_COLLAPSE, so it does now rather than whenever khugepaged passes)."""
    storages = [t.untyped_storage() for t in tensors if t.device.type == "cpu"]
    ranges = sorted((s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages if s.nbytes() > 0)
    merged: list[list[int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1] + _HUGE_PAGE:  # what lies between is other heap memory: harmless
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError, TypeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    outcomes = []
    for start, end in merged:
        first, last = -(-start // _HUGE_PAGE) * _HUGE_PAGE, end // _HUGE_PAGE * _HUGE_PAGE
        if last > first:  # else no whole huge page fits inside
            outcomes.append(madvise(first, last - first, _MADV_HUGEPAGE) == 0
                            and madvise(first, last - first, _MADV_COLLAPSE) == 0)  # 6.1+; older: EINVAL
    return bool(outcomes) and all(outcomes)


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

    After start-up the server holds hundreds of thousands of long-lived objects (torch, transformers, the
    tokenizer). A full collection walks all of them holding the GIL, so one during serving would stall the
    engine thread and every stream for as long (the GC pauses on `/metrics`; docs/decisions.md).
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
