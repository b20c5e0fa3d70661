"""How the bench pools the readings of a figure measured more than once in a run, and how its table shows them."""

from bench.baselines import pooled
from bench.table import _baselines
from bench.targets import pooled_base_tokens_per_s

NAIVE = {"tokens_per_s": 17.0, "latency_p50": 3.8}


def test_a_figure_read_before_between_and_after_the_servers_counts_as_their_median_with_all_readings_kept():
    after = {"hf_batch16_tokens_per_s": 112.0, "peft_mixed16_tokens_per_s": 76.0, "peft_naive": NAIVE}
    earlier = [{"hf_batch16_tokens_per_s": 136.0, "peft_mixed16_tokens_per_s": 92.0},
               {"hf_batch16_tokens_per_s": 140.0, "peft_mixed16_tokens_per_s": 90.0}]
    combined = pooled(earlier, after)
    assert combined["hf_batch16_tokens_per_s"] == 136.0 and combined["peft_mixed16_tokens_per_s"] == 90.0
    assert combined["readings"] == {"hf_batch16_tokens_per_s": [136.0, 140.0, 112.0],
                                    "peft_mixed16_tokens_per_s": [92.0, 90.0, 76.0]}
    assert combined["peft_naive"] == NAIVE and after["hf_batch16_tokens_per_s"] == 112.0  # after is untouched

    hf, _, mixed = _baselines({"baselines": combined})[1:4]
    assert "136 tok/s" in hf and "median of 136, 140, 112, read before, between and after the servers" in hf
    assert "90 tok/s" in mixed and "x HF 0.66" in mixed and "median of 92, 90, 76" in mixed


def test_two_readings_count_as_their_mean():
    combined = pooled([{"hf_batch16_tokens_per_s": 130.0}], {"hf_batch16_tokens_per_s": 150.0,
                                                             "peft_mixed16_tokens_per_s": 94.0, "peft_naive": NAIVE})
    assert combined["hf_batch16_tokens_per_s"] == 140.0
    assert "read before and after the servers" in _baselines({"baselines": combined})[1]


def test_a_run_with_one_reading_shows_the_one_it_has():
    lines = _baselines({"baselines": {"hf_batch16_tokens_per_s": 130.0, "peft_mixed16_tokens_per_s": 94.0,
                                      "peft_naive": NAIVE}})
    assert "130 tok/s" in lines[1] and "median" not in lines[1]


def test_loraplex_base_only_pools_the_fp32_servers_not_the_quantized_default_nor_the_one_without_prefix_cache():
    def server(*tokens_per_s):
        names = ["base-16", "single-16", "base-16-again"]
        return {"workloads": {name: {"tokens_per_s": tps} for name, tps in zip(names, tokens_per_s)}}

    results = {"servers": {"auto": server(338.0, 999.0, 400.0), "merged": server(430.0, 1.0, 423.0),
                           "unmerged": server(429.0, 1.0, 427.0), "nocache": server(302.0, 1.0, 309.0)}}
    median, runs = pooled_base_tokens_per_s(results, 16)
    assert runs == [430.0, 423.0, 429.0, 427.0]
    assert median == 428.0
