"""The mix and cold-adapter rows of `make bench`: how their workloads ask and which figures their goals divide
(the figures here are made up; nothing is timed)."""

import math

from bench.cold_adapter import render, summarize
from bench.load import request_body
from bench.run import auto_workloads
from bench.targets import AGAIN, MIX_WORKLOAD, cold_adapter_targets, mix_targets

QV = [f"qv-{i:04d}" for i in range(8)]


def test_a_mix_request_names_each_adapter_with_its_weight_and_a_single_one_by_name():
    assert request_body({"qv-0000": 0.5, "qv-0001": 0.5}, 8, "Hi")["adapters"] == [
        {"name": "qv-0000", "weight": 0.5}, {"name": "qv-0001", "weight": 0.5}]
    single = request_body("qv-0000", 8, "Hi")
    assert single["adapter"] == "qv-0000" and "adapters" not in single


def test_the_mix_workload_runs_in_the_mirrored_block_with_two_different_adapters_half_each():
    loads = {w.name: w for w in auto_workloads(QV, QV, QV, [16], 1)}
    names = list(loads)
    assert names.index(MIX_WORKLOAD) < names.index(f"{MIX_WORKLOAD}{AGAIN}") < names.index(f"mixed8-16{AGAIN}")
    mixes = {tuple(sorted(loads[MIX_WORKLOAD].pick(i, r).items())) for i in range(16) for r in range(2)}
    assert len(mixes) == 8 and all(len(m) == 2 and {w for _, w in m} == {0.5} for m in mixes)


def tps(value: float) -> dict:
    return {"tokens_per_s": value}


def test_the_mix_goal_is_mixes_over_single_adapters_on_the_same_server_and_absent_without_the_workload():
    workloads = {"mixed8-16": tps(400.0), f"mixed8-16{AGAIN}": tps(380.0), MIX_WORKLOAD: tps(370.0),
                 f"{MIX_WORKLOAD}{AGAIN}": tps(350.0)}
    (target,) = mix_targets(workloads)
    assert math.isclose(target.ratio, 360.0 / 390.0) and target.passed  # 0.92 >= 0.9
    assert mix_targets({"mixed8-16": tps(400.0)}) == []


def phase(ttfts: list[float], itl_p99: float, extra: int, extra_ttft: float = float("nan")) -> dict:
    return {"ttfts": ttfts, "itl_p99": itl_p99, "requests": len(ttfts), "extra_requests": extra,
            "extra_ttft_p50": extra_ttft}


def cold_reading() -> dict:
    workloads = {"alone-16": phase([0.05] * 16, 0.04, 0), "warm-16": phase([0.06] * 16, 0.05, 10, 0.1),
                 "cold-16": phase([0.08] * 16, 0.06, 10, 0.2), f"cold-16{AGAIN}": phase([0.12] * 16, 0.08, 9, 0.3),
                 f"warm-16{AGAIN}": phase([0.06] * 16, 0.05, 10, 0.1), f"alone-16{AGAIN}": phase([0.05] * 16, 0.04, 0)}
    return {"summary": summarize(workloads), "adapters": 64, "resident": 16, "hot": 8, "gap_s": 0.5}


def test_the_cold_goal_pools_both_runs_of_each_phase_and_divides_by_the_streams_alone():
    reading = cold_reading()
    cold = reading["summary"]["cold-16"]
    assert cold["requests"] == 32 and cold["extra_requests"] == 19 and math.isclose(cold["itl_p99"], 0.07)
    (target,) = cold_adapter_targets(reading)
    assert math.isclose(target.ratio, cold["ttft_p99"] / 0.05) and not target.higher_is_better
    assert target.passed == (target.ratio <= 2.0) and cold_adapter_targets(None) == []
    table = render(reading)
    assert "cold-16" in table and "cold over warm" in table
