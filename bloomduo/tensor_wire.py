"""torch.Tensor <-> bloomduo.v1.Tensor: raw row-major bytes plus dtype and shape, no pickling."""

from __future__ import annotations

import warnings

import torch

from bloomduo.v1 import shard_pb2

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class TensorWireError(ValueError):
    pass


def encode_tensor(tensor: torch.Tensor) -> shard_pb2.Tensor:
    if tensor.dtype not in DTYPE_NAMES:
        raise TensorWireError(f"cannot send a {tensor.dtype} tensor; supported: {', '.join(DTYPES)}")
    cpu = tensor.detach().to("cpu").contiguous()
    # Viewing as bytes avoids numpy, which has no bfloat16.
    data = cpu.view(torch.uint8).numpy().tobytes() if cpu.numel() else b""
    return shard_pb2.Tensor(data=data, dtype=DTYPE_NAMES[cpu.dtype], shape=list(cpu.shape))


def decode_tensor(message: shard_pb2.Tensor) -> torch.Tensor:
    """A read-only tensor over the message's bytes (no copy); copy it before writing to it."""
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise TensorWireError(f"unknown tensor dtype {message.dtype!r}; supported: {', '.join(DTYPES)}")
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
    with warnings.catch_warnings():
        # Read-only is fine: callers only read it or copy it (torch.cat, .to), so no copy here.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(message.data, dtype=dtype).reshape(shape)
