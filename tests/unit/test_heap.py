import gc
import platform

import pytest

from server.heap import CollectionTimer, freeze_startup_objects, keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_heap_settings():
    assert keep_freed_memory(trim_mb=256) is True


def test_it_never_raises_whatever_the_c_library():
    assert keep_freed_memory() in (True, False)


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
