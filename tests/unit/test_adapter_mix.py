"""Weighted mixes (adapters.mix): a mix served through the device slots, by the native kernel and by the
torch covers, equals its definition sum_i w_i·(alpha_i/r_i)·B_i·A_i·x computed from its members; the
cache gives one object per mix and lets go of mixes it drops; the request limits; a mix is never merged."""

import math
import weakref
from collections import deque

import pytest
import torch

from adapters.mix import AdapterMix, MixCache, check_weights, mix_adapters
from server.errors import InvalidRequest
from server.lora.layers import BASE
from server.lora.policy import MergeChoice, merge_target
from server.model.geometry import SITES
from tests.unit.test_lora_apply import (  # the tiny model geometry and the path switch of the LoRA math tests
    ADAPTERS, LAYERS, LAYOUTS, apply_planned, loaded_slots, lora_path, site_inputs,
)

QV, ALL, MLP = ADAPTERS
HALF_AND_HALF = [(QV, 0.5), (ALL, 0.5)]
ROWS = [2, BASE, 0, 3, 1, 3, BASE, 2]  # slots: 0 qv, 1 all, 2 the 50/50 mix, 3 three members scaled oddly
__all__ = ["lora_path"]  # autouse: every test here runs on the native kernel and on the torch covers


def by_definition(members, x: torch.Tensor, layer: int, site: str) -> torch.Tensor:
    """What a mix adds to one row's site output, in float64, straight from its members."""
    out = torch.zeros(x.shape[0], LAYOUTS[site].out_features, dtype=torch.float64)
    for proj, (first, size) in LAYOUTS[site].projections.items():
        for adapter, weight in members:
            w = adapter.weights.get(f"layers.{layer}.{proj}")
            if w is not None:
                out[:, first : first + size] += weight * w.scale * (x.double() @ w.A.double().T @ w.B.double().T)
    return out


@pytest.mark.parametrize("layer", range(LAYERS))
@pytest.mark.parametrize("site", SITES)
def test_a_mix_in_a_mixed_batch_equals_the_weighted_sum_of_its_members(site, layer):
    odd = [(QV, -1.5), (MLP, 2.0), (ALL, 0.25)]
    slot_members = {0: [(QV, 1.0)], 1: [(ALL, 1.0)], 2: HALF_AND_HALF, 3: odd}
    slots = loaded_slots([QV, ALL, mix_adapters(HALF_AND_HALF), mix_adapters(odd)])
    x, y = site_inputs(site, len(ROWS), seed=layer)
    got = apply_planned(slots, ROWS, layer, site, x, y)
    for row, slot in enumerate(ROWS):
        added = by_definition(slot_members[slot], x[row : row + 1], layer, site)[0] if slot != BASE else 0
        torch.testing.assert_close(got[row].double(), y[row].double() + added, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", SITES)
def test_a_mix_at_weight_zero_adds_nothing(site):
    slots = loaded_slots([mix_adapters([(ALL, 0.0)])])
    x, y = site_inputs(site, 3)
    assert torch.equal(apply_planned(slots, [0, 0, 0], 0, site, x, y), y)


def test_a_mix_concatenates_ranks_and_keeps_only_its_members_modules():
    mix = mix_adapters([(QV, 1.0), (MLP, 1.0)])
    assert isinstance(mix, AdapterMix) and mix.name == "qv+mlp"
    assert mix.weights["layers.0.q_proj"].rank == QV.rank
    assert set(mix.target_modules) == set(QV.target_modules) | set(MLP.target_modules)
    assert all(w.scale == 1.0 for w in mix.weights.values())


def test_the_cache_gives_one_object_per_mix_and_a_lone_weight_of_one_is_the_adapter_itself():
    cache = MixCache(deque(), max_bytes=1 << 30)
    first = cache.get(HALF_AND_HALF)
    assert cache.get(list(HALF_AND_HALF)) is first and cache.find(HALF_AND_HALF) is first
    assert cache.get([(QV, 0.5), (ALL, 0.25)]) is not first
    assert cache.get([(QV, 1.0)]) is QV
    assert cache.builds == 2


def test_the_cache_drops_the_least_recent_mix_past_its_bytes_and_retires_it():
    retired = deque()
    small = [(QV, 0.5)]
    cache = MixCache(retired, max_bytes=mix_adapters(HALF_AND_HALF).held_bytes + mix_adapters(small).held_bytes)
    a, b = cache.get(small), cache.get(HALF_AND_HALF)
    cache.get(small)  # a is the most recent now
    c = cache.get([(ALL, 0.3)])
    assert [ref() for ref in retired] == [b] and cache.find(small) is a and cache.find([(ALL, 0.3)]) is c


def test_a_mix_of_a_removed_or_replaced_adapter_is_dropped_at_the_next_build():
    current = {QV, ALL, MLP}
    retired = deque()
    cache = MixCache(retired, max_bytes=1 << 30, is_current=lambda adapter: adapter in current)
    stale = cache.get(HALF_AND_HALF)
    current.discard(ALL)
    cache.get([(QV, 0.5), (MLP, 0.5)])
    assert cache.find(HALF_AND_HALF) is None and [ref() for ref in retired] == [stale]


@pytest.mark.parametrize("weights, reason", [
    ([0.5] * 5, "5 adapters in one request; the limit is 4"),
    ([0.5, 2.5], "outside [-2.0, 2.0]"),
    ([-2.01], "outside"),
    ([math.nan], "outside"),
    ([math.inf], "outside"),
    ([], "empty"),
])
def test_limits_refuse_with_a_reason(weights, reason):
    with pytest.raises(InvalidRequest, match=reason.replace("[", r"\[").replace("]", r"\]")):
        check_weights(weights, max_members=4, max_abs_weight=2.0)


def test_limits_accept_the_edges():
    check_weights([-2.0, 2.0, 0.0, 1.0], max_members=4, max_abs_weight=2.0)


@pytest.mark.parametrize("mode", ["auto", "merged"])
def test_a_mix_is_never_merged(mode):
    mix = mix_adapters(HALF_AND_HALF)
    assert merge_target(mode, [mix, mix]) is None
    choice = MergeChoice(mode, settle_steps=1)
    assert [choice.next([mix], None) for _ in range(4)] == [None] * 4
    assert weakref.ref(mix)() is mix  # a mix is weakly referable: the prefix cache and `retired` need that
