"""The device-specific layouts and kernels a shard's Linear weights get once, after loading.

`format_weights` picks, by device, dtype and environment:

bfloat16 on the CPU: the kernels cpu_kernels.py chooses per machine at start (or is told by
BLOOMDUO_CPU_KERNELS / --cpu-kernels), among them oneDNN's packed layout with the MLP's GELU fused
into its first matmul (BLOOMDUO_CPU_PACKED_WEIGHTS=0 takes that one out of the choice). With the
plain row-major layout, oneDNN's bfloat16 matmul reads weights at about 7 GB/s per core; reordered
once at load time into oneDNN's blocked layout (what torch.compile's "freezing" does), the same
matmuls run at about 9-10 GB/s with bit-identical results. The packed weight is an opaque oneDNN
tensor of the same size, so memory does not grow; only the forward changes, to the op that takes that
layout. That op also takes a post-op, so the MLP's tanh GELU runs inside dense_h_to_4h, on the float32
accumulator before the one rounding to bfloat16: a prefill's separate bfloat16 GELU pass cost as much
as a third of that matmul. It is one bfloat16 rounding closer to float32 than the unfused pair (tested).
CPUs where oneDNN has no bfloat16 matmul (AVX2 only; also when ONEDNN_MAX_CPU_ISA=AVX2 caps a newer
CPU) cannot pack; there the choice is between ATen's emulated bfloat16 kernel and a float32 GEMM from
the bfloat16 weights, by row count. float32 and float16 are left alone: float32 is the dtype the
parity tests hold to transformers bit for bit, and another kernel sums in another order.

FRACTAL_NZ on the npu (BLOOMDUO_NPU_NZ=1): 310P matmuls run faster on NZ weights, and nn.Linear's
forward takes them as they are. Biases, LayerNorms and embeddings keep their layout.

Both leave the modules around each Linear alone (the tensor-parallel RowParallel keeps its all-reduce).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from bloomduo.core.logs import get_logger
from bloomduo.shard_worker.cpu_kernels import (
    FP32,
    TILED_FP32,
    Fp32Scratch,
    KernelChoice,
    PackedLinear,
    apply_routes,
    candidate_paths,
    choose,
    groups_of,
    kernels_setting,
)
from bloomduo.shard_worker.distributed import ShardGroup, device_type, import_torch_npu

__all__ = [
    "NPU_FORMAT_FRACTAL_NZ",
    "PackedLinear",
    "format_weights",
    "npu_nz_requested",
    "packing_applies",
    "to_npu_nz_format",
]

log = get_logger(__name__)
NPU_FORMAT_FRACTAL_NZ = 29  # torch_npu's ACL_FORMAT_FRACTAL_NZ: the weight layout 310P matmuls prefer


def format_weights(
    model: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    kernels: str = "auto",
    group: ShardGroup | None = None,
) -> str:
    """Convert `model`'s Linear weights, in place, to the layout and kernels fastest on `device`, and
    say what it chose in words (the worker's Info shows it).

    `kernels`: the worker's --cpu-kernels; "auto" defers to BLOOMDUO_CPU_KERNELS, else measures. With a
    `group` of several CPU ranks, every rank takes the choice the mean of their timings calls for: ranks
    choosing from their own timings chose differently where the paths are close (the tiny demo model's
    blocks: aten on one rank, packed on the other), and ranks whose kernels differ round differently.
    """
    if npu_nz_requested(device):
        to_npu_nz_format(model)
        return "FRACTAL_NZ"
    groups = groups_of(model)
    measures = device.type == "cpu" and dtype == torch.bfloat16 and bool(groups)
    setting = kernels_setting(kernels)
    scratch = Fp32Scratch()
    paths = candidate_paths(packing_applies(device, dtype)) if measures else []
    choice = choose(groups, paths, scratch, setting) if measures else None
    del groups  # holding the Linears would keep every plain weight alive beside its replacement
    if device.type == "cpu":
        choice = _group_choice(choice, group)
    if choice is None:
        return "eager"
    apply_routes(model, choice, scratch)
    if not any(route.paths & {FP32, TILED_FP32} for route in choice.routes.values()):
        scratch.release()  # timed by the probes, taken by no route: its 4 MiB stayed resident
    log.info(
        "cpu_kernels_chosen",
        kernels=choice.describe(),
        setting=setting,
        candidates=paths,
        threads=torch.get_num_threads(),
        capability=torch.backends.cpu.get_cpu_capability(),
        measured_ms=choice.timings_ms,
        rejected={group: why for group, why in choice.rejected.items() if why},
        seconds=round(choice.seconds, 3),
    )
    return choice.describe()


def _group_choice(choice: KernelChoice | None, group: ShardGroup | None) -> KernelChoice | None:
    """`choice` with the routes the mean of every rank's timings calls for, where every rank measured.
    Every CPU rank of the group calls it, whatever its dtype: a collective that only bfloat16 ranks entered
    would hang a group started with mixed --dtype, which the gateway must be able to refuse by name."""
    if group is None or dist.get_world_size(group.process_group) == 1:
        return choice
    measured = choice is not None and not choice.forced
    timings: list[dict | None] = [None] * dist.get_world_size(group.process_group)
    dist.all_gather_object(timings, choice.timings_ms if measured else None, group=group.process_group)
    if measured and all(rank is not None for rank in timings):
        choice.agree(timings)
    return choice


def packing_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a worker on `device` in `dtype` may pack its Linear weights (the chooser decides)."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and os.environ.get("BLOOMDUO_CPU_PACKED_WEIGHTS", "1") != "0"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


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
