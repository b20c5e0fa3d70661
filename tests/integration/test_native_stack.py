"""The native decoder stack against the layer-by-layer forward it replaces, on the real default model.

For decode rows both run the same kernels in the same order, so logits and the KV cache they leave must be
equal bit for bit: base rows, rows mixing adapters on q/v and on all seven projections, and after a
hot-swap (whose merged panels the stack must read), on fp32 panels and on the shipped GGUF's quantized
blocks (where a merged projection is a full-precision scratch the stack hands back to the layers). Prompt chunks attend differently (a row at a time vs
SDPA) and agree to rounding; a chunk reaching past the stack's key limit goes layer by layer.
"""

from contextlib import contextmanager

import pytest
import torch

from adapters import PROJECTIONS, llama_base_shapes, random_adapter
from server.engine.kv_cache import KVCache
from server.lora.layers import BASE, LoraSlots
from server.lora.merge import merge_into_base, restore_base
from server.model.backend import resolve_backend
from server.model.context import PrefillChunk, build_step
from server.model.geometry import site_layouts
from server.model.native_stack import LONG_CHUNK_KEYS
from server.model.weights import LoadedModel

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

PROMPT_TOKENS = 12
ROWS = 5


@pytest.fixture(scope="module", params=["none", "gguf"])
def model(request, default_model_folder) -> LoadedModel:
    """fp32 panels, and the shipped GGUF's own blocks (the block kernel inside the stack)."""
    cpu = torch.device("cpu")
    loaded = LoadedModel(default_model_folder, resolve_backend(cpu, torch.float32, quantization=request.param),
                         request.param)
    if loaded.transformer.native_stack is None:
        pytest.skip("the native decoder stack does not run here (no panel kernel or no build)")
    return loaded


@pytest.fixture(scope="module")
def adapters(model):
    cfg = model.config
    shapes = llama_base_shapes(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.kv_size)
    return [random_adapter("qv", shapes, rank=8, alpha=16, targets=("q_proj", "v_proj"), seed=1, init_std=0.05),
            random_adapter("all", shapes, rank=16, alpha=32, targets=PROJECTIONS, seed=2, init_std=0.05)]


@pytest.fixture(scope="module")
def slots(model, adapters) -> LoraSlots:
    held = LoraSlots(model.config.num_layers, site_layouts(model.config), 4, model.transformer.backend)
    for slot, adapter in enumerate(adapters):
        held.set_lora(slot, adapter)
    return held


def prefilled_kv(model: LoadedModel, rows: int) -> KVCache:
    """`rows` sequences of different prompts, prefilled layer by layer."""
    kv = KVCache(model.config, 8, LONG_CHUNK_KEYS + 8, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (rows * PROMPT_TOKENS,), generator=torch.Generator().manual_seed(3))
    ctx = build_step([], [PrefillChunk(slot, 0, PROMPT_TOKENS) for slot in range(rows)], torch.device("cpu"))
    model.transformer.forward(ids, ctx, kv)
    kv.used = rows
    return kv


@contextmanager
def stack_used(model: LoadedModel, native: bool):
    """The model's transformer, running its layers natively or layer by layer."""
    transformer = model.transformer
    stack = transformer.native_stack
    transformer.native_stack = stack if native else None
    try:
        yield transformer
    finally:
        transformer.native_stack = stack


def decode_steps(model: LoadedModel, kv: KVCache, lora_plan, native: bool, steps: int = 2) -> list[torch.Tensor]:
    """`steps` decode steps of every sequence in kv from PROMPT_TOKENS on, with or without the stack."""
    outs = []
    with stack_used(model, native) as transformer:
        for i in range(steps):
            ctx = build_step([PROMPT_TOKENS + i] * kv.used, [], torch.device("cpu"))
            ctx.lora = lora_plan
            outs.append(transformer.forward(torch.arange(kv.used) * 97 + i * 13, ctx, kv))
    return outs


def same_steps(model: LoadedModel, lora_plan) -> None:
    """Layer by layer and native from the same prefilled cache: equal logits and equal caches after."""
    layered_kv, native_kv = prefilled_kv(model, ROWS), prefilled_kv(model, ROWS)
    layered = decode_steps(model, layered_kv, lora_plan, native=False)
    native = decode_steps(model, native_kv, lora_plan, native=True)
    for a, b in zip(layered, native):
        assert torch.equal(a, b)
    assert torch.equal(layered_kv.k, native_kv.k) and torch.equal(layered_kv.v, native_kv.v)


def test_base_rows_equal_layer_by_layer(model):
    same_steps(model, None)


def test_rows_mixing_adapters_equal_layer_by_layer(model, slots):
    plan = slots.plan([0, BASE, 1, 0, 1])
    assert plan.native is not None
    same_steps(model, plan)


def test_a_merged_adapter_is_read_from_the_merged_panels(model, adapters):
    base = decode_steps(model, prefilled_kv(model, ROWS), None, native=True)
    merged = merge_into_base(model.transformer, adapters[1], model.checkpoint)
    try:
        same_steps(model, None)
        with_adapter = decode_steps(model, prefilled_kv(model, ROWS), None, native=True)
    finally:
        restore_base(merged)
    assert (with_adapter[0] - base[0]).abs().max() > 1.0
    restored = decode_steps(model, prefilled_kv(model, ROWS), None, native=True)
    assert all(torch.equal(a, b) for a, b in zip(base, restored))


def test_prompt_chunks_match_layer_by_layer(model, slots):
    """Decode rows, a fresh prompt and one continuing from cached keys, in one step; the chunks attend a row
    at a time natively and through SDPA layer by layer, so logits agree to rounding, not bit for bit. On a
    quantized base a rounding difference can move an activation to its neighbouring integer step (of
    max|x| / 16256 per block), and 30 layers carry that further."""
    chunks = [PrefillChunk(ROWS, 0, 7), PrefillChunk(ROWS + 1, 4, 6)]
    outs = []
    for native in (False, True):
        kv = prefilled_kv(model, ROWS + 2)
        kv.used = ROWS + 2
        ctx = build_step([PROMPT_TOKENS] * ROWS, chunks, torch.device("cpu"))
        ctx.lora = slots.plan([0, BASE, 1, 0, 1] + [1] * 7 + [0] * 6)
        with stack_used(model, native) as transformer:
            ids = torch.arange(ctx.positions.shape[0]) * 31
            outs.append((transformer.forward(ids, ctx, kv), kv))
    (layered, layered_kv), (native, native_kv) = outs
    assert native.shape == (ROWS + 2, model.config.vocab_size)
    quantized = model.weight_format != "float32"
    torch.testing.assert_close(native, layered, atol=2e-2 if quantized else 2e-4, rtol=1e-5)
    torch.testing.assert_close(native_kv.k, layered_kv.k, atol=2e-2 if quantized else 1e-4, rtol=1e-5)


def test_a_chunk_past_the_native_key_limit_runs_layer_by_layer(model):
    kv = prefilled_kv(model, 2)
    transformer = model.transformer
    chunk = PrefillChunk(2, LONG_CHUNK_KEYS - 2, 3)  # its last key lies past the limit
    ctx = build_step([PROMPT_TOKENS] * 2, [chunk], torch.device("cpu"))
    kv.used = 3
    h = transformer.embed(torch.arange(5))
    before = h.clone()
    assert not transformer.native_stack.run(h, ctx, *transformer.rope_tables(ctx.positions), kv)
    assert torch.equal(h, before)  # declined with nothing touched, so the forward takes the layers one by one
    logits = transformer.forward(torch.arange(5), ctx, kv)
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()
