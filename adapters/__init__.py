"""Adapters: the weight format (PEFT read/write, validation), the on-disk store and the registry.

Those are pure Python + torch + safetensors and know nothing about HTTP or the engine. The tooling that
made the shipped adapters (data, PEFT training, evaluation through the engine, cards) is `adapters.training`,
which serving never imports; `shipped/` holds the weights and their cards.
"""

from adapters.format import (
    PROJECTIONS, Adapter, AdapterLimits, BaseShapes, LoraWeights, in_float32, peft_folder_files, read_peft_folder,
    read_raw_safetensors, validate, validate_name, write_peft_folder,
)
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from adapters.synthetic import llama_base_shapes, random_adapter

__all__ = [
    "PROJECTIONS", "Adapter", "AdapterLimits", "AdapterRegistry", "AdapterStore", "BaseShapes", "LoraWeights",
    "in_float32", "llama_base_shapes", "peft_folder_files", "random_adapter", "read_peft_folder", "read_raw_safetensors",
    "validate", "validate_name", "write_peft_folder",
]
