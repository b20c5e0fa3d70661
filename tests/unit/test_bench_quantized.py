"""The QLoRA rows of `make bench`: ratios of the quantized default against fp32 measured in the same run."""

from bench.quantized import render
from bench.targets import constrained_targets, quantized_targets

READINGS = {
    "none": {"weight_format": "float32", "base_weight_bytes": 1000 * 2**20, "streams_1": 30.0, "streams_16": 200.0},
    "gguf": {"weight_format": "gguf Q4_1+Q8_0", "base_weight_bytes": 110 * 2**20, "streams_1": 96.0,
             "streams_16": 360.0, "mixed_16": 340.0, "mixed_adapters": 8},
}


def test_each_goal_is_a_ratio_against_the_same_runs_fp32_or_own_base():
    targets = {t.name: t for t in quantized_targets(READINGS)}
    assert targets["quantized base vs fp32, 1 stream"].ratio == 96.0 / 30.0
    assert targets["quantized base vs fp32, 1 stream"].passed                   # 3.2x >= 3x
    assert not targets["quantized base vs fp32, 16 streams"].passed             # 1.8x < 2x
    assert targets["8 adapters mixed (q/v r8) vs base-only, quantized base"].ratio == 340.0 / 360.0
    memory = targets["resident base weights, quantized / fp32"]
    assert memory.ratio == 0.11 and memory.passed and not memory.higher_is_better


def test_results_without_a_quantized_reading_have_no_quantized_goals():
    assert quantized_targets(None) == []
    assert quantized_targets({"none": READINGS["none"]}) == []


def test_the_table_shows_each_format_against_fp32():
    table = render(READINGS)
    assert "3.20x" in table and "1.80x" in table and "0.94x" in table and "gguf Q4_1+Q8_0" in table


def test_llama_cpp_goals_appear_only_with_its_reading():
    theirs = {"version": "0.3.36", "streams_1": 100.0}
    targets = {t.name: t for t in quantized_targets(READINGS, theirs)}
    assert targets["quantized base vs llama.cpp, 1 stream"].ratio == 0.96
    assert targets["16 streams over 8 adapters vs llama.cpp"].ratio == 3.4
    assert len(quantized_targets(READINGS)) == len(targets) - 2


def test_the_constrained_goal_is_half_constrained_against_all_free_in_the_same_run():
    (target,) = constrained_targets({"weight_format": "gguf", "streams": 16, "free": 300.0, "half_constrained": 270.0})
    assert target.ratio == 0.9 and target.passed and constrained_targets(None) == []
