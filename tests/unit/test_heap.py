import gc
import platform
import re

from pathlib import Path

import pytest

from server import heap
from server.heap import (CollectionTimer, back_with_huge_pages, freeze_startup_objects, huge_page_bytes,
                         keep_freed_memory)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_heap_settings():
    assert keep_freed_memory(trim_mb=256) is True


class NoMallopt:
    """A C library without glibc's mallopt, as musl's and macOS's."""


class RefusingMallopt:
    @staticmethod
    def mallopt(param, value) -> int:
        return 0


@pytest.mark.parametrize("libc", [NoMallopt, RefusingMallopt])
def test_a_c_library_without_the_settings_leaves_the_defaults_and_says_so(monkeypatch, libc):
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name, **kw: libc())
    assert keep_freed_memory() is False


def test_no_c_library_to_load_is_no_error(monkeypatch):
    def missing(name, **kw):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(heap.ctypes, "CDLL", missing)
    assert keep_freed_memory() is False


def test_start_up_objects_leave_the_collectors_generations():
    held = [[i] for i in range(10_000)]  # long-lived containers, as a loaded server holds
    try:
        frozen = freeze_startup_objects()
        assert frozen >= len(held)
        assert len(gc.get_objects()) < 1_000  # what a full collection would still walk
        fresh = [[i] for i in range(100)]
        assert len(gc.get_objects()) >= len(fresh)  # objects made afterwards are still collected
    finally:
        gc.unfreeze()


def test_each_collection_is_reported_with_its_generation_until_removed():
    seen = []
    timer = CollectionTimer(lambda generation, seconds: seen.append((generation, seconds))).install()
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        timer.remove()
    gc.collect()
    assert {2, 0} <= {g for g, _ in seen}
    assert all(0 <= s < 10 for _, s in seen)
    timer.remove()  # twice is harmless


def kernel_collapses_on_request() -> bool:
    """Transparent huge pages not turned off, and MADV_COLLAPSE (Linux 6.1+): memory moves when asked."""
    if platform.system() != "Linux":
        return False
    try:
        if "[never]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read():
            return False
    except OSError:
        return False
    version = re.match(r"(\d+)\.(\d+)", platform.release())
    return version is not None and (int(version[1]), int(version[2])) >= (6, 1)


def huge_bytes_around(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not kernel_collapses_on_request(),
                    reason="needs Linux 6.1+ with transparent huge pages on (elsewhere khugepaged moves them later)")
def test_weights_move_into_huge_pages_with_their_values_kept():
    import torch

    # 40 MB: above glibc's largest mmap threshold, so a fresh mapping of 4 KB pages whatever ran before
    weights = torch.randn(10 * 2**20 + 17)
    before = weights.clone()
    assert back_with_huge_pages([weights]) is True
    # advising splits the mapping at 2 MB boundaries: the middle one is the advised, collapsed inside
    assert huge_bytes_around(weights.data_ptr() + 20 * 2**20) >= 36 * 2**20
    assert torch.equal(weights, before)


def test_nothing_to_advise_is_no_error():
    import torch

    assert back_with_huge_pages([]) is False
    assert back_with_huge_pages([torch.empty(0)]) is False
    assert back_with_huge_pages([torch.ones(1000)]) is False  # no whole 2 MB page inside: stays as it is


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="the kernel does not report it")
def test_huge_page_bytes_reads_this_process():
    found = huge_page_bytes()
    assert isinstance(found, int) and found % 4096 == 0


def test_huge_page_bytes_says_nothing_where_the_kernel_does_not_report_it(monkeypatch, tmp_path):
    monkeypatch.setattr(heap, "Path", lambda path: tmp_path / "no-smaps_rollup")
    assert huge_page_bytes() is None
