"""Token embedding lookups: from a full table, or from the rows of a GGUF file's quantized `token_embd`.

A GGUF model is looked up in its file's embedding blocks (for a tied one, SmolLM2's Q8_0 `token_embd`, the
lm_head's), so no full-precision copy of the table stays resident (113 MB for the default model, 2 GB for
an 8B model's 128k vocabulary). The rows are those of the file dequantized, as the checkpoint's table is
(up to the fp16 rounding of Q4_K's block scales, and 8-bit requantization of other types).
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
