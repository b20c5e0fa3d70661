"""The bench waits for quiet cores before a run when asked, and gives up after its limit."""

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
