"""torch.distributed set-up for the shard workers: one process per chip, one all-reduce primitive.

Backends: gloo on cpu, nccl on cuda, hccl on npu (Ascend). torch_npu is imported only when the
device really is an npu: on a host without CANN it calls sys.exit() at import time, so it must stay
behind this lazy boundary.
"""

from __future__ import annotations

import datetime
import importlib

import torch
import torch.distributed as dist

_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def device_type(device: torch.device | str) -> str:
    """ "npu:1" -> "npu", without building a torch.device ("npu" exists only once torch_npu is imported)."""
    return device.type if isinstance(device, torch.device) else str(device).split(":", 1)[0]


def backend_for(device: torch.device | str) -> str:
    """Collective backend for a device or "type[:index]" string: cpu -> gloo, cuda -> nccl, npu -> hccl."""
    kind = device_type(device)
    try:
        return _BACKENDS[kind]
    except KeyError:
        raise ValueError(
            f"no collective backend for device type {kind!r}; use one of {sorted(_BACKENDS)}"
        ) from None


def import_torch_npu():
    """Import torch_npu (registers the "npu" device and the "hccl" backend) with an error naming the fix."""
    fix = (
        "install the torch_npu wheel matching this torch version and the host's CANN toolkit "
        "(pip install 'bloomduo[npu]'), then `source /usr/local/Ascend/ascend-toolkit/set_env.sh`"
    )
    try:
        return importlib.import_module("torch_npu")
    except ImportError as exc:
        raise RuntimeError(f"device 'npu' needs the torch_npu package, which is missing: {fix}") from exc
    except SystemExit as exc:  # torch_npu exits the interpreter when CANN libraries are not found
        raise RuntimeError(f"torch_npu failed to load (CANN not found?): {fix}") from exc


def init_distributed(
    rank: int,
    world_size: int,
    init_method: str,
    device: torch.device | str,
    timeout_s: float = 120.0,
) -> dist.ProcessGroup:
    """Join the process group of the `world_size` shard workers and return it.

    For cuda/npu the process is pinned to `device` before the group is created, as nccl/hccl
    bind their communicators to the current device. `init_method` is "tcp://host:port" or
    "file:///path". `timeout_s` bounds every collective: a peer that died makes the survivors
    fail after it instead of hanging forever.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    backend = backend_for(device)
    if backend == "hccl":
        import_torch_npu()  # registers the "npu" device type and the hccl backend
        torch.npu.set_device(torch.device(device))  # type: ignore[attr-defined]
    elif backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist.group.WORLD


def shutdown_distributed() -> None:
    """Leave the process group if one was joined (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum `tensor` in place across the group and return it; a no-op for a single process."""
    if not dist.is_available() or not dist.is_initialized():
        return tensor
    if dist.get_world_size(group) == 1:
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
