"""The bench's contention probes before and during a run: waiting for quiet cores, and warning of shared ones."""

import bench.run as bench_run


def probes_reading(*free: bool):
    readings = iter(free)

    def fake_in_fresh_process(fn, *args):
        both = 184.0 if next(readings) else 110.0
        return {"one_thread_gflops": 93.0, "all_threads_gflops": both, "threads": 2, "read_gbps": 35.0}
    return fake_in_fresh_process


def test_it_starts_once_three_probes_in_a_row_find_the_cores_free(monkeypatch):
    """(Free: two threads near twice the best one-thread reading so far.)"""
    calls = probes_reading(True, False, True, True, True, False)
    seen = []
    monkeypatch.setattr(bench_run, "in_fresh_process", lambda fn, *a: seen.append(fn) or calls(fn, *a))
    monkeypatch.setattr(bench_run.time, "sleep", lambda s: None)
    bench_run.wait_until_quiet(minutes=5)
    assert len(seen) == 5  # free, shared (count restarts), free, free, free


def test_it_gives_up_at_its_limit(monkeypatch, capsys):
    clock = iter(range(0, 10_000, 100))  # each look at the clock is 100 s later
    calls = probes_reading(*[False] * 50)
    seen = []
    monkeypatch.setattr(bench_run.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(bench_run, "in_fresh_process", lambda fn, *a: seen.append(fn) or calls(fn, *a))
    monkeypatch.setattr(bench_run.time, "sleep", lambda s: None)
    bench_run.wait_until_quiet(minutes=5)
    assert len(seen) == 2  # at 100 and 200 s; at 300 s the 5 minutes are up
    assert "did not look free 3 times in a row within 5 min: starting anyway" in capsys.readouterr().err


def test_a_probe_during_the_run_warns_when_its_cores_look_shared_against_the_runs_earlier_probes(
        monkeypatch, capsys):
    start = {"one_thread_gflops": 93.0, "all_threads_gflops": 184.0, "threads": 2, "read_gbps": 35.0}
    slowed_alone_too = {"one_thread_gflops": 62.0, "all_threads_gflops": 112.0, "threads": 2, "read_gbps": 25.0}
    monkeypatch.setattr(bench_run, "in_fresh_process", lambda fn, *a: slowed_alone_too)
    assert bench_run.probe_contention(0.5, {}) == slowed_alone_too
    assert "warning" not in capsys.readouterr().err  # on its own it looks free
    bench_run.probe_contention(0.5, {"contention_probe_start": start})
    assert "warning: the cores look shared (GEMM 62 GFLOP/s on 1 thread, 112 on 2" in capsys.readouterr().err
