"""torch.distributed set-up for the shard workers: one process per chip, one all-reduce primitive.

Backends: gloo on cpu, nccl on cuda, hccl on npu (Ascend). CPU ranks on one host all-reduce through
shared memory instead of gloo's loopback TCP (shard_worker/shm_allreduce.py; BLOOMDUO_SHM_ALLREDUCE=0
turns that off); gloo still does the rendezvous and takes what shared memory does not.

torch_npu is imported only when the device really is an npu: on a host without CANN it calls
sys.exit() at import time, so it must stay behind this lazy boundary. For the same reason this module
imports torch only inside its functions: `prepare_device_environment` has to run before the process's
first `import torch`, which with torch >= 2.5 autoloads an installed torch_npu.
"""

from __future__ import annotations

import atexit
import datetime
import importlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

    from bloomduo.shard_worker.shm_allreduce import ShmAllReduce

_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}

# HCCL's bounds on Atlas inference cards (300I DUO): connect [120, 7200] s; exec (0, 17340] s, applied
# in whole multiples of 68 s (anything below 68 counts as 68).
_HCCL_CONNECT_RANGE = (120, 7200)
_HCCL_EXEC_STEP, _HCCL_EXEC_MAX = 68, 17340


@dataclass(frozen=True)
class ShardGroup:
    """The process group of the shard workers, and the shared-memory all-reduce that serves it when
    they are CPU ranks on one host (None otherwise)."""

    process_group: dist.ProcessGroup
    shm: ShmAllReduce | None = None


def device_type(device: torch.device | str) -> str:
    """ "npu:1" -> "npu", without building a torch.device ("npu" exists only once torch_npu is imported)."""
    return str(device).split(":", 1)[0]


def backend_for(device: torch.device | str) -> str:
    """Collective backend for a device or "type[:index]" string: cpu -> gloo, cuda -> nccl, npu -> hccl."""
    kind = device_type(device)
    try:
        return _BACKENDS[kind]
    except KeyError:
        raise ValueError(
            f"no collective backend for device type {kind!r}; use one of {sorted(_BACKENDS)}"
        ) from None


def prepare_device_environment(device: str) -> None:
    """Set the environment a shard process on `device` needs; call it before anything imports torch.

    With torch >= 2.5 `import torch` imports every installed device-backend plugin, and torch_npu exits
    the interpreter when CANN is missing: a CPU or CUDA run on a host with torch_npu installed would
    die before it starts. So off the npu, autoload is off unless the user set
    TORCH_DEVICE_BACKEND_AUTOLOAD; on the npu it is left alone (init_distributed imports torch_npu).
    """
    if device_type(device) != "npu":
        os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")


def hccl_environment(timeout_s: float, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """HCCL_CONNECT_TIMEOUT / HCCL_EXEC_TIMEOUT derived from the process-group timeout.

    Only the variables missing from `environ` (default os.environ) are returned: a user's own
    settings win. Both are clamped to HCCL's ranges; the exec timeout is rounded up to a multiple of
    68 s, because 310P rounds it down and it must not fire before `timeout_s`.
    """
    environ = os.environ if environ is None else environ
    seconds = math.ceil(timeout_s)
    low, high = _HCCL_CONNECT_RANGE
    exec_s = -(-seconds // _HCCL_EXEC_STEP) * _HCCL_EXEC_STEP
    derived = {
        "HCCL_CONNECT_TIMEOUT": str(min(max(seconds, low), high)),
        "HCCL_EXEC_TIMEOUT": str(min(max(exec_s, _HCCL_EXEC_STEP), _HCCL_EXEC_MAX)),
    }
    return {name: value for name, value in derived.items() if name not in environ}


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


def require_cuda(device: torch.device | str) -> None:
    """Raise a RuntimeError naming the fix when `device` is cuda but this torch cannot reach a GPU."""
    import torch

    if torch.cuda.is_available():
        return
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    raise RuntimeError(
        f"device {str(device)!r} was requested but torch.cuda.is_available() is False (torch "
        f"{torch.__version__}, {build}): install a CUDA build of torch and the NVIDIA driver, check "
        "CUDA_VISIBLE_DEVICES, or run with --device cpu"
    )


def init_distributed(
    rank: int,
    world_size: int,
    init_method: str,
    device: torch.device | str,
    timeout_s: float = 120.0,
) -> ShardGroup:
    """Join the process group of the `world_size` shard workers and return it.

    For cuda/npu the process is pinned to `device` before the group is created, as nccl/hccl
    bind their communicators to the current device. `init_method` is "tcp://host:port" or
    "file:///path". `timeout_s` bounds every collective: a peer that died makes the survivors
    fail after it instead of hanging forever. On cpu, ranks on one host then set up the
    shared-memory all-reduce (unless BLOOMDUO_SHM_ALLREDUCE=0 on every rank); its slot size is
    BLOOMDUO_SHM_ALLREDUCE_BYTES (rank 0's), bigger tensors go through gloo.
    """
    import torch
    import torch.distributed as dist

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    backend = backend_for(device)
    if backend == "hccl":
        os.environ.update(hccl_environment(timeout_s))  # read when HCCL starts, so before torch_npu
        import_torch_npu()  # registers the "npu" device type and the hccl backend
        torch.npu.set_device(torch.device(device))  # type: ignore[attr-defined]
    elif backend == "nccl":
        require_cuda(device)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    shm = None
    if backend == "gloo" and world_size > 1 and os.environ.get("BLOOMDUO_SHM_ALLREDUCE", "1") != "0":
        shm = _start_shm_all_reduce(timeout_s)
    return ShardGroup(dist.group.WORLD, shm)


def _start_shm_all_reduce(timeout_s: float) -> ShmAllReduce | None:
    from bloomduo.shard_worker.shm_allreduce import DEFAULT_SLOT_BYTES, ShmAllReduce

    slot_bytes = int(os.environ.get("BLOOMDUO_SHM_ALLREDUCE_BYTES", DEFAULT_SLOT_BYTES))
    reducer = ShmAllReduce.create(slot_bytes=slot_bytes, timeout_s=timeout_s)
    if reducer is not None:
        atexit.register(reducer.close)
    return reducer


def shutdown_distributed(group: ShardGroup | None = None) -> None:
    """Unmap `group`'s shared memory and leave the process group if one was joined (safe to call twice)."""
    import torch.distributed as dist

    if group is not None and group.shm is not None:
        group.shm.close()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, group: ShardGroup | None = None) -> torch.Tensor:
    """Sum `tensor` in place across `group` (None: the default process group) and return it; a no-op
    for a single process.

    Through the group's shared memory when it has one and the tensor fits, else torch.distributed.
    """
    if group is not None and group.shm is not None and group.shm.fits(tensor):
        return group.shm.all_reduce(tensor)
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return tensor
    process_group = None if group is None else group.process_group
    if dist.get_world_size(process_group) == 1:
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
    return tensor
