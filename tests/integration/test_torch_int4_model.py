"""A tiny Llama quantized int4 at load and served through torch's int4 kernel: on CPU through its twin (the
whole CUDA path but the two ops: bf16 activations, plain torch layers), on CUDA where there is one. Logits
stay close to the block reference's, merged mode equals the side branch, and restore is exact."""

import pytest
import torch

from adapters import PROJECTIONS, random_adapter
from server.engine.kv_cache import KVCache
from server.kernels.torch_int4 import TorchInt4Kernel
from server.lora.layers import LoraSlots
from server.lora.merge import merge_into_base, restore_base
from server.model.backend import Backend, resolve_backend, torch_backend
from server.model.geometry import site_layouts
from server.model.loader import ModelFolder
from server.model.weights import LoadedModel
from tests.integration.test_reference_logits import prefill
from tests.integration.tiny_models import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
PROMPT = torch.tensor([1, 7, 30, 12, 5, 41, 63, 2])
# a bf16 model against the fp32 reference: bf16 activations and outputs (2^-8 each) over two layers and the head
BF16_SHARE = 0.04
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> ModelFolder:
    return ModelFolder(tiny_llama(tmp_path_factory.mktemp("tiny")))


def twin_backend(dtype: torch.dtype) -> Backend:
    """The CUDA path's backend on CPU: plain torch throughout, the int4 op's CPU twin for the base."""
    return Backend(CPU, dtype, block=TorchInt4Kernel(CPU, dtype))


def logits(model: LoadedModel, slots: LoraSlots | None = None) -> torch.Tensor:
    device, T = model.transformer.device, len(PROMPT)
    kv = KVCache(model.config, 1, T, device, model.transformer.dtype)
    plan = slots.plan([0] * T) if slots is not None else None
    return prefill(model, PROMPT.to(device), 1, kv, plan)[0].float().cpu()


def reference_logits(folder: ModelFolder) -> torch.Tensor:
    """The same int4 blocks multiplied by the reference (dequantize + F.linear), fp32 on CPU."""
    return logits(LoadedModel(folder, torch_backend(CPU, torch.float32), "int4"))


def assert_near(got: torch.Tensor, want: torch.Tensor, share: float) -> None:
    """Within `share` of the largest logit, and the same top token wherever that error cannot swap the top two."""
    bound = share * want.abs().max()
    assert (got - want).abs().max() <= bound
    top = want.topk(2, dim=-1).values
    clear = top[..., 0] - top[..., 1] > 2 * bound
    assert clear.float().mean() >= 0.5  # the check below means something
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_the_twin_in_fp32_serves_the_reference_model(folder):
    model = LoadedModel(folder, twin_backend(torch.float32), "int4")
    assert isinstance(model.transformer.layers[0].linears["qkv"]._kernel, TorchInt4Kernel)
    assert_near(logits(model), reference_logits(folder), 1e-3)  # only the reference's 15-bit activations differ


def test_the_twin_in_bf16_serves_close_to_the_reference_model(folder):
    model = LoadedModel(folder, twin_backend(torch.bfloat16), "int4")
    assert model.transformer.layers[0].linears["qkv"](torch.zeros(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert_near(logits(model), reference_logits(folder), BF16_SHARE)


def merged_equals_unmerged_and_restores_exactly(model: LoadedModel, share: float) -> None:
    t = model.transformer
    adapter = random_adapter("one", t.lora_target_shapes(), rank=8, alpha=16, targets=PROJECTIONS, seed=1,
                             init_std=0.05)
    linears = [lin for layer in t.layers for lin in layer.linears.values()] + [t.lm_head]
    loaded = [[x.clone() for x in lin.tensors()] for lin in linears]
    before = logits(model)
    slots = LoraSlots(model.config.num_layers, site_layouts(model.config), 2, t.backend)
    slots.set_lora(0, adapter)
    unmerged = logits(model, slots)
    merged = merge_into_base(t, adapter, model.checkpoint)
    try:
        got = logits(model)
    finally:
        restore_base(merged)
    assert (unmerged - before).abs().max() > 10 * share * before.abs().max()  # the adapter is not a no-op
    assert (got - unmerged).abs().max() <= share * unmerged.abs().max()
    for lin, tensors in zip(linears, loaded):
        assert len(lin.tensors()) == len(tensors)  # no scratch left behind
        assert all(torch.equal(now, then) for now, then in zip(lin.tensors(), tensors))
    assert torch.equal(logits(model), before)


def test_the_twin_in_bf16_merged_equals_unmerged_and_restores_exactly(folder):
    merged_equals_unmerged_and_restores_exactly(LoadedModel(folder, twin_backend(torch.bfloat16), "int4"), BF16_SHARE)


@needs_cuda
def test_on_cuda_the_int4_kernel_serves_close_to_the_cpu_reference(folder):
    cuda = torch.device("cuda")
    backend = resolve_backend(cuda, torch.bfloat16, quantization="int4")
    assert isinstance(backend.block, TorchInt4Kernel)
    model = LoadedModel(folder, backend, "int4")
    qkv = model.transformer.layers[0].linears["qkv"]
    assert all(x.is_cuda for x in qkv.tensors()) and not qkv.quantized.q.is_cuda  # the blocks wait on the host
    assert qkv(torch.zeros(2, 64, dtype=torch.bfloat16, device=cuda)).dtype == torch.bfloat16
    assert_near(logits(model), reference_logits(folder), BF16_SHARE)


@needs_cuda
def test_on_cuda_merged_equals_unmerged_and_restores_exactly(folder):
    backend = resolve_backend(torch.device("cuda"), torch.bfloat16, quantization="int4")
    merged_equals_unmerged_and_restores_exactly(LoadedModel(folder, backend, "int4"), BF16_SHARE)
