"""int8 weights for a shard's Linears (`--quantize`): half the bytes of bfloat16 for every token read.

Every Linear of the blocks and the LM head slice gets symmetric int8 weights with one float32 scale per
output channel (its largest |w| / 127); biases, LayerNorms and the KV cache keep the worker's dtype.
Two ways to compute with them, because they trade accuracy for speed differently:

- `int8` (weight-only): activations stay in the worker's dtype and the weights are widened inside the
  matmul. On the CPU that is ATen's `_weight_int8pack_mm` for bfloat16/float16 workers; elsewhere (and
  for float32 workers, where that kernel has no fast path) the weight is dequantized per call, which is
  exact but no faster than the unquantized model.
- `int8-dynamic` (CPU): each call also quantizes its activations to 8 bits with one scale per call, and
  runs an int8 GEMM (fbgemm, through torch's quantized ops): what CTranslate2's int8 does. Measured at
  one thread on bloom-560m's shapes split over two ranks (AMD EPYC, AVX512-BF16; ms for all 96 block
  Linears): 1 row 7.9 / 4 rows 8.1 / 32 rows 28.9, against bfloat16 packed 20.6 / 17.5 / 54.2 and
  weight-only 18.2 / 25.3 / 137. It costs accuracy where activations have outlier features
  (large BLOOMs do): `bloomduo eval` measures what each choice costs against float32 transformers.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from bloomduo.shard_worker.config import QUANTIZE_CHOICES
from bloomduo.shard_worker.cpu_kernels import cpu_flags

NONE, INT8, INT8_DYNAMIC = QUANTIZE_CHOICES


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output row) with weight ~= int8 * scale[:, None], symmetric."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def vnni_available() -> bool:
    """Whether the CPU has 8-bit dot-product instructions, so fbgemm's int8 GEMM cannot saturate."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


class Int8Linear(nn.Module):
    """An nn.Linear whose weight is int8 with a float32 scale per output channel (see the module doc)."""

    def __init__(self, linear: nn.Linear, scheme: str) -> None:
        super().__init__()
        if scheme not in (INT8, INT8_DYNAMIC):
            raise ValueError(f"--quantize {scheme!r}: expected one of {', '.join(QUANTIZE_CHOICES)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme = scheme
        self.dtype = linear.weight.dtype
        weight, scale = per_channel_int8(linear.weight)
        self.bias = linear.bias
        self.nbytes = weight.numel() + scale.numel() * scale.element_size()
        if scheme == INT8_DYNAMIC:
            if linear.weight.device.type != "cpu":
                raise ValueError("--quantize int8-dynamic runs on the CPU only; use int8 elsewhere")
            # Without VNNI, fbgemm's u8 x s8 pair sums can saturate int16: 7-bit activations avoid that.
            self.reduce_range = not vnni_available()
            bias = None if linear.bias is None else linear.bias.detach().float()
            with warnings.catch_warnings():  # quantized tensors are deprecated as a user-facing type
                warnings.simplefilter("ignore")
                quantized = torch._make_per_channel_quantized_tensor(
                    weight, scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0
                )
                self._packed = torch.ops.quantized.linear_prepack(quantized, bias)
        else:
            self.register_buffer("weight_int8", weight.to(linear.weight.device))
            self.register_buffer("scale", scale.to(linear.weight.device, self.dtype))
            self._aten = linear.weight.device.type == "cpu" and self.dtype in (torch.bfloat16, torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.scheme == INT8_DYNAMIC:
            out = torch.ops.quantized.linear_dynamic(rows.float(), self._packed, self.reduce_range)
            out = out.to(x.dtype)
        elif self._aten:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale)
            if self.bias is not None:
                out += self.bias
        else:
            out = F.linear(rows, self.weight_int8.to(x.dtype) * self.scale[:, None], self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def quantize_linears(model: nn.Module, scheme: str) -> str:
    """Replace every nn.Linear of `model` by an Int8Linear, in place; say what runs them, in words."""
    if scheme == NONE:
        return ""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child, scheme))
    sample = next((m for m in model.modules() if isinstance(m, Int8Linear)), None)
    if sample is None or scheme == INT8_DYNAMIC:
        return f"{scheme} (fbgemm)" if sample is not None else scheme
    return f"{scheme} ({'aten int8pack' if sample._aten else 'dequantized per call'})"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s weights as held: parameters, plus each Int8Linear's int8 weight and scales."""
    held = sum(p.numel() * p.element_size() for p in model.parameters())  # biases of Int8Linears too
    return held + sum(m.nbytes for m in model.modules() if isinstance(m, Int8Linear))
