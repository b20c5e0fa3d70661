"""The compute backend (server.model.backend) is chosen once from the device, the dtype and the weights'
format: fp32 CPU kernels only for fp32 on CPU, plain torch elsewhere, and a kernel that cannot run refused
by name."""

import pytest
import torch

from server.kernels.block_linear import block_kernel
from server.model.backend import linear_kinds, resolve_backend, torch_backend

CPU = torch.device("cpu")


def test_the_torch_backend_has_no_kernels():
    backend = torch_backend()
    assert backend.linear == "torch"
    assert all(kernel is None for kernel in (backend.panel, backend.pointwise, backend.decode_attention, backend.lora,
                                             backend.decoder_layers, backend.block))


def test_off_the_cpu_every_path_is_torch():
    cuda = torch.device("cuda")  # named only: choosing touches no device
    assert resolve_backend(cuda, torch.bfloat16) == torch_backend(cuda, torch.bfloat16)


def test_bf16_on_cpu_takes_none_of_the_fp32_kernels():
    backend = resolve_backend(CPU, torch.bfloat16)
    assert backend.linear in ("mkldnn", "torch")
    assert backend.panel is backend.decode_attention is backend.lora is backend.decoder_layers is None


def test_every_linear_kind_listed_here_resolves_and_others_are_refused():
    assert linear_kinds(CPU, torch.float32)[0] == "torch"
    for kind in linear_kinds(CPU, torch.float32):
        assert resolve_backend(CPU, torch.float32, kind).linear == kind
    with pytest.raises(ValueError, match="panel"):
        resolve_backend(CPU, torch.bfloat16, "panel")
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend(CPU, torch.float32, "fastest")


def test_only_a_quantized_base_asks_for_the_block_kernel():
    assert resolve_backend(CPU, torch.float32, quantization="int4").block is block_kernel()
    assert resolve_backend(CPU, torch.float32).block is None
