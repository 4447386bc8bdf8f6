"""Weight-only int8 matmul for GPU workers (`--quantize int8` on cuda): one Triton kernel.

out = (x @ W^T) * scale (+ bias), with W int8 [out, in] and one float32 scale per output channel
(quantize.per_channel_int8). Each tile of W is read once from memory as bytes, widened to x's dtype in
registers (exact: |w| <= 127) and multiplied on the tensor cores with float32 sums; the scale and the bias
are applied to those sums before their one rounding. A decode step is a matrix-vector product whose cost
is reading W, so the int8 weight halves it against float16.

Why not what torch has: ATen's CUDA `_weight_int8pack_mm` (torch >= 2.9) gives each thread one output
and walks that output's weight row alone, so neighbouring threads read addresses a row apart (uncoalesced),
and dequantizing per call (quantize.py's fallback) writes and reads a float16 copy of W: 2.5x the bytes of
float16 itself. Triton ships with torch's CUDA wheels; where it is missing the fallback serves.

Few rows (decode) have too few output tiles to keep every multiprocessor reading, so K is split into
SPLIT parts whose float32 partial sums are added in a fixed order afterwards (no atomics: the same inputs
give the same bits, which greedy decoding relies on).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = (torch.float16, torch.bfloat16)  # what the tensor cores multiply; float32 workers dequantize
FEW_ROWS, SOME_ROWS = 16, 64  # the row counts up to which `tiling` takes its decode and middle shapes


@functools.cache
def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def runs(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether this kernel serves an int8 `weight` for activations of `dtype`: a CUDA weight, with Triton."""
    return weight.device.type == "cuda" and dtype in DTYPES and triton_installed()


@dataclass(frozen=True)
class Tiling:
    """One launch's shape: output tiles of block_m x block_n, block_k deep per step, K split in `split`."""

    block_m: int
    block_n: int
    block_k: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3


@functools.lru_cache(maxsize=4096)
def tiling(rows: int, out_features: int, in_features: int, multiprocessors: int) -> Tiling:
    """The launch shape for `rows` of x: small tiles and a split K where few rows leave too few output tiles
    for every multiprocessor to stream weights (decode), large tiles where the product is arithmetic."""
    if rows <= FEW_ROWS:
        base = Tiling(16, 32, 256)
    elif rows <= SOME_ROWS:
        base = Tiling(64, 64, 128)
    else:
        base = Tiling(128, 128, 64, num_warps=8)
    tiles = -(-rows // base.block_m) * -(-out_features // base.block_n)
    split = 1
    # Up to 64 rows the product reads weights more than it multiplies, and fewer tiles than half the
    # multiprocessors leave the memory idle; each part keeps at least two steps of K. Not sooner: the
    # partial sums' extra launches cost more than a wave of one program a multiprocessor loses (H200).
    while (
        rows <= SOME_ROWS
        and tiles * split < multiprocessors // 2
        and in_features // (split * 2) >= 2 * base.block_k
    ):
        split *= 2
    return Tiling(base.block_m, base.block_n, base.block_k, split, base.num_warps, base.num_stages)


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    # Not specialized on the row count (Triton compiles again for M == 1 and M % 16 == 0): one compiled
    # launch per tiling serves every batch, so warm_up covers them all.
    @triton.jit(do_not_specialize=["M"])
    def int8_matmul(
        x_ptr,
        w_ptr,
        scale_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        k_per_split,
        HAS_BIAS: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        part = tl.program_id(2)
        k_start = part * k_per_split
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):
            ks = k_start + k0 + tl.arange(0, BLOCK_K)
            in_k = (ks < K) & (ks < k_start + k_per_split)
            x = tl.load(
                x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & in_k[None, :], other=0.0
            )
            w = tl.load(
                w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & in_k[None, :], other=0
            )
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        if SPLIT == 1:
            acc = acc * tl.load(scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
            if HAS_BIAS:
                acc = acc + tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            tl.store(
                out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside
            )
        else:
            tl.store(out_ptr + part * M * N + rows[:, None] * N + cols[None, :], acc, mask=inside)

    return int8_matmul


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    shape: Tiling | None = None,
) -> torch.Tensor:
    """(x @ weight^T) * scale (+ bias) in x's dtype, for x [M, K] (float16/bfloat16), weight int8 [N, K],
    scale float32 [N]; `shape` overrides the launch's tiling (for benchmarks)."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    if rows == 0:
        return x.new_empty((0, out_features))
    x = x.contiguous()
    if shape is None:
        # Triton's interpreter (the CPU tests) runs anywhere: tile it as a small GPU
        multiprocessors = _multiprocessors(x.device) if x.is_cuda else 8
        shape = tiling(rows, out_features, in_features, multiprocessors)
    k_per_split = -(-in_features // (shape.split * shape.block_k)) * shape.block_k
    if shape.split == 1:
        out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((shape.split, rows, out_features), dtype=torch.float32, device=x.device)
    grid = (-(-out_features // shape.block_n), -(-rows // shape.block_m), shape.split)
    _kernel()[grid](
        x,
        weight,
        scale,
        scale if bias is None else bias,  # never read without a bias
        out,
        rows,
        out_features,
        in_features,
        k_per_split,
        HAS_BIAS=bias is not None,
        SPLIT=shape.split,
        BLOCK_M=shape.block_m,
        BLOCK_N=shape.block_n,
        BLOCK_K=shape.block_k,
        num_warps=shape.num_warps,
        num_stages=shape.num_stages,
    )
    if shape.split == 1:
        return out
    summed = out.sum(dim=0).mul_(scale)
    if bias is not None:
        summed += bias
    return summed.to(x.dtype)


def warm_up(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
    """Compile this weight's launches for every tiling now, at start: the first prefill of 16 streams on an
    H200 spent 1.6 s of every request's time to first token compiling them."""
    for rows in (1, FEW_ROWS + 1, SOME_ROWS + 1):
        int8_linear(
            torch.zeros(rows, weight.shape[1], dtype=dtype, device=weight.device), weight, scale, bias
        )
