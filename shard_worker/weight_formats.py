"""oneDNN-packed Linear weights for bfloat16 on the CPU, with the MLP's GELU fused into its first matmul.

A CPU worker's step is one pass over its weights. With the plain row-major layout, oneDNN's bfloat16
matmul reads them at about 7 GB/s per core; reordered once at load time into oneDNN's blocked layout
(what torch.compile's "freezing" does), the same matmuls run at about 9-10 GB/s with bit-identical
results. The packed weight is an opaque oneDNN tensor of the same size, so memory does not grow; only
the forward changes, to the op that takes that layout.

That op also takes a post-op, so the MLP's tanh GELU runs inside dense_h_to_4h, on the float32
accumulator before the one rounding to bfloat16: a prefill's separate bfloat16 GELU pass cost as much
as a third of that matmul. It is one bfloat16 rounding closer to float32 than the unfused pair (tested).

float32 is left alone: there the packed kernel sums in another order and float32 is the dtype the
parity tests hold to transformers bit for bit. BLOOMDUO_CPU_PACKED_WEIGHTS=0 turns both off.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from bloomduo.shard_worker.model import MLP


class PackedLinear(nn.Linear):
    """nn.Linear whose weight is in oneDNN's packed layout (see pack_linear_weights)."""

    # oneDNN post-op applied to the output in the same pass ("gelu" with algorithm "tanh" or "none")
    activation = "none"
    algorithm = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(
            rows, self.weight, self.bias, self.activation, [], self.algorithm
        )
        return out.view(*x.shape[:-1], self.out_features)


def packing_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a worker on `device` in `dtype` packs its Linear weights."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and os.environ.get("BLOOMDUO_CPU_PACKED_WEIGHTS", "1") != "0"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def pack_linear_weights(model: nn.Module) -> nn.Module:
    """Reorder every nn.Linear weight of `model` into oneDNN's packed layout, in place, and fold each
    MLP's GELU into the matmul before it.

    Forward hooks (the tensor-parallel all-reduces) stay: each module only changes class.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
            module.weight = nn.Parameter(packed, requires_grad=False)
            module.__class__ = PackedLinear
    for mlp in model.modules():
        if isinstance(mlp, MLP) and isinstance(mlp.gelu, nn.GELU):
            mlp.dense_h_to_4h.activation, mlp.dense_h_to_4h.algorithm = "gelu", mlp.gelu.approximate
            mlp.gelu = nn.Identity()
    return model
