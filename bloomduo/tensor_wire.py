"""torch.Tensor <-> bloomduo.v1.Tensor: raw row-major bytes plus dtype and shape, no pickling."""

from __future__ import annotations

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
    """A tensor over the message's bytes; it is writable only after a copy (it shares the protobuf buffer)."""
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
    # bytearray makes the buffer writable so torch does not warn; it is one copy of the payload.
    return torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(shape)
