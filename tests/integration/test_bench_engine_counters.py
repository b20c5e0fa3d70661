"""The bench's per-workload engine figures, read from a real server's /metrics, and their table."""

import httpx
import pytest

from bench.serving import BenchServer, counters_delta
from bench.table import _engine

pytestmark = pytest.mark.integration


def test_a_requests_steps_show_in_the_counters_and_the_table(tmp_path):
    with BenchServer(tmp_path / "store", "auto", max_batch=4) as server:
        before = server.engine_counters()
        body = {"prompt": "Hi", "max_new_tokens": 3, "temperature": 0, "ignore_eos": True}
        assert httpx.post(server.url + "/generate", json=body, timeout=60).status_code == 200
        delta = counters_delta(before, server.engine_counters())
    assert delta["prefill_steps"] == 1 and delta["decode_steps"] == 2  # the prompt's step samples the first token
    assert 0 < delta["decode_steps_s"] < 10 and delta["decode_steps_within_100ms"] <= 2
    assert delta["merges"] == delta["restores"] == delta["cover_builds"] == delta["slot_loads"] == 0
    assert delta["gc_pauses"] >= delta["gc_pauses_within_50ms"] >= 0
    results = {"servers": {"auto": {"workloads": {"one": {"engine": delta}}}}}
    row = _engine(results)[-1].split()
    assert row[:2] == ["auto", "one"] and row[2:4] == ["2", "x"] and row[5:7] == ["1", "x"]
