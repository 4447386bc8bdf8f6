"""The project's own CPU matrix and attention kernels (_kernels.c), and the layouts they read.

_kernels is compiled by the project's install (the ext-module in pyproject.toml) and optional: where it
was not built (no C compiler, a platform it does not know) `available()` is False and the workers keep
torch's kernels. Which ISA a call uses is chosen here, once: the best the CPU has, lowered to what torch
itself was told it may use (ATEN_CPU_CAPABILITY) and to oneDNN's view of bfloat16 (ONEDNN_MAX_CPU_ISA),
so tests and benches that imitate an AVX2-only CPU on a newer one get the AVX2 kernel too.
"""

from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import torch

from bloomduo.core.logprobs import RowSummary

TILE_ROWS, TILE_K = 4, 32  # _kernels.c's tiled layout
# the weight layouts _kernels.c reads: its tiles, oneDNN's packed bf16 row blocks, int8 blocks for VPDPBUSD
TILED, ONEDNN, VNNI = 0, 1, 2
ONEDNN_BLOCK_ROWS, AMX_BLOCK_ROWS = 64, 32  # the ONEDNN layout's blocks: oneDNN's for AVX512-BF16, for AMX
BLOCK_ROWS_READ = (ONEDNN_BLOCK_ROWS, AMX_BLOCK_ROWS)
NORM_LANES = 16  # _kernels.c's LayerNorm sums in this many lanes: blocks() takes hidden sizes it divides
SCALAR, AVX2, AVX512, AVX512_BF16 = 0, 1, 2, 3
_AVX512_VNNI = 4  # what _kernels.supported() calls VPDPBUSD: beside the ladder above, not on it
_AMX_INT8 = 5  # and AMX's int8 tiles (the CPU, the compiler and Linux allow them)
AMX_INT8_MIN_ROWS = 3  # _kernels.c's: from this many rows of x the VNNI layout goes through AMX where it runs
ISA_NAMES = {SCALAR: "scalar", AVX2: "avx2", AVX512: "avx512", AVX512_BF16: "avx512-bf16"}
_DTYPE_CODES = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.int8: 2,
    torch.uint8: 3,
}  # uint8: a CompactWeight's


@functools.cache
def _module():
    try:
        return importlib.import_module("bloomduo.shard_worker._kernels")
    except ImportError:
        return None


def available() -> bool:
    """Whether the install built _kernels.c here."""
    return _module() is not None


@functools.cache
def best_isa() -> int:
    """The fastest ISA level this CPU runs that torch's own setting allows (SCALAR without _kernels)."""
    module = _module()
    if module is None:
        return SCALAR
    from bloomduo.shard_worker.cpu_kernels import bf16_is_emulated

    capability = torch.backends.cpu.get_cpu_capability()
    ceiling = AVX512_BF16 if capability.startswith("AVX512") else AVX2 if capability == "AVX2" else SCALAR
    if ceiling == AVX512_BF16 and bf16_is_emulated():
        ceiling = AVX512
    return next(isa for isa in range(ceiling, SCALAR - 1, -1) if module.supported(isa))


class VnniForm(NamedTuple):
    """What one vector form of the VNNI layout's kernel takes: rows of x quantized to bytes 0 .. `levels`, and
    weight blocks of `block_rows` rows."""

    levels: int
    block_rows: int


# VPDPBUSD (AVX512-VNNI): 8-bit rows, 64-row blocks (4 zmm registers of 16 lanes per 4-column group)
VPDPBUSD_FORM = VnniForm(levels=255, block_rows=64)
# AVX2: VPMADDUBSW + VPMADDWD, whose int16 pair sums are exact for 127 x 127 x 2 and saturate beyond (fbgemm's
# `reduce_range` on the same CPUs); 32-row blocks (4 ymm registers per group, two rows a pass)
AVX2_FORM = VnniForm(levels=127, block_rows=32)


def runs_vnni() -> bool:
    """Whether the VNNI layout's byte dot-product kernel runs here in a vector form (vnni_form says which)."""
    return best_isa() >= AVX2


@functools.cache
def vnni_form() -> VnniForm:
    """The form of the VNNI layout's kernel that runs here: VPDPBUSD where an AVX512 level is allowed (see
    best_isa) and the CPU has AVX512-VNNI, else the AVX2 one."""
    module = _module()
    vpdpbusd = module is not None and best_isa() >= AVX512 and module.supported(_AVX512_VNNI)
    return VPDPBUSD_FORM if vpdpbusd else AVX2_FORM


@functools.cache
def vnni_amx() -> bool:
    """Whether the VPDPBUSD form runs on AMX-INT8 tiles here at the best ISA level (from AMX_INT8_MIN_ROWS
    rows of x, K a multiple of 64; the same int32 sums, so the same outputs); at AVX512 it stays VPDPBUSD."""
    module = _module()
    return vnni_form() == VPDPBUSD_FORM and best_isa() == AVX512_BF16 and module.supported(_AMX_INT8)


def _reads_onednn_blocks(packed: torch.Tensor, bias: torch.Tensor | None, block_rows: int) -> bool:
    """Whether the ONEDNN path reading `packed` as blocks of `block_rows` gives oneDNN's own product on one
    random row, within two bf16 roundings (which catches any other blocking oneDNN may have picked)."""
    out_features, in_features = packed.shape
    if not (
        best_isa() == AVX512_BF16
        and packed.dtype == torch.bfloat16
        and out_features % block_rows == 0
        and in_features % TILE_K == 0
        and (bias is None or bias.dtype == torch.bfloat16)
    ):
        return False
    x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    bias = None if bias is None else bias.detach()
    want = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "").float()
    got = linear(x, packed, bias, layout=ONEDNN, block_rows=block_rows).float()
    return bool((got - want).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * want.abs().max())


@functools.cache
def onednn_packing_rows() -> int | None:
    """The rows of the blocks oneDNN here packs bfloat16 Linear weights in, where the ONEDNN path reads them
    (ONEDNN_BLOCK_ROWS as for AVX512-BF16, AMX_BLOCK_ROWS as for AMX), found on a random probe weight; None
    where it packs some other way, or none: the native path is then no candidate at all."""
    if best_isa() != AVX512_BF16 or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    probe = torch.randn(128, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(probe, None)
    except RuntimeError:  # a torch build without oneDNN's bf16 linear
        return None
    return next((rows for rows in BLOCK_ROWS_READ if _reads_onednn_blocks(packed, None, rows)), None)


def reads_onednn_packing() -> bool:
    """Whether oneDNN here packs bfloat16 Linear weights in a blocking the ONEDNN path reads."""
    return onednn_packing_rows() is not None


def onednn_block_rows(packed: torch.Tensor, bias: torch.Tensor | None = None) -> int | None:
    """The block rows the ONEDNN path reads this oneDNN-packed bfloat16 weight with, checked on the weight
    itself, else None. The probe's blocking is tried first: a weight whose every blocking gives the same
    product (all zeros: a rank's slice of vocabulary past a small tokenizer's) would pass the first one
    tried, and 64-row blocks of an AMX packing never reach the AMX tiles."""
    usual = onednn_packing_rows()
    if usual is None:
        return None
    order = (usual, *(rows for rows in BLOCK_ROWS_READ if rows != usual))
    return next((rows for rows in order if _reads_onednn_blocks(packed, bias, rows)), None)


def fits(weight: torch.Tensor) -> bool:
    """Whether a [out, in] weight can take the tiled layout (out a multiple of 4, in of 32)."""
    out_features, in_features = weight.shape
    return out_features % TILE_ROWS == 0 and in_features % TILE_K == 0


def to_tiles(weight: torch.Tensor) -> torch.Tensor:
    """The [out, in] weight in _kernels.c's tiled layout (a new contiguous tensor of the same shape)."""
    out_features, in_features = weight.shape
    tiles = weight.reshape(out_features // TILE_ROWS, TILE_ROWS, in_features // TILE_K, TILE_K)
    return tiles.transpose(1, 2).contiguous().view(out_features, in_features)


def row_blocks_fit(weight: torch.Tensor) -> bool:
    """Whether a [out, in] weight can take the ONEDNN layout (out a multiple of 64, in of 32)."""
    out_features, in_features = weight.shape
    return out_features % 64 == 0 and in_features % TILE_K == 0


def to_row_blocks(weight: torch.Tensor, block_rows: int = ONEDNN_BLOCK_ROWS) -> torch.Tensor:
    """The [out, in] weight (row_blocks_fit) in the ONEDNN layout: oneDNN's packing of bf16 weights (blocks of
    64 rows x 32 columns, each holding (k, k+1) pairs row by row; or 32 rows, as for AMX), made here: for int8
    weights, for bf16 ones where oneDNN packs none (bf16 emulated: the AVX2 FMA form reads them), and before
    to_compact."""
    out_features, in_features = weight.shape
    blocks = weight.reshape(out_features // block_rows, block_rows, in_features // TILE_K, TILE_K // 2, 2)
    return blocks.permute(0, 2, 3, 1, 4).contiguous().view(out_features, in_features)


def compact_block_rows() -> int:
    """The rows of the compact blocks this CPU reads best: 32 where the 32-row blocks reach AMX's tiles (as
    oneDNN packs for AMX), else 64."""
    return onednn_packing_rows() or ONEDNN_BLOCK_ROWS


def compact_fits(weight: torch.Tensor) -> bool:
    """Whether a bf16 [out, in] weight can take the compact layout here (out a multiple of its block rows, in
    of 32), and its kernel runs here (AVX512-BF16, or the AVX2 FMA form on 64-row blocks)."""
    out_features, in_features = weight.shape
    return (
        best_isa() >= AVX2
        and weight.dtype == torch.bfloat16
        and out_features % compact_block_rows() == 0
        and in_features % TILE_K == 0
    )


class CompactWeight(NamedTuple):
    """A bf16 weight in _kernels.c's compact row blocks (see there): its bytes and its shape."""

    data: torch.Tensor  # uint8, every part of the layout end to end
    out_features: int
    in_features: int
    block_rows: int

    @property
    def patches(self) -> int:
        """How many of its weights are stored whole (their top byte not in their block's table)."""
        blocks = self.out_features // self.block_rows
        offset = _compact_data_bytes(self.out_features, self.in_features) + blocks * (COMPACT_CODES + 4)
        return int(self.data[offset : offset + 4].view(torch.int32).item())


COMPACT_CODES = 16  # _kernels.c's: the top bytes a compact block's table holds
_COMPACT_GROUP, _COMPACT_GROUP_BYTES = 128, 192  # and its groups: 128 weights' low bytes, then their codes


def _compact_data_bytes(out_features: int, in_features: int) -> int:
    """The bytes of a compact weight's groups, before its tables."""
    return out_features * in_features // _COMPACT_GROUP * _COMPACT_GROUP_BYTES


def to_compact(weight: torch.Tensor, block_rows: int) -> CompactWeight:
    """A bf16 [out, in] weight in _kernels.c's compact row blocks of `block_rows` rows: 12 bits a weight where
    every weight's top byte is one of its block's 16 most frequent, 6 bytes more for those that are not.
    Lossless: the kernel decodes the very bytes of to_row_blocks(weight, block_rows). Encoded by _kernels.c in
    two passes over the weight (tables, then bytes), ~0.5 s a GB."""
    if weight.dtype != torch.bfloat16:
        raise ValueError(f"the compact layout holds bfloat16 weights, not {weight.dtype}")
    module = _module()
    plain = weight.detach().contiguous()
    out_features, in_features = plain.shape
    blocks = out_features // block_rows
    tables = torch.empty(blocks, COMPACT_CODES, dtype=torch.uint8)
    starts = torch.empty(blocks + 1, dtype=torch.int32)
    patches = module.compact_tables(
        plain.data_ptr(), out_features, in_features, block_rows, tables.data_ptr(), starts.data_ptr()
    )
    data_bytes = _compact_data_bytes(out_features, in_features)
    data = torch.empty(data_bytes + tables.numel() + starts.numel() * 4 + patches * 6, dtype=torch.uint8)
    tables_end = data_bytes + tables.numel()
    data[data_bytes:tables_end] = tables.view(-1)
    data[tables_end : tables_end + starts.numel() * 4] = starts.view(torch.uint8)
    module.compact_fill(plain.data_ptr(), out_features, in_features, block_rows, data.data_ptr())
    return CompactWeight(data, out_features, in_features, block_rows)


def vnni_fits(weight: torch.Tensor) -> bool:
    """Whether a [out, in] weight can take the VNNI layout (out a multiple of 64, in of 16)."""
    out_features, in_features = weight.shape
    return out_features % 64 == 0 and in_features % 16 == 0


def to_vnni_blocks(weight: torch.Tensor, form: VnniForm) -> torch.Tensor:
    """The [out, in] int8 weight in the VNNI layout for `form`: blocks of form.block_rows rows, each the
    in / 4 groups of 4 columns in order, a group holding its block's rows' 4 bytes one row after another."""
    out_features, in_features = weight.shape
    rows = form.block_rows
    blocks = weight.reshape(out_features // rows, rows, in_features // 4, 4)
    return blocks.permute(0, 2, 1, 3).contiguous().view(out_features, in_features)


def vnni_row_sums(weight: torch.Tensor) -> torch.Tensor:
    """Each row's sum of an int8 [out, in] weight (int32): the VNNI layout's kernel multiplies activation
    bytes offset by their row's zero point, and zero point x row sum takes the offset's products back out."""
    return weight.to(torch.int32).sum(dim=1, dtype=torch.int32)


def untile_into(out: torch.Tensor, tiled_weight: torch.Tensor, start: int, stop: int) -> None:
    """Rows start .. stop-1 (whole tiles) of a tiled bfloat16 weight into `out`, float32 [rows, in]."""
    if tiled_weight.dtype != torch.bfloat16 or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("untile_into reads tiled bfloat16 into contiguous float32")
    _module().untile(tiled_weight.data_ptr(), start, stop, tiled_weight.shape[1], out.data_ptr())


class LinearKernel:
    """x @ W^T (* scale per output) (+ bias) for one weight, by _kernels.c: W tiled (bfloat16, or int8 with a
    float32 `scale`) or a bfloat16 weight in oneDNN's packed layout (`layout` ONEDNN: as oneDNN's opaque
    tensor, or a plain one holding those bytes), or an int8 one in the VNNI layout, against x quantized to
    unsigned bytes per row on the way in (summed in int32, exactly; `vnni` the VnniForm the weight was laid
    out for); x in float32 or bfloat16, the output in x's dtype, summed in float32 and rounded once, after
    BLOOM's tanh GELU when `gelu` (applied to the float32 result, as oneDNN's post-op does).

    The call's arguments are worked out once per weight: found per call (the packed weight's address through
    oneDNN, the dtype codes, the checks) they cost ~7 us of Python, six times the product of a decode row
    with a small Linear, and a bloom-560m decode step makes 97 such calls per rank.
    """

    def __init__(
        self,
        weight: torch.Tensor | CompactWeight,
        bias: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        layout: int = TILED,
        gelu: bool = False,
        row_sums: torch.Tensor | None = None,
        vnni: VnniForm | None = None,
        block_rows: int = ONEDNN_BLOCK_ROWS,
    ) -> None:
        """`row_sums` (int32 [out], vnni_row_sums) and `vnni`: the VNNI layout's, which quantizes x by row;
        `block_rows`: the ONEDNN layout's (ONEDNN_BLOCK_ROWS, or AMX_BLOCK_ROWS as oneDNN packs for AMX). A
        CompactWeight is in the ONEDNN layout's blocks, of its own block rows."""
        module = _module()
        if module is None:
            raise RuntimeError(
                "bloomduo's native kernels were not built: reinstall bloomduo with a C compiler"
            )
        if bias is not None and not bias.is_contiguous():
            raise ValueError("bias must be contiguous")
        if isinstance(weight, CompactWeight):
            self.out_features, self.in_features = weight.out_features, weight.in_features
            layout, block_rows, weight = ONEDNN, weight.block_rows, weight.data
        else:
            self.out_features, self.in_features = weight.shape
        if not (layout == VNNI) == (row_sums is not None) == (vnni is not None):
            raise ValueError("the VNNI layout, and it alone, takes the weight's row sums and its VnniForm")
        self._tensors = (weight, bias, scale, row_sums)  # held: the addresses below point into them
        self.rebase()
        self._bias_dtype = None if bias is None else bias.dtype
        self._weight_code = _DTYPE_CODES[weight.dtype]
        self._layout, self._gelu = layout, int(gelu)
        # levels (0 off the VNNI layout), block rows (0 off the VNNI and ONEDNN layouts)
        self._blocking = tuple(vnni) if vnni is not None else (0, block_rows if layout == ONEDNN else 0)
        self._linear = module.linear

    def rebase(self) -> None:
        """Take the tensors' addresses (again, after host_memory.gather moved them)."""
        weight, bias, scale, row_sums = self._tensors
        # oneDNN's packed weights are opaque tensors; their bytes are found through oneDNN's own accessor
        self._weight = torch.ops.mkldnn.data_ptr(weight) if weight.is_mkldnn else weight.data_ptr()
        self._scale = 0 if scale is None else scale.data_ptr()
        self._bias = 0 if bias is None else bias.data_ptr()
        self._row_sums = 0 if row_sums is None else row_sums.data_ptr()

    def _check_bias(self, dtype: torch.dtype) -> None:
        if self._bias_dtype not in (None, dtype):
            raise ValueError(f"bias must be {dtype}, got {self._bias_dtype}")

    def record(self, dtype: torch.dtype) -> tuple[int, ...]:
        """What _kernels.c's blocks read of this Linear for activations of `dtype` (its LinearRecord: w,
        scale, bias, row_sums, N, K, w_dtype, layout, gelu, levels, block_rows)."""
        self._check_bias(dtype)
        return (
            self._weight,
            self._scale,
            self._bias,
            self._row_sums,
            self.out_features,
            self.in_features,
            self._weight_code,
            self._layout,
            self._gelu,
            *self._blocking,
        )

    def __call__(self, x: torch.Tensor, isa: int | None = None) -> torch.Tensor:
        isa = best_isa() if isa is None else isa
        self._check_bias(x.dtype)
        rows = x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype)
        code = _DTYPE_CODES[x.dtype]
        self._linear(
            rows.data_ptr(),
            self._weight,
            self._scale,
            self._bias,
            out.data_ptr(),
            self._row_sums,
            rows.shape[0],
            self.out_features,
            self.in_features,
            code,
            self._weight_code,
            code,
            isa,
            self._layout,
            self._gelu,
            *self._blocking,
        )
        return out.view(*x.shape[:-1], self.out_features)


def rebase_kernels(model: torch.nn.Module) -> None:
    """Every LinearKernel a module of `model` holds takes its tensors' addresses again."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, LinearKernel):
                value.rebase()


def linear(
    x: torch.Tensor,
    tiled_weight: torch.Tensor | CompactWeight,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    isa: int | None = None,
    layout: int = TILED,
    gelu: bool = False,
    row_sums: torch.Tensor | None = None,
    vnni: VnniForm | None = None,
    block_rows: int = ONEDNN_BLOCK_ROWS,
) -> torch.Tensor:
    """One call of LinearKernel(tiled_weight, ...) on x, for calls that come once per weight."""
    return LinearKernel(tiled_weight, bias, scale, layout, gelu, row_sums, vnni, block_rows)(x, isa)


def _kernel_dtypes(float32: bool) -> tuple[torch.dtype, ...]:
    """What attends and summarizes take: bfloat16, and float32 where the caller opts in."""
    return (torch.bfloat16, torch.float32) if float32 else (torch.bfloat16,)


def attends(q: torch.Tensor, bias: torch.Tensor, float32: bool = False) -> bool:
    """Whether one_query_attention takes these queries: bfloat16 (float32 too, if `float32`) on a CPU with a
    vector ISA, head_dim a multiple of 16 (every BLOOM's is). float32 is opt-in: workers held to transformers'
    float32 numbers keep torch's attention, whose sums run in another order."""
    return (
        q.device.type == "cpu"
        and q.dtype == bias.dtype
        and q.dtype in _kernel_dtypes(float32)
        and best_isa() >= AVX2
        and q.shape[-1] % 16 == 0
        and q.shape[-1] <= 512
    )


def attends_prompts(q: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether prompt_attention takes these whole prompts' queries: as `attends`. Against SDPA, a bloom-560m
    rank's layer (8 heads): AVX512 2.0 against 3.4 ms for 24 layers of a 32-token prompt; AVX2 (Zen 3), four
    rows of a prompt at a time, 0.08 against 0.10 ms a layer at 32 tokens and 6.6 against 9.5 at 512."""
    return attends(q, bias)


def one_query_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    slots: torch.Tensor | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    isa: int | None = None,
) -> torch.Tensor:
    """softmax(q.k * scale + bias) . v for one query per sequence, bfloat16 (or float32, without its
    roundings), in _kernels.c (at `isa`, the best one by default).

    q [S, heads, head_dim] (any row and head strides); keys and values the cache's views [slots, heads,
    length, head_dim] (rows of head_dim contiguous); bias [slots, heads, 1, length]; `slots` the cache slot
    of each query (None: query i sits in slot i). `new_kv` (keys, values, positions): each query's own key
    and value, laid out like q (the fused projection's views), stored into the cache at its position before
    it attends, in the same pass (a scatter per layer otherwise). Returns [S, heads, head_dim]."""
    new_keys = new_values = positions = None
    if new_kv is not None:
        new_keys, new_values, positions = new_kv
        positions = positions.to(torch.int64).contiguous()
    slots = None if slots is None else slots.to(torch.int64).contiguous()
    return _attend(q, keys, values, bias, scale, slots, new_keys, new_values, positions, isa=isa)


def prompt_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    slots: torch.Tensor,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    isa: int | None = None,
) -> torch.Tensor:
    """one_query_attention for every row of whole prompts of one length n, each row attending to its own
    prompt's keys up to itself, with the same roundings: q [prompts * n, heads, head_dim] (any row and head
    strides); keys and values the cache's views [slots, heads, n, head_dim]; bias [heads, n, n] (causal
    ALiBi; only each row's first keys are read); `slots` each prompt's cache slot (int64). `new_kv` (keys,
    values): the prompts' own, laid out like q, stored into the cache row by row before each row attends
    (what KVCache.write_prompts does); None: the cache holds them. At `isa` (the best one by default). Returns
    [prompts * n, heads, head_dim]."""
    rows, heads, n = q.shape[0], q.shape[1], keys.shape[2]
    if tuple(bias.shape) != (heads, n, n) or slots.numel() * n != rows:
        shape = tuple(bias.shape)
        raise ValueError(f"{rows} query rows, bias {shape}: not prompts of {n} tokens and their bias")
    new_keys, new_values = (None, None) if new_kv is None else new_kv
    return _attend(
        q, keys, values, bias, scale, slots.to(torch.int64).contiguous(), new_keys, new_values, None, n, isa
    )


def _attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    slots: torch.Tensor | None,
    new_keys: torch.Tensor | None,
    new_values: torch.Tensor | None,
    positions: torch.Tensor | None,
    prompt_length: int = 0,
    isa: int | None = None,
) -> torch.Tensor:
    """_kernels.c's attend for one_query_attention (prompt_length 0) and prompt_attention: checks the layouts
    it reads, and returns the output [rows, heads, head_dim]."""
    rows, heads, head_dim = q.shape
    dtypes = {t.dtype for t in (q, keys, values, bias, new_keys, new_values) if t is not None}
    if len(dtypes) != 1 or q.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError("the attention kernel takes bfloat16 or float32 tensors, all of one dtype")
    if q.stride(2) != 1 or keys.stride()[2:] != (head_dim, 1) or keys.stride() != values.stride():
        raise ValueError("the attention kernel reads rows of head_dim contiguous values from the cache")
    if any(t is not None and t.stride() != q.stride() for t in (new_keys, new_values)):
        raise ValueError("the attention kernel takes new keys and values laid out like the queries")
    bias = bias.contiguous()
    out = torch.empty(rows, heads, head_dim, dtype=q.dtype)
    _module().attend(
        q.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        bias.data_ptr(),
        0 if slots is None else slots.data_ptr(),
        out.data_ptr(),
        rows,
        heads,
        keys.shape[2],
        head_dim,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        float(scale),
        best_isa() if isa is None else isa,
        *(0 if t is None else t.data_ptr() for t in (new_keys, new_values, positions)),
        prompt_length,
        _DTYPE_CODES[q.dtype],
    )
    return out


def summarizes(rows: torch.Tensor, float32: bool = False) -> bool:
    """Whether `summarize` takes these logits: bfloat16 (float32 too, if `float32`) [rows, columns] on a CPU
    with a vector ISA, columns contiguous. float32 is opt-in, as for `attends`: workers held to transformers'
    float32 logprobs keep torch's."""
    return (
        rows.device.type == "cpu"
        and rows.dtype in _kernel_dtypes(float32)
        and rows.dim() == 2
        and rows.stride(1) == 1
        and rows.shape[1] > 0
        and best_isa() >= AVX2
    )


def summarize(rows: torch.Tensor, isa: int | None = None) -> RowSummary:
    """bloomduo.core.logprobs.summarize of bfloat16 or float32 rows [n, columns] (columns contiguous) in
    _kernels.c: two passes over the rows and no float32 copy of them. A bloom-560m slice at W = 2 (125440
    columns): 16 rows in 0.8 ms against torch's 4.0, one row 0.06 against 0.26 (AVX512, one thread); in the
    AVX2 form 1.0 against 4.3 and 0.07 against 0.5."""
    count, columns = rows.shape
    best, logsumexp = torch.empty(count), torch.empty(count)
    index = torch.empty(count, dtype=torch.int64)
    _module().summarize(
        rows.data_ptr(),
        count,
        columns,
        rows.stride(0),
        _DTYPE_CODES[rows.dtype],
        best.data_ptr(),
        index.data_ptr(),
        logsumexp.data_ptr(),
        best_isa() if isa is None else isa,
    )
    return RowSummary(best, index, logsumexp)


class SharedSegment(NamedTuple):
    """Where shm_allreduce.py's segment is, for _kernels.c: its address, this rank, the ranks, the first
    slot's offset and the bytes of a slot."""

    address: int
    rank: int
    world_size: int
    data_offset: int
    slot_bytes: int


NO_SEGMENT = SharedSegment(0, 0, 1, 0, 0)
SHM_WAITING, SHM_PUBLISHED, SHM_REDUCED = 0, 1, 2  # how far shm_all_reduce took a call


def shm_all_reduce(segment: SharedSegment, tensor: torch.Tensor) -> int:
    """_kernels.c's fast path of shm_allreduce.py's protocol on `tensor` (summed in place): SHM_REDUCED, or
    how far it got before a peer kept it waiting past the protocol's yield period, for the Python version to
    finish. SHM_WAITING (nothing done) where it does not run: no kernels, a dtype other than bfloat16 and
    float32, a non-contiguous tensor."""
    module = _module()
    if module is None or tensor.dtype not in (torch.bfloat16, torch.float32) or not tensor.is_contiguous():
        return SHM_WAITING
    return module.shm_all_reduce(*segment, tensor.data_ptr(), tensor.numel(), _DTYPE_CODES[tensor.dtype])


def blocks(
    *operands: int | float,
    dtype: torch.dtype,
    residual_from_normed: bool,
    segment: SharedSegment = NO_SEGMENT,
    all_reduce=None,
    isa: int | None = None,
) -> None:
    """_kernels.c's blocks: every block of a step of one-token rows or of whole prompts of one length in one
    call (fused_blocks.py lays out `operands`: the LayerRecords' address, their count, rows, hidden size, the
    buffers, the cache and the attention's operands, prompt length, scale and eps), activations of `dtype`,
    `all_reduce` a callable summing the output buffer over the ranks in place (None for one rank), `segment`
    the ranks' shared memory (tried first, in C; the all-reduce finishes what it began). Runs at `isa`, the
    best one by default. The hidden size must be a multiple of NORM_LANES."""
    isa = best_isa() if isa is None else isa
    _module().blocks(*operands, _DTYPE_CODES[dtype], isa, int(residual_from_normed), *segment, all_reduce)
