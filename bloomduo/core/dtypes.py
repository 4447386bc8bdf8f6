"""The floating-point dtypes bloomduo computes in, by the names the CLI, Info and the tensor wire use.

The one table of dtype names. torch is imported only when a name becomes a torch.dtype: the CLI reads
these names before the process may import torch (see shard_worker.distributed.prepare_device_environment).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# "auto": the checkpoint's own dtype (float16 on npu, whose 310P chips have no bfloat16)
DTYPE_CHOICES = ("auto", *FLOAT_DTYPES)


def to_torch(name: str) -> torch.dtype:
    """ "bfloat16" -> torch.bfloat16; ValueError naming the choices for any other name."""
    import torch

    if name not in FLOAT_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(FLOAT_DTYPES)}")
    return getattr(torch, name)


def name_of(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"; ValueError for a dtype outside FLOAT_DTYPES."""
    name = str(dtype).removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(FLOAT_DTYPES)}")
    return name
