"""The bench's verdict on whether the host held still through a run, from the run's own figures."""

from bench.steadiness import cores_look_free, findings, verdict


def probe(one: float, both: float, read: float) -> dict:
    return {"one_thread_gflops": one, "all_threads_gflops": both, "threads": 2, "read_gbps": read}


def run(base_runs: list[float], **probes: dict) -> dict:
    servers = {mode: {"workloads": {"base-16": {"tokens_per_s": first}, "base-16-again": {"tokens_per_s": last}}}
               for mode, first, last in zip(("merged", "unmerged"), base_runs[::2], base_runs[1::2])}
    return {"meta": {f"contention_probe_{when}": p for when, p in probes.items()}, "servers": servers}


def test_two_threads_must_read_near_twice_one_threads_gemm_for_the_cores_to_count_as_free():
    assert cores_look_free(probe(93, 184, 35))
    assert not cores_look_free(probe(85, 118, 23))  # 1.39x: a neighbour held part of a core
    assert cores_look_free({"one_thread_gflops": 90, "all_threads_gflops": 91, "threads": 1, "read_gbps": 20})
    slowed_alone_too = probe(62, 112, 25)
    assert cores_look_free(slowed_alone_too) and not cores_look_free(slowed_alone_too, one_thread_best=93)


def test_a_quiet_run_is_steady():
    quiet = run([427, 431, 418, 446], start=probe(93, 185, 35), between=probe(94, 184, 34),
                end=probe(94, 184, 35))
    assert findings(quiet) == [] and verdict(quiet).startswith("Host steady")


def test_a_slow_spell_shows_in_the_probes_and_in_the_spread_of_base_only_runs():
    busy = run([401, 328, 369, 330], start=probe(92, 181, 28), between=probe(93, 182, 29),
               end=probe(85, 118, 23))
    found = findings(busy)
    assert len(found) == 3
    assert "cores shared at the end probe (GEMM 85 GFLOP/s on 1 thread, 118 on 2; 93 on 1 at best)" in found[0]
    assert "memory read end 23 GB/s against 29 at best" in found[1]
    assert "base-16 read 328-401 tok/s over its 4 runs" in found[2]
    assert verdict(busy).startswith("HOST UNSTEADY: cores shared")


def test_a_run_written_before_the_middle_probe_is_judged_on_the_two_it_has():
    old = run([442, 461, 444, 439], start=probe(94, 184, 29), end=probe(93, 183, 31))
    assert findings(old) == []
