"""Penalties, logit bias, min-p, top-k, top-p, temperature and seeds in the sampler, on tiny logits: each
changes exactly what its definition says, only for the rows that ask, and leaves greedy rows without them
on the fast path's answer. Sampled sets are drawn over fixed seeds, so every run draws the same tokens."""

import torch

from server.engine.request import SamplingParams, Sequence
from server.engine.sampler import apply_penalties, sample

VOCAB = 6


def seq(params: SamplingParams, prompt=(0,), output=()) -> Sequence:
    s = Sequence(list(prompt), params)
    s.output_ids = list(output)
    return s


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.zeros(1, VOCAB)
    s = seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=(4,), output=(1, 1, 2))
    got = apply_penalties(logits, [s])[0]
    assert got.tolist() == [0.0, -1.0, -0.75, 0.0, 0.0, 0.0]  # 1: 0.5 + 2 x 0.25; 2: 0.5 + 0.25; prompt's 4: none


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0, 0.0]])
    s = seq(SamplingParams(repetition_penalty=2.0), prompt=(0,), output=(1,))
    assert apply_penalties(logits, [s])[0].tolist() == [1.0, -4.0, 2.0, -2.0, 0.0, 0.0]


def test_logit_bias_moves_greedy_choice_and_other_rows_are_untouched():
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0, 0.0, 0.0]] * 2)
    biased = seq(SamplingParams(temperature=0.0, logit_bias=((5, 100.0),)))
    plain = seq(SamplingParams(temperature=0.0))
    assert sample(logits, [biased, plain]) == [5, 0]
    assert logits[0, 5] == 0.0  # the caller's logits are not written


def test_min_p_drops_tokens_far_below_the_top_one():
    logits = torch.tensor([[2.0, 1.9, 0.0, 0.0, 0.0, 0.0]])  # the four low tokens: 22% of the mass together

    def picks(min_p: float) -> set[int]:
        return {sample(logits, [seq(SamplingParams(temperature=1.0, min_p=min_p, seed=i))])[0] for i in range(40)}

    assert picks(0.5) == {0, 1}
    assert picks(0.0) - {0, 1}


def picks(logits: torch.Tensor, n: int = 200, **params) -> set[int]:
    """The tokens sampled from one row over n seeds."""
    return {sample(logits, [seq(SamplingParams(temperature=1.0, seed=i, **params))])[0] for i in range(n)}


def test_top_k_keeps_exactly_the_k_most_likely_tokens():
    logits = torch.tensor([[1.0, 3.0, 0.0, 2.5, 2.0, -1.0]])  # most likely first: 1, 3, 4, 0, 2, 5
    assert picks(logits, top_k=3) == {1, 3, 4}
    assert picks(logits, top_k=1) == {1}
    assert picks(logits, top_k=VOCAB + 10) == set(range(VOCAB))  # k past the vocabulary keeps all


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.125, 0.5, 0.0625, 0.25, 0.03125, 0.03125])  # most likely first: 1, 3, 0, 2, ...
    logits = probs.log()[None, :]
    assert picks(logits, top_p=0.6) == {1, 3}        # 0.5 falls short of 0.6; 0.75 reaches it
    assert picks(logits, top_p=0.8) == {1, 3, 0}     # 0.875
    assert picks(logits, top_p=0.3) == {1}           # the top token alone reaches it
    assert picks(logits, top_p=1e-9) == {1}          # the top token always stays
    assert picks(logits) == set(range(VOCAB))


def test_top_p_applies_to_what_top_k_left_renormalised():
    logits = torch.tensor([0.125, 0.5, 0.0625, 0.25, 0.03125, 0.03125]).log()[None, :]
    # top_k=3 leaves 1, 3, 0 as 4/7, 2/7, 1/7: 1 and 3 reach 0.8 (6/7), where alone they fell short (0.75)
    assert picks(logits, top_k=3, top_p=0.8) == {1, 3}
    assert picks(logits, top_k=3, top_p=0.9) == {1, 3, 0}
    assert picks(logits, top_k=3, top_p=0.5) == {1}


def test_a_seed_makes_a_requests_tokens_reproducible_whatever_shares_its_batch():
    logits = torch.zeros(1, VOCAB)  # uniform: every token as likely

    def draws(seed: int, neighbours: int = 0) -> list[int]:
        s = seq(SamplingParams(temperature=1.0, seed=seed))
        others = [seq(SamplingParams(temperature=1.0)) for _ in range(neighbours)]
        batch = logits.expand(1 + neighbours, VOCAB)
        return [sample(batch, [s, *others])[0] for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) == draws(7, neighbours=3)
    assert len({tuple(draws(seed)) for seed in range(5)}) == 5


def test_low_temperature_sharpens_and_zero_is_greedy():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    assert picks(logits, n=100) - {0}  # at temperature 1 the others come up
    assert {sample(logits, [seq(SamplingParams(temperature=0.05, seed=i))])[0] for i in range(100)} == {0}
    assert sample(logits, [seq(SamplingParams(temperature=0.0))]) == [0]
