import gc
import platform

import pytest

from server.heap import CollectionTimer, freeze_startup_objects, huge_page_bytes, huge_page_env, keep_freed_memory


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


glibc_linux = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or platform.system() != "Linux",
                                 reason="the tunable is glibc's, the huge pages Linux's")


def thp_mode(tmp_path, text: str):
    path = tmp_path / "enabled"
    path.write_text(text)
    return path


@glibc_linux
def test_the_server_restarts_with_huge_page_malloc_where_the_kernel_gives_them_on_request(tmp_path):
    env = huge_page_env({"PATH": "/bin"}, thp_mode(tmp_path, "always [madvise] never\n"))
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1"}
    kept = huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.check=0"},
                         thp_mode(tmp_path, "always [madvise] never"))
    # the user's tunables stay as they were
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.check=0:glibc.malloc.hugetlb=1"


@glibc_linux
@pytest.mark.parametrize("environ, mode", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "always [madvise] never"),  # already restarted: no loop
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "always [madvise] never"),  # the user's choice stands
    ({"LORAPLEX_HUGE_PAGES": "0"}, "always [madvise] never"),                   # opted out
    ({}, "always madvise [never]"),                                               # the kernel gives none
    ({}, "[always] madvise never"),                                               # the kernel gives them anyway
])
def test_no_restart_where_it_would_change_nothing(tmp_path, environ, mode):
    assert huge_page_env(environ, thp_mode(tmp_path, mode)) is None


def test_no_restart_where_the_kernel_does_not_say(tmp_path):
    assert huge_page_env({}, tmp_path / "missing") is None


def test_huge_page_bytes_reads_this_process_or_says_nothing():
    found = huge_page_bytes()
    assert found is None or found >= 0
