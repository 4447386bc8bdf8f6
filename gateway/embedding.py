"""The gateway's part of the model: word embeddings and their LayerNorm, read from a memory map."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bloomduo.core.checkpoint import Checkpoint


class Embedder:
    """word_embeddings -> word_embeddings_layernorm, in the serving dtype, as BloomModel does it.

    The table stays memory-mapped: only the rows of tokens actually seen are paged in, so the gateway
    does not hold a second copy of the 2 GB bloom-7b1 embedding.
    """

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
        self.table = checkpoint.mmap("word_embeddings.weight")
        self.dtype = dtype
        self.ln_weight = checkpoint.read("word_embeddings_layernorm.weight").to(dtype)
        self.ln_bias = checkpoint.read("word_embeddings_layernorm.bias").to(dtype)
        self.eps = checkpoint.config.layer_norm_epsilon
        self.hidden_size = self.table.shape[1]

    @torch.inference_mode()
    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.index_select(0, token_ids).to(self.dtype)
        return F.layer_norm(rows, (self.hidden_size,), self.ln_weight, self.ln_bias, self.eps)
