"""The mixed-batch LoRA math on tiny tensors: the fast per-site form the model calls must equal the per-row
definition, for any mix of adapters, ranks, target subsets, group sizes and bare-base rows. Every test runs
twice: through the native kernel reading the slots' weights (where it builds here) and through the torch
batched matmuls over stacked covers."""

import pytest
import torch

import server.lora.layers as layers_module
from adapters import llama_base_shapes, random_adapter
from server.kernels.lora import slot_groups_kernel
from server.lora.apply import LoraBatch, SlotGroups, lora_apply_reference
from server.lora.layers import BASE, LoraSlots
from server.model.backend import resolve_backend, torch_backend
from server.model.geometry import SITES, SiteLayout

LAYERS, HIDDEN, INTER, KV = 2, 16, 32, 8
SHAPES = llama_base_shapes(num_layers=LAYERS, hidden=HIDDEN, intermediate=INTER, kv_dim=KV)
# Fused sites as the model lays them out: projections stacked along the output rows.
LAYOUTS = {
    "qkv": SiteLayout(HIDDEN, HIDDEN + 2 * KV,
                      {"q_proj": (0, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN + KV, KV)}),
    "o": SiteLayout(HIDDEN, HIDDEN, {"o_proj": (0, HIDDEN)}),
    "gate_up": SiteLayout(HIDDEN, 2 * INTER, {"gate_proj": (0, INTER), "up_proj": (INTER, INTER)}),
    "down": SiteLayout(INTER, HIDDEN, {"down_proj": (0, HIDDEN)}),
}
ADAPTERS = [
    random_adapter("qv", SHAPES, rank=2, alpha=4, targets=("q_proj", "v_proj"), seed=1, init_std=0.5),
    random_adapter("all", SHAPES, rank=4, alpha=16, seed=2, init_std=0.5,
                   targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    random_adapter("mlp", SHAPES, rank=3, alpha=3, targets=("up_proj", "down_proj"), seed=3, init_std=0.5),
]
MIXED_ROWS = [0, BASE, 1, 2, 2, BASE, 0, 1, 1, BASE]
NATIVE = slot_groups_kernel() is not None
CPU = torch.device("cpu")
path = {"native": False}  # the path the running test's slots take, set by `lora_path`


@pytest.fixture(autouse=True, params=["native", "torch"])
def lora_path(request):
    if request.param == "native" and not NATIVE:
        pytest.skip("the grouped LoRA kernel does not build here")
    path["native"] = request.param == "native"
    return request.param


def backend(dtype=torch.float32):
    """The backend the running test's slots are built on: this machine's kernels, or plain torch."""
    return resolve_backend(CPU, dtype) if path["native"] else torch_backend(CPU, dtype)


def loaded_slots(adapters, dtype=torch.float32) -> LoraSlots:
    slots = LoraSlots(LAYERS, LAYOUTS, max_slots=len(adapters) + 1, backend=backend(dtype))
    for slot, adapter in enumerate(adapters):
        slots.set_lora(slot, adapter)
    return slots


def site_inputs(site: str, rows: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    layout = LAYOUTS[site]
    x = torch.randn(rows, layout.in_features, generator=generator)
    y = torch.randn(rows, layout.out_features, generator=generator)
    return x, y


def native_path() -> bool:
    return path["native"]


def covers_only():
    if native_path():
        pytest.skip("covers serve the torch path only")


def apply_planned(slots: LoraSlots, row_slots: list[int], layer: int, site: str, x, y, kind=None) -> torch.Tensor:
    """The plan's batches for one site applied to a copy of y; each is checked to be of `kind` (default:
    the kernel's where this path and dtype have it, else the torch one)."""
    out = y.clone()
    kind = kind or (SlotGroups if native_path() and x.dtype == torch.float32 else LoraBatch)
    for batch in slots.plan(row_slots).batches[layer][SITES.index(site)]:
        assert isinstance(batch, kind)
        batch.apply(out, x)
    return out


def apply_reference(adapters, row_slots: list[int], layer: int, site: str, x, y) -> torch.Tensor:
    """lora_apply_reference run once per projection of the fused site, on that projection's output rows."""
    out = y.clone()
    for proj, (first, size) in LAYOUTS[site].projections.items():
        weights = [a.weights.get(f"layers.{layer}.{proj}") for a in adapters]
        part = out[:, first : first + size]
        lora_apply_reference(part, x, [w.A if w else None for w in weights], [w.B if w else None for w in weights],
                             [w.scale if w else 0.0 for w in weights], row_slots)
    return out


def apply_by_hand(adapters, row_slots: list[int], layer: int, site: str, x, y) -> torch.Tensor:
    """y_i += scale * B (A x_i), row by row, in float64: the definition, independent of both functions."""
    out = y.double().clone()
    for i, slot in enumerate(row_slots):
        if slot == BASE:
            continue
        for proj, (first, size) in LAYOUTS[site].projections.items():
            w = adapters[slot].weights.get(f"layers.{layer}.{proj}")
            if w is not None:
                out[i, first : first + size] += w.scale * (w.B.double() @ (w.A.double() @ x[i].double()))
    return out


@pytest.mark.parametrize("layer", range(LAYERS))
@pytest.mark.parametrize("site", SITES)
def test_mixed_batch_equals_reference_and_definition(site, layer):
    slots = loaded_slots(ADAPTERS)
    x, y = site_inputs(site, len(MIXED_ROWS), seed=layer)
    got = apply_planned(slots, MIXED_ROWS, layer, site, x, y)
    torch.testing.assert_close(got, apply_reference(ADAPTERS, MIXED_ROWS, layer, site, x, y), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), apply_by_hand(ADAPTERS, MIXED_ROWS, layer, site, x, y),
                               rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, y), "every site is targeted by some adapter in the mix, so it must change"


@pytest.mark.parametrize("site", SITES)
def test_large_groups_and_ranks_equal_the_definition(site):
    # groups split across native tasks (at most 8 rows each, fewer to keep threads busy) and ranks past one
    # 16-column block, with tails
    wide = [random_adapter("r24", SHAPES, rank=24, alpha=8, seed=7, init_std=0.3,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
            random_adapter("r5", SHAPES, rank=5, alpha=5, seed=8, init_std=0.3,
                           targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))]
    slots = loaded_slots(wide)
    for rows in ([0, 1] * 6 + [0, BASE, 0], [1] * 9, [0, 1] * 10, [1] * 20):
        x, y = site_inputs(site, len(rows), seed=len(rows))
        torch.testing.assert_close(apply_planned(slots, rows, 1, site, x, y).double(),
                                   apply_by_hand(wide, rows, 1, site, x, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", SITES)
def test_base_rows_are_untouched_bit_for_bit(site):
    slots = loaded_slots(ADAPTERS)
    x, y = site_inputs(site, len(MIXED_ROWS))
    got = apply_planned(slots, MIXED_ROWS, 0, site, x, y)
    base = [i for i, s in enumerate(MIXED_ROWS) if s == BASE]
    assert torch.equal(got[base], y[base])


@pytest.mark.parametrize("site", SITES)
def test_rows_of_an_adapter_not_targeting_the_site_are_untouched(site):
    slots = loaded_slots(ADAPTERS)
    x, y = site_inputs(site, len(MIXED_ROWS))
    got = apply_planned(slots, MIXED_ROWS, 1, site, x, y)
    for i, slot in enumerate(MIXED_ROWS):
        targets_site = slot != BASE and any(p in ADAPTERS[slot].target_modules for p in LAYOUTS[site].projections)
        assert torch.equal(got[i], y[i]) != targets_site, (i, slot)


def test_untouched_projection_rows_inside_a_fused_site_are_untouched():
    slots = loaded_slots(ADAPTERS)
    x, y = site_inputs("qkv", 4)
    got = apply_planned(slots, [0, 0, 0, 0], 0, "qkv", x, y)  # "qv": q and v, never k
    first, size = LAYOUTS["qkv"].projections["k_proj"]
    assert torch.equal(got[:, first : first + size], y[:, first : first + size])
    assert not torch.equal(got[:, :first], y[:, :first])


@pytest.mark.parametrize("slot", range(len(ADAPTERS)))
def test_single_adapter_batch_equals_reference(slot):
    slots = loaded_slots(ADAPTERS)
    rows = [slot] * 5
    # every row uses the one adapter: no gather, no padding
    assert all((b.step if isinstance(b, SlotGroups) else b).rows is None
               for layer in slots.plan(rows).batches for site in layer for b in site)
    for site in SITES:
        x, y = site_inputs(site, len(rows))
        torch.testing.assert_close(apply_planned(slots, rows, 0, site, x, y),
                                   apply_reference(ADAPTERS, rows, 0, site, x, y), rtol=1e-5, atol=1e-5)


def test_site_no_active_adapter_targets_has_no_batch():
    slots = loaded_slots(ADAPTERS)
    plan = slots.plan([0, BASE, 0])  # "qv" touches only qkv
    assert [len(site) for site in plan.batches[0]] == [1, 0, 0, 0]


def test_all_base_rows_plan_nothing():
    assert loaded_slots(ADAPTERS).plan([BASE, BASE]) is None


def test_zero_b_adds_nothing():
    zero = [random_adapter(a.name, SHAPES, rank=a.rank, alpha=a.alpha, targets=a.target_modules, seed=i + 1,
                           b_zero=True) for i, a in enumerate(ADAPTERS)]
    slots = loaded_slots(zero)
    for site in SITES:
        x, y = site_inputs(site, len(MIXED_ROWS))
        assert torch.equal(apply_planned(slots, MIXED_ROWS, 0, site, x, y), y)


def test_plan_is_reused_while_rows_keep_their_slots_and_rebuilt_when_they_change():
    slots = loaded_slots(ADAPTERS)
    first = slots.plan(MIXED_ROWS)
    assert slots.plan(list(MIXED_ROWS)) is first
    assert slots.plan(MIXED_ROWS[:-1]) is not first


def test_reloading_a_slot_serves_the_new_adapter():
    slots = loaded_slots(ADAPTERS)
    rows = [0, 1, BASE]
    slots.plan(rows)
    slots.set_lora(0, ADAPTERS[2])  # the plan cache must not keep serving the old weights
    swapped = [ADAPTERS[2], ADAPTERS[1], ADAPTERS[2]]
    for site in SITES:
        x, y = site_inputs(site, len(rows))
        torch.testing.assert_close(apply_planned(slots, rows, 0, site, x, y),
                                   apply_reference(swapped, rows, 0, site, x, y), rtol=1e-5, atol=1e-5)


def test_bf16_slots_stay_close_to_the_float64_definition():
    slots = loaded_slots(ADAPTERS, dtype=torch.bfloat16)
    for site in SITES:
        x, y = site_inputs(site, len(MIXED_ROWS))
        got = apply_planned(slots, MIXED_ROWS, 0, site, x.bfloat16(), y.bfloat16())
        expected = apply_by_hand(ADAPTERS, MIXED_ROWS, 0, site, x.bfloat16().float(), y.bfloat16().float())
        torch.testing.assert_close(got.double(), expected, rtol=3e-2, atol=3e-2)


def spread_slots() -> tuple[LoraSlots, dict[int, object]]:
    """Three adapters in scattered device slots, as LRU eviction leaves them."""
    placement = {0: ADAPTERS[0], 3: ADAPTERS[2], 9: ADAPTERS[1], 5: ADAPTERS[2]}
    slots = LoraSlots(LAYERS, LAYOUTS, max_slots=16, backend=backend())
    for slot, adapter in placement.items():
        slots.set_lora(slot, adapter)
    return slots, placement


def expected_rows(placement, rows, site, x, y, layer: int = 0) -> torch.Tensor:
    expected = y.double().clone()
    for i, slot in enumerate(rows):
        if slot != BASE:
            expected[i] = apply_by_hand([placement[slot]], [0], layer, site, x[i : i + 1], y[i : i + 1])[0]
    return expected


@pytest.mark.parametrize("site", SITES)
def test_a_reused_cover_with_an_idle_adapter_equals_the_definition(site):
    covers_only()
    slots, placement = spread_slots()
    slots.plan([0, 3, 9])  # slot 3 is in the cover the next plan reuses...
    rows = [0, BASE, 9, 0, 9]  # ...but has no row here: it must add nothing
    x, y = site_inputs(site, len(rows))
    torch.testing.assert_close(apply_planned(slots, rows, 0, site, x, y).double(),
                               expected_rows(placement, rows, site, x, y), rtol=1e-5, atol=1e-5)
    assert slots.covers.builds == 1


@pytest.mark.parametrize("site", SITES)
def test_a_new_adapter_joining_gets_a_small_second_cover_and_the_sum_equals_the_definition(site):
    covers_only()
    slots, placement = spread_slots()
    slots.plan([0, 3, 9])
    rows = [0, 5, 3, BASE, 9]
    x, y = site_inputs(site, len(rows))
    got = apply_planned(slots, rows, 0, site, x, y)
    torch.testing.assert_close(got.double(), expected_rows(placement, rows, site, x, y), rtol=1e-5, atol=1e-5)
    assert slots.covers.builds == 2


def test_a_request_leaving_the_batch_reuses_the_stacked_operands():
    covers_only()
    slots, _ = spread_slots()
    before = slots.plan([0, 3, 9]).batches[0][0]
    after = slots.plan([0, 9]).batches[0][0]
    assert slots.covers.builds == 1
    assert after[0].A.data_ptr() == before[0].A.data_ptr()


@pytest.mark.parametrize("site", SITES)
def test_rebuilt_plans_over_the_same_stack_slices_serve_each_step_its_own_rows(site):
    slots = loaded_slots(ADAPTERS)
    orders = [MIXED_ROWS, MIXED_ROWS[::-1], [2, 2, 0, BASE, 1, 1, 1, 0, BASE, 2]]
    x, y = site_inputs(site, len(MIXED_ROWS), seed=7)
    for _ in range(2):  # the second round finds every slice made already
        for rows in orders:
            torch.testing.assert_close(apply_planned(slots, rows, 1, site, x, y),
                                       apply_reference(ADAPTERS, rows, 1, site, x, y), atol=1e-4, rtol=1e-4)
    batches = [slots.plan(rows).batches[1][SITES.index(site)] for rows in orders[:2]]
    if batches[0] and not native_path():
        assert batches[0][0].A is batches[1][0].A  # the stack's slices are shared, not remade


def test_reloading_a_slot_drops_the_operands_that_hold_it():
    covers_only()
    slots, placement = spread_slots()
    rows = [0, 9]
    before = slots.plan(rows).batches[0][0]
    slots.set_lora(9, ADAPTERS[0])
    after = slots.plan(rows).batches[0][0]
    assert slots.covers.builds == 2 and after[0].A.data_ptr() != before[0].A.data_ptr()
    x, y = site_inputs("qkv", len(rows))
    torch.testing.assert_close(apply_planned(slots, rows, 0, "qkv", x, y).double(),
                               expected_rows({**placement, 9: ADAPTERS[0]}, rows, "qkv", x, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", SITES)
def test_uneven_groups_equal_the_definition(site):
    """A prompt chunk of one adapter beside single decode rows of others: the large group runs as its own
    batch, the small ones padded to their largest; every row still gets exactly its own adapter."""
    slots = loaded_slots(ADAPTERS)
    rows = [1] * 16 + [0, BASE, 2, 0, 2, 2]
    x, y = site_inputs(site, len(rows))
    got = apply_planned(slots, rows, 0, site, x, y)
    torch.testing.assert_close(got.double(), apply_by_hand(ADAPTERS, rows, 0, site, x, y), rtol=1e-5, atol=1e-5)
    if site == "qkv" and not native_path():  # all three target it: the chunk alone, the others padded together
        batches = slots.plan(rows).batches[0][0]
        assert len(batches) == 2 and sum(b.pad is not None for b in batches) == 1


def test_a_non_finite_row_does_not_leak_into_other_rows():
    """Padded entries read row 0 and are zeroed before they add back into it: other rows never see it."""
    slots = loaded_slots(ADAPTERS)
    rows = [BASE, 0, 1, 1, 2]
    x, y = site_inputs("qkv", len(rows))
    x[0] = float("inf")
    got = apply_planned(slots, rows, 0, "qkv", x, y)
    torch.testing.assert_close(got[1:].double(), apply_by_hand(ADAPTERS, rows, 0, "qkv", x, y)[1:],
                               rtol=1e-5, atol=1e-5)


def test_the_native_path_stacks_nothing_as_the_mix_of_adapters_changes():
    if not native_path():
        pytest.skip("the native kernel reads slots in place; the torch path stacks covers")
    slots, placement = spread_slots()
    for rows in ([0, 3, 9], [9, 5, BASE], [5, 0, 0, 3], [3, 9, 5, 0, BASE]):
        for site in SITES:
            x, y = site_inputs(site, len(rows))
            torch.testing.assert_close(apply_planned(slots, rows, 1, site, x, y).double(),
                                       expected_rows(placement, rows, site, x, y, layer=1), rtol=1e-5, atol=1e-5)
    assert slots.covers.builds == 0


def test_an_adapter_too_wide_for_the_kernel_is_served_through_covers(monkeypatch):
    monkeypatch.setattr(layers_module, "MAX_RANK_COLUMNS", 8)  # "all" (3 x rank 4 at qkv) is now too wide
    slots = loaded_slots(ADAPTERS)
    for site in SITES:
        x, y = site_inputs(site, len(MIXED_ROWS))
        torch.testing.assert_close(apply_planned(slots, MIXED_ROWS, 0, site, x, y, kind=LoraBatch),
                                   apply_reference(ADAPTERS, MIXED_ROWS, 0, site, x, y), rtol=1e-5, atol=1e-5)
    batches = [b for layer in slots.plan(MIXED_ROWS).batches for site in layer for b in site]
    assert batches and all(isinstance(b, LoraBatch) for b in batches)
    # without the wide one in the batch, the kernel serves again
    narrow = [slot if slot != 1 else BASE for slot in MIXED_ROWS]
    kinds = {type(b) for layer in slots.plan(narrow).batches for site in layer for b in site}
    assert kinds == ({SlotGroups} if native_path() else {LoraBatch})

