"""Token embedding lookups: from a full table, or from the rows of a tied quantized lm_head.

A GGUF model whose lm_head is its token embedding (SmolLM2's Q8_0 `token_embd`) is looked up in those same
blocks, so no second, full-precision copy of the table stays resident (113 MB for the default model, 2 GB
for an 8B model's 128k vocabulary). The rows are exact: the checkpoint's table is that file dequantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.kernels.block_linear import BlockWeight, dequantize_rows


class TableEmbedding:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.dtype = weight.dtype

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class BlockEmbedding:
    def __init__(self, weight: BlockWeight):
        self.weight = weight
        self.dtype = torch.float32

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.weight, input_ids)
