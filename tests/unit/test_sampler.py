"""Penalties, logit bias and min-p in the sampler, on tiny logits: each changes exactly what its definition
says, only for the rows that ask, and leaves greedy rows without them on the fast path's answer."""

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
