"""torch.Tensor <-> bloomduo.v1.Tensor: raw row-major bytes plus dtype and shape, no pickling."""

from __future__ import annotations

import warnings

import torch

from bloomduo.core.dtypes import FLOAT_DTYPES, name_of, to_torch
from bloomduo.v1 import shard_pb2

# decode_tensor's tensors are read-only views of the message's bytes: callers only read them or copy them
# (torch.cat, .to), so no copy is made, and torch's warning about it says nothing. Filtered once here:
# catch_warnings() around each call took 4x the view's own time (4.2 against 1.0 us) and is not thread-safe.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class TensorWireError(ValueError):
    pass


def write_tensor(target: shard_pb2.Tensor, tensor: torch.Tensor) -> None:
    """Fill `target`, a field of the message being built, in place: passing an encoded Tensor to the outer
    message's constructor copies its bytes once more (4 MiB of logits rows: a step's full rows)."""
    try:
        dtype_name = name_of(tensor.dtype)
    except ValueError as exc:
        raise TensorWireError(f"cannot send it: {exc}") from None
    cpu = tensor.detach().to("cpu").contiguous()
    # Viewing as bytes avoids numpy, which has no bfloat16.
    target.data = cpu.view(torch.uint8).numpy().tobytes() if cpu.numel() else b""
    target.dtype = dtype_name
    target.shape[:] = list(cpu.shape)


def decode_tensor(message: shard_pb2.Tensor) -> torch.Tensor:
    """A read-only tensor over the message's bytes (no copy); copy it before writing to it."""
    if message.dtype not in FLOAT_DTYPES:
        raise TensorWireError(f"unknown tensor dtype {message.dtype!r}; supported: {', '.join(FLOAT_DTYPES)}")
    dtype = to_torch(message.dtype)
    shape = tuple(message.shape)
    count = 1
    for size in shape:
        count *= size
    expected = count * torch.empty((), dtype=dtype).element_size()
    if len(message.data) != expected:
        raise TensorWireError(
            f"tensor of shape {list(shape)} and dtype {message.dtype} needs {expected} bytes, "
            f"got {len(message.data)}"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(message.data, dtype=dtype).reshape(shape)
