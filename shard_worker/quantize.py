"""int8 weights for a shard's Linears (`--quantize`): half the bytes of bfloat16 for every token read.

Every Linear of the blocks and the LM head slice gets symmetric int8 weights with one float32 scale per
output channel (its largest |w| / 127); biases, LayerNorms and the KV cache keep the worker's dtype.
Two ways to compute with them, because they trade accuracy for speed differently:

- `int8` (weight-only): only the weights are 8-bit; activations keep the worker's dtype (16-bit integers per
  row on AVX2, below) and the weights are widened inside the matmul. On the CPU that is bloomduo's own
  kernel (native.py: the int8 weight tiled, streamed once per call, widened in registers, products summed in
  float32), where the install built it: bfloat16 workers on AVX512-BF16 hold it in oneDNN's row-block order
  and multiply exact bf16 pairs with VDPBF16PS; on AVX2 (where bf16 is emulated) in the same order, each row
  of x rounded to 16-bit integers on the way in (2^-16 of the row's largest |x|: finer than bf16 within 2^-7
  of it) and multiplied by the widened bytes with VPMADDWD, 16 exact products an instruction where an FMA
  makes 8 (a rank's shapes at 16-64 rows 77-80 -> 113-123 GOP/s a Zen 4 core, one row's LM head slice
  streamed at 19 -> 24 GB/s; mean KL on the eval text 1.49e-04 -> 1.38e-04, bf16 alone 1.47e-04); others in
  tiles. Else ATen's `_weight_int8pack_mm` for bfloat16/float16 workers; on CUDA triton_int8's kernel
  (float16/bfloat16, the weight widened in registers); on Ascend torch_npu's npu_weight_quant_batchmatmul
  (W8A16, per-channel scales as a 310P takes them); elsewhere (and for float32 workers without the native
  kernel) the weight is dequantized per call, which is exact but no faster than the unquantized model.
  Measured at one thread on bloom-560m's shapes split over two ranks (AMD EPYC, AVX512-BF16; ms for 24 block
  Linears, 75 MB in bfloat16): 1 row 2.07 / 4 rows 2.71 / 32 rows 15.9 in row blocks (tiles: 2.07 / 3.38 /
  20.5), against int8pack's 4.49 / 6.41 / 35.1.
- `int8-dynamic` (CPU): each call also quantizes its activations to 8 bits and multiplies bytes: what
  CTranslate2's int8 and OpenVINO's dynamic quantization do. Where the CPU has AVX512-VNNI and the install
  built bloomduo's kernel, that kernel (native.py, VNNI layout) quantizes each row on its own (one step and
  zero point per token, the 256 bytes spanning the row's range: asymmetric, so the MLP's GELU outputs,
  nearly all positive, keep a full 8 bits; symmetric steps raised mean KL on the eval text from 8.31e-05 to
  9.21e-05 in float32) and sums byte products with VPDPBUSD, twice VDPBF16PS's products per instruction,
  straight from the int8 weights (no widening): measured at one thread on a bloom-560m rank's shapes (AMD
  EPYC, AVX512-BF16 and VNNI; ms for the 96 block Linears and the LM head slice), 1 row 8.3 / 4 rows 10.4 /
  16 rows 23.4 / 32 rows 49.1, against bfloat16 (oneDNN's layout, bloomduo's kernel) 15.5 / 19.2 / 46.6 /
  86.5 and weight-only int8 12.5 / 16.5 / 53.3 / 109. Where the CPU has AMX-INT8, from 3 rows the same
  blocks go through AMX tiles, the same int32 sums (a Xeon with AMX, the same shapes, 16 rows 33.9 -> 20.3
  ms, 64 rows 67.9 -> 37.1). On AVX2 the same kernel emulates VPDPBUSD with
  VPMADDUBSW + VPMADDWD, exact for 7-bit rows (native.AVX2_FORM; fbgemm reduces its range there too):
  the same rank's Linears, AVX2 class, 1 row 11.9 / 2 rows 12.6 / 4 rows 19.4 / 16 rows 50.9 ms against
  fbgemm's 14.3 / 14.3 / 17.3 / 49.5 (its ~45 us a call is a quarter of a one-row step). Where the kernels
  were not built, fbgemm's int8 GEMM through torch's quantized ops, one activation scale per call (7-bit
  activations without VNNI, see vnni_available). Quantized activations cost accuracy where they have outlier
  features (large BLOOMs do): `bloomduo eval` measures what each choice costs against float32 transformers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bloomduo.shard_worker import native, triton_int8
from bloomduo.shard_worker.config import QUANTIZE_CHOICES
from bloomduo.shard_worker.cpu_kernels import cpu_flags
from bloomduo.shard_worker.distributed import import_torch_npu
from bloomduo.shard_worker.model import Attention

NONE, INT8, INT8_DYNAMIC = QUANTIZE_CHOICES
# A quantized cut stores a Linear's int8 weight under the weight's name and its scales under name + this.
SCALE_SUFFIX = "_scale"


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output row) with weight ~= int8 * scale[:, None], symmetric."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def vnni_available() -> bool:
    """Whether fbgemm's int8 GEMM uses 8-bit dot-product instructions here, so it cannot saturate.

    FBGEMM_ENABLE_INSTRUCTIONS caps fbgemm below the CPU (AVX2, AVX512; AVX512_E1 is its VNNI level): how
    tests and benches imitate an AVX2-only CPU on a newer one.
    """
    capped = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper()
    if capped and not capped.startswith("AVX512_E1"):
        return False
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def native_vnni_runs(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether int8-dynamic runs this [out, in] weight on bloomduo's VNNI kernel (native.py), which
    quantizes each row of activations on its own, rather than through fbgemm, one scale per call."""
    return (
        weight.device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float32)
        and native.runs_vnni()
        and native.vnni_fits(weight)
    )


def _weight_only_kernel(weight: torch.Tensor, dtype: torch.dtype) -> str:
    """What computes `--quantize int8` for this [out, in] weight and activations of `dtype`."""
    on_cpu = weight.device.type == "cpu"
    if (
        on_cpu
        and dtype in (torch.bfloat16, torch.float32)
        and native.best_isa() >= native.AVX2
        and native.fits(weight)
    ):
        return "native"
    if on_cpu and dtype in (torch.bfloat16, torch.float16):
        return "aten int8pack"
    if triton_int8.runs(weight, dtype):
        return "triton"
    if weight.device.type == "npu":
        return _npu_weight_quant_kernel(dtype)
    return "dequantized per call"


def _npu_weight_quant_kernel(dtype: torch.dtype) -> str:
    """torch_npu's W8A16 matmul, per-channel scales (what a 310P supports), or an error naming the fix:
    dequantizing per call would read more bytes than float16 itself."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"--quantize int8 on an npu computes in float16 (310P) or bfloat16, not {dtype}")
    if not hasattr(import_torch_npu(), "npu_weight_quant_batchmatmul"):
        raise RuntimeError(
            "--quantize int8 on an npu needs torch_npu.npu_weight_quant_batchmatmul (torch_npu and CANN "
            "8.0.RC1 or newer): upgrade them, or serve without --quantize"
        )
    return "npu weight-quant"


class Int8Linear(nn.Module):
    """An nn.Linear whose weight is int8 with a float32 scale per output channel (see the module doc)."""

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        bias: nn.Parameter | None,
        scheme: str,
        dtype: torch.dtype,
    ) -> None:
        """`weight` int8 [out, in] and `scale` float32 [out], as per_channel_int8 makes them; `dtype` the
        activations'."""
        super().__init__()
        if scheme not in (INT8, INT8_DYNAMIC):
            raise ValueError(f"--quantize {scheme!r}: expected one of {', '.join(QUANTIZE_CHOICES)}")
        self.out_features, self.in_features = weight.shape
        self.scheme = scheme
        self.dtype = dtype
        self.bias = bias
        self.gelu = False  # BLOOM's tanh GELU on the float32 sums, folded in by quantize_linears
        self.nbytes = weight.numel() + scale.numel() * scale.element_size()
        self.register_buffer("row_sums", None)  # the VNNI layout's alone, as its form
        self.vnni: native.VnniForm | None = None
        # bloomduo's kernel for this weight, built on the first call: load_shard moves the model after
        # quantizing it
        self._native: native.LinearKernel | None = None
        if scheme == INT8_DYNAMIC:
            if weight.device.type != "cpu":
                raise ValueError("--quantize int8-dynamic runs on the CPU only; use int8 elsewhere")
            self.kernel = "native vnni" if native_vnni_runs(weight, dtype) else "fbgemm"
            if self.kernel == "native vnni":
                self.layout, self.vnni = native.VNNI, native.vnni_form()
                self.register_buffer("weight_int8", native.to_vnni_blocks(weight, self.vnni))
                self.register_buffer("scale", scale.float())
                self.register_buffer("row_sums", native.vnni_row_sums(weight))
                self.nbytes += self.row_sums.numel() * self.row_sums.element_size()
                return
            # Without VNNI, fbgemm's u8 x s8 pair sums can saturate int16: 7-bit activations avoid that.
            self.reduce_range = not vnni_available()
            float_bias = None if bias is None else bias.detach().float()
            with warnings.catch_warnings():  # quantized tensors are deprecated as a user-facing type
                warnings.simplefilter("ignore")
                quantized = torch._make_per_channel_quantized_tensor(
                    weight, scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0
                )
                self._packed = torch.ops.quantized.linear_prepack(quantized, float_bias)
        else:
            self.kernel = _weight_only_kernel(weight, dtype)
            native_kernel = self.kernel == "native"
            # bf16 activations on AVX512-BF16 or AVX2: the row-block layout, read with VDPBF16PS or, rows
            # rounded to words, VPMADDWD (outputs in the lanes: no horizontal sums); elsewhere the tiles
            self.layout = native.TILED
            reads_row_blocks = native.best_isa() in (native.AVX2, native.AVX512_BF16)
            if native_kernel and dtype == torch.bfloat16 and reads_row_blocks:
                self.layout = native.ONEDNN if self.out_features % 64 == 0 else native.TILED
            arranged = native.to_row_blocks if self.layout == native.ONEDNN else native.to_tiles
            self.register_buffer("weight_int8", arranged(weight) if native_kernel else weight)
            if self.kernel == "npu weight-quant":  # looked up once, not on every call
                self._npu_matmul = import_torch_npu().npu_weight_quant_batchmatmul
            float32_scale = native_kernel or self.kernel == "triton"
            self.register_buffer("scale", scale.to(weight.device, torch.float32 if float32_scale else dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str) -> Int8Linear:
        weight, scale = per_channel_int8(linear.weight)
        return cls(weight.to(linear.weight.device), scale, linear.bias, scheme, linear.weight.dtype)

    def kernel_for(self, rows: int) -> native.LinearKernel | None:
        """The native kernel every call runs (any number of `rows`), or None off bloomduo's kernels."""
        del rows
        if not self.kernel.startswith("native"):
            return None
        if self._native is None:
            self._native = native.LinearKernel(
                self.weight_int8, self.bias, self.scale, self.layout, self.gelu, self.row_sums, self.vnni
            )
        return self._native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        kernel = self.kernel_for(rows.shape[0])
        if kernel is not None:
            out = kernel(rows)
        elif self.scheme == INT8_DYNAMIC:
            out = torch.ops.quantized.linear_dynamic(rows.float(), self._packed, self.reduce_range)
            out = out.to(x.dtype)
        elif self.kernel == "triton":
            out = triton_int8.int8_linear(rows, self.weight_int8, self.scale, self.bias)
        elif self.kernel == "npu weight-quant":  # (K, N) weights: the transposed view is the fast form there
            out = self._npu_matmul(rows, self.weight_int8.t(), self.scale, bias=self.bias)
        elif self.kernel == "aten int8pack":
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale)
            if self.bias is not None:
                out += self.bias
        else:
            out = F.linear(rows, self.weight_int8.to(x.dtype) * self.scale[:, None], self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def quantize_linears(
    model: nn.Module, scheme: str, stored: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> None:
    """Replace every nn.Linear of `model` by an Int8Linear, in place.

    `stored` has the int8 weight and scales of Linears that a quantized cut (`bloomduo shard-weights
    --quantize int8`) holds, by module name: those are used as they are, so serving the cut computes
    exactly what quantizing the full checkpoint at start does.
    """
    stored = stored or {}
    if scheme == NONE:
        if stored:
            raise ValueError(
                "this checkpoint holds int8 weights (cut by `bloomduo shard-weights --quantize int8`): serve "
                "it with --quantize int8 or int8-dynamic, or cut the full checkpoint again without --quantize"
            )
        return
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            path = f"{parent_name}.{name}" if parent_name else name
            if path in stored:
                weight, scale = stored[path]
                linear = Int8Linear(weight, scale, child.bias, scheme, child.weight.dtype)  # weight: meta
            else:
                linear = Int8Linear.from_linear(child, scheme)
            setattr(parent, name, linear)
    _fold_gelus(model)
    for module in model.modules():
        if isinstance(module, Attention):
            # int8 workers are not held to transformers' float32 numbers: a float32 one (int8-dynamic through
            # fbgemm) reads its cache in place too: 1.5 against 3.4 ms of a one-row AVX2 step per rank
            module.native_float32 = True


def _fold_gelus(model: nn.Module) -> None:
    """Each MLP's tanh GELU into the int8 Linear before it where bloomduo's kernel runs that Linear: applied
    to the float32 sums before their one rounding (as the bfloat16 workers' packed Linears do), and one
    elementwise pass and module call less per layer."""
    for module in model.modules():
        gelu, linear = getattr(module, "gelu", None), getattr(module, "dense_h_to_4h", None)
        if (
            isinstance(gelu, nn.GELU)
            and gelu.approximate == "tanh"
            and isinstance(linear, Int8Linear)
            and linear.kernel.startswith("native")
        ):
            linear.gelu = True
            module.gelu = nn.Identity()


def compile_kernels(model: nn.Module) -> None:
    """Compile the Triton launches of the model's int8 Linears that run triton_int8's kernel, once per weight
    shape, so that no request waits for a compile."""
    seen = set()
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.kernel == "triton":
            shape = (*module.weight_int8.shape, module.bias is None)
            if shape not in seen:
                seen.add(shape)
                triton_int8.warm_up(module.weight_int8, module.scale, module.bias, module.dtype)


def describe(model: nn.Module) -> str:
    """What runs the model's int8 Linears, in words ("" when it has none)."""
    sample = next((m for m in model.modules() if isinstance(m, Int8Linear)), None)
    if sample is None:
        return ""
    rows = "" if sample.vnni is None else f", {sample.vnni.levels.bit_length()}-bit rows"
    if sample.vnni == native.VPDPBUSD_FORM and native.vnni_amx():
        rows += f", AMX from {native.AMX_INT8_MIN_ROWS} rows"
    return f"{sample.scheme} ({sample.kernel}{rows})"


def linear_weights(model: nn.Module) -> dict[str, str]:
    """Every nn.Linear's weight parameter name -> the Linear's module name: what a quantized cut stores."""
    return {f"{name}.weight": name for name, module in model.named_modules() if type(module) is nn.Linear}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s weights as held: parameters, plus each Int8Linear's int8 weight and scales."""
    held = sum(p.numel() * p.element_size() for p in model.parameters())  # biases of Int8Linears too
    return held + sum(m.nbytes for m in model.modules() if isinstance(m, Int8Linear))
