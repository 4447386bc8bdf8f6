"""The device-specific layouts a shard's Linear weights are converted to once, after loading.

`apply_weight_format` picks at most one, by device, dtype and environment:

oneDNN-packed bfloat16 on the CPU, with the MLP's GELU fused into its first matmul
(BLOOMDUO_CPU_PACKED_WEIGHTS=0 turns both off). A CPU worker's step is one pass over its weights. With
the plain row-major layout, oneDNN's bfloat16 matmul reads them at about 7 GB/s per core; reordered
once at load time into oneDNN's blocked layout (what torch.compile's "freezing" does), the same
matmuls run at about 9-10 GB/s with bit-identical results. The packed weight is an opaque oneDNN
tensor of the same size, so memory does not grow; only the forward changes, to the op that takes that
layout. That op also takes a post-op, so the MLP's tanh GELU runs inside dense_h_to_4h, on the float32
accumulator before the one rounding to bfloat16: a prefill's separate bfloat16 GELU pass cost as much
as a third of that matmul. It is one bfloat16 rounding closer to float32 than the unfused pair (tested).
float32 is left alone: there the packed kernel sums in another order and float32 is the dtype the
parity tests hold to transformers bit for bit. CPUs where oneDNN has no bfloat16 matmul (AVX2 only)
keep the plain layout too; oneDNN reports that also when ONEDNN_MAX_CPU_ISA=AVX2 caps a newer CPU.

FRACTAL_NZ on the npu (BLOOMDUO_NPU_NZ=1): 310P matmuls run faster on NZ weights, and nn.Linear's
forward takes them as they are. Biases, LayerNorms and embeddings keep their layout.

Both leave the modules around each Linear alone (the tensor-parallel RowParallel keeps its all-reduce).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from bloomduo.shard_worker.distributed import device_type, import_torch_npu
from bloomduo.shard_worker.model import MLP

NPU_FORMAT_FRACTAL_NZ = 29  # torch_npu's ACL_FORMAT_FRACTAL_NZ: the weight layout 310P matmuls prefer


def apply_weight_format(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Convert `model`'s Linear weights, in place, to the layout that is fastest on `device` in `dtype`."""
    if npu_nz_requested(device):
        return to_npu_nz_format(model)
    if packing_applies(device, dtype):
        return pack_linear_weights(model)
    return model


class PackedLinear(nn.Module):
    """A Linear whose weight is in oneDNN's packed layout, optionally with a oneDNN post-op on its output."""

    def __init__(self, linear: nn.Linear, activation: str = "none", algorithm: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = linear.bias
        # post-op applied in the same pass: "gelu" with algorithm "tanh", or "none"
        self.activation, self.algorithm = activation, algorithm

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
    """Replace every nn.Linear inside `model` by a PackedLinear, in place, folding each MLP's GELU into
    the matmul before it."""
    for mlp in [m for m in model.modules() if isinstance(m, MLP)]:
        if isinstance(mlp.gelu, nn.GELU) and type(mlp.dense_h_to_4h) is nn.Linear:
            mlp.dense_h_to_4h = PackedLinear(mlp.dense_h_to_4h, "gelu", mlp.gelu.approximate)
            mlp.gelu = nn.Identity()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
    return model


def npu_nz_requested(device: torch.device | str) -> bool:
    """Whether to store Linear weights in the NZ format: on an npu, with BLOOMDUO_NPU_NZ=1."""
    return device_type(device) == "npu" and os.environ.get("BLOOMDUO_NPU_NZ") == "1"


def to_npu_nz_format(model: nn.Module) -> nn.Module:
    """Cast every nn.Linear weight of `model` (already on the npu) to the FRACTAL_NZ layout, in place."""
    torch_npu = import_torch_npu()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            weight = torch_npu.npu_format_cast(module.weight.data, NPU_FORMAT_FRACTAL_NZ)
            module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    return model
