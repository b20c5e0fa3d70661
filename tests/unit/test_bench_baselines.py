"""How the bench combines a baseline measured before and after the servers, and how its table shows it."""

from bench.baselines import bracketed
from bench.table import _baselines


def test_a_figure_read_before_and_after_the_servers_counts_as_their_mean_with_both_readings_kept():
    naive = {"tokens_per_s": 17.0, "latency_p50": 3.8}
    after = {"hf_batch16_tokens_per_s": 150.0, "peft_mixed16_tokens_per_s": 90.0, "peft_naive": naive}
    combined = bracketed({"hf_batch16_tokens_per_s": 130.0, "peft_mixed16_tokens_per_s": 100.0}, after)
    assert combined["hf_batch16_tokens_per_s"] == 140.0 and combined["peft_mixed16_tokens_per_s"] == 95.0
    assert combined["readings"] == {"hf_batch16_tokens_per_s": [130.0, 150.0],
                                    "peft_mixed16_tokens_per_s": [100.0, 90.0]}
    assert combined["peft_naive"] == naive and after["hf_batch16_tokens_per_s"] == 150.0  # after is untouched

    hf, _, mixed = _baselines({"baselines": combined})[1:4]
    assert "140 tok/s" in hf and "mean of 130 before the servers and 150 after" in hf
    assert "95 tok/s" in mixed and "x HF 0.68" in mixed and "mean of 100 before the servers and 90 after" in mixed


def test_a_run_without_the_early_reading_shows_the_one_it_has():
    naive = {"tokens_per_s": 17.0, "latency_p50": 3.8}
    lines = _baselines({"baselines": {"hf_batch16_tokens_per_s": 130.0, "peft_mixed16_tokens_per_s": 94.0,
                                      "peft_naive": naive}})
    assert "130 tok/s" in lines[1] and "mean of" not in lines[1]
