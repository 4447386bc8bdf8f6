"""The gateway's part of the model: word embeddings and their LayerNorm, read from a memory map."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bloomduo.core.checkpoint import Checkpoint


class Embedder:
    """word_embeddings -> word_embeddings_layernorm, in the serving dtype, as BloomModel does it.

    The table stays memory-mapped, so the gateway holds no copy of its own of the 2 GB bloom-7b1 embedding,
    only the file's cached pages, which the kernel may drop and read again. They are mapped up front: mapped
    on first touch, the 32 rows of a prompt of new tokens took 0.4-3 ms of page faults in front of its
    first token.
    """

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
        self.table = checkpoint.mmap("word_embeddings.weight", populate=True)
        self.dtype = dtype
        self.ln_weight = checkpoint.read("word_embeddings_layernorm.weight").to(dtype)
        self.ln_bias = checkpoint.read("word_embeddings_layernorm.bias").to(dtype)
        self.eps = checkpoint.config.layer_norm_epsilon
        self.hidden_size = self.table.shape[1]

    @torch.inference_mode()
    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.index_select(0, token_ids).to(self.dtype)
        return F.layer_norm(rows, (self.hidden_size,), self.ln_weight, self.ln_bias, self.eps)
