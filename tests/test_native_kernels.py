"""bloomduo's own CPU matrix kernels (shard_worker/_kernels.c through shard_worker/native.py).

Every ISA level this CPU runs (scalar always, AVX2, AVX512, AVX512-BF16 where present) against a float64
reference, for bfloat16 and int8 weights, float32 and bfloat16 activations, with and without bias and
scale, at row counts that exercise every row tile; both weight layouts (the kernel's tiles, and oneDNN's
packed one, which the scalar path reads too so that its index arithmetic is tested on every CPU); what a
bad call is told; and that the project's install built the module at all (the fallback when it did not
is tested by hiding it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bloomduo.shard_worker import cpu_kernels, native
from bloomduo.shard_worker.engine import resolve_dtype
from bloomduo.shard_worker.model import alibi_slopes
from bloomduo.shard_worker.quantize import INT8, INT8_DYNAMIC, Int8Linear, describe, per_channel_int8
from bloomduo.shard_worker.step_plan import causal_alibi_bias
from tests._dist_helpers import can_pack

ISAS = [
    isa for isa in (native.SCALAR, native.AVX2, native.AVX512, native.AVX512_BF16) if isa <= native.best_isa()
]
ISA_IDS = [native.ISA_NAMES[isa] for isa in ISAS]


def _onednn_layout(weight: torch.Tensor, block_rows: int = native.ONEDNN_BLOCK_ROWS) -> torch.Tensor:
    """oneDNN's AB16b64a2b blocking of a [N, K] weight (or its 32-row blocks for AMX), made here, as
    _kernels.c documents it."""
    n, k = weight.shape
    # [row block, row, column block, pair, 2]
    blocks = weight.reshape(n // block_rows, block_rows, k // 32, 16, 2)
    return blocks.permute(0, 2, 3, 1, 4).contiguous().view(n, k)


def _reference(x, weight, bias, scale) -> torch.Tensor:
    out = x.double() @ weight.double().T
    if scale is not None:
        out = out * scale.double()
    return out + bias.double() if bias is not None else out


def _within_one_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """|got - want| within the output dtype's rounding of the largest output, plus float32 summation."""
    scale = want.abs().max().item()
    eps = torch.finfo(got.dtype).eps if got.dtype == torch.bfloat16 else 1e-5
    return (got.double() - want).abs().max().item() <= eps * scale


def test_the_install_built_the_native_kernels():
    """scripts/test.sh installs the project as a user would: its C kernels must come with it here."""
    assert native.available(), "bloomduo.shard_worker._kernels is missing: reinstall with a C compiler"
    assert native.best_isa() >= native.AVX2  # every x86-64 machine CI runs on has AVX2


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 5, 7, 17])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
def test_the_tiled_kernel_computes_x_times_w_transposed(isa, weights, activations, rows, bias, gelu):
    generator = torch.Generator().manual_seed(rows)
    n, k = 72, 160  # several tiles of 4 rows and chunks of 32 columns
    x = torch.randn(rows, k, generator=generator).to(activations)
    if weights == "int8":
        weight, scale = per_channel_int8(torch.randn(n, k, generator=generator))
    else:
        weight, scale = torch.randn(n, k, generator=generator).to(torch.bfloat16), None
    b = torch.randn(n, generator=generator).to(activations) if bias else None
    got = native.linear(x, native.to_tiles(weight), b, scale, isa=isa, gelu=gelu)
    assert got.dtype == activations and got.shape == (rows, n)
    want = _reference(x, weight, b, scale)
    assert _within_one_rounding(got, torch.nn.functional.gelu(want, approximate="tanh") if gelu else want)


# 67: int8 row blocks are widened once, not per pass, on AVX512-BF16 (and from 7 rows go through AMX tiles
# where the CPU has them: 7, 13 and 16 rows one tile of x, 67 five, the last partial); below it (FMAs alone):
# bf16 up to 3 rows by whole blocks a row at a time, more by strips of 16 rows in groups of 3 to 6 (7: 4 + 3,
# 16: 6 + 5 + 5);
# int8 (integer products, test_avx2_int8_row_blocks_...) up to 2 rows by whole blocks, more by strips of 16
ROW_BLOCK_READERS = [
    pytest.param(isa, weights, id=f"{native.ISA_NAMES[isa]}-{weights}")
    for isa in ISAS
    for weights in ("bfloat16", "int8")
]


@pytest.mark.parametrize(("isa", "weights"), ROW_BLOCK_READERS)
@pytest.mark.parametrize("rows", [1, 2, 3, 6, 7, 13, 16, 67])
@pytest.mark.parametrize("gelu", [False, True])
def test_the_onednn_layout_is_read_as_documented(isa, weights, rows, gelu):
    generator = torch.Generator().manual_seed(rows)
    if weights == "int8":
        weight, scale = per_channel_int8(torch.randn(128, 96, generator=generator))
        assert torch.equal(native.to_row_blocks(weight), _onednn_layout(weight))
    else:
        weight, scale = torch.randn(128, 96, generator=generator).to(torch.bfloat16), None
    bias = torch.randn(128, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, 96, generator=generator).to(torch.bfloat16)
    laid_out = _onednn_layout(weight)
    got = native.linear(x, laid_out, bias, scale, isa=isa, layout=native.ONEDNN, gelu=gelu)
    want = _reference(x, weight, bias, scale)
    if gelu:  # BLOOM's tanh GELU of the float32 sum, before the one rounding
        want = torch.nn.functional.gelu(want, approximate="tanh")
    assert _within_one_rounding(got, want)


WORD_LEVELS, WORD_RUN_COLUMNS = 32767, 512


def _words_reference(x, weight, scale, bias) -> torch.Tensor:
    """What the AVX2 int8 row blocks define, in torch: each row of x rounded to 16-bit integers (float32
    arithmetic, half to even; the step its largest |x| / 32767), exact integer sums over runs of 512 columns,
    each run's sum to float32 and added in order, times the row's step, then the weight row's scale, plus the
    bias, one rounding."""
    rows = x.float()
    top = rows.abs().amax(dim=1, keepdim=True)
    levels = torch.full_like(top, float(WORD_LEVELS))
    words = torch.round(rows * torch.where(top > 0, levels / top, torch.zeros_like(top))).long()
    sums = torch.zeros(rows.shape[0], weight.shape[0])
    for k0 in range(0, rows.shape[1], WORD_RUN_COLUMNS):
        run = words[:, k0 : k0 + WORD_RUN_COLUMNS] @ weight[:, k0 : k0 + WORD_RUN_COLUMNS].long().T
        assert run.abs().max() < 2**31  # what the kernel's int32 lanes hold
        sums = sums + run.float()
    out = sums * (top / levels) * scale[None, :]
    return (out if bias is None else out + bias.float()).to(x.dtype)


@pytest.mark.parametrize("isa", [isa for isa in ISAS if isa in (native.AVX2, native.AVX512)])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 16, 67])
@pytest.mark.parametrize("bias", [True, False])
def test_avx2_int8_row_blocks_sum_16_bit_rows_exactly_alone_or_batched(isa, rows, bias):
    """Weight-only int8 where bf16 is emulated (AVX2, and AVX512 without BF16, which runs the AVX2 form): bit
    for bit against its definition, so a row's output is the same alone or in any batch. K = 1088 is two runs
    of 512 columns and a shorter one; row 0 against weight row 0 (all 127) puts the largest sum a run's int32
    lanes may hold (512 x 127 x 32767, just below 2^31) in one run."""
    generator = torch.Generator().manual_seed(rows)
    columns = 1088
    weight, scale = per_channel_int8(torch.randn(128, columns, generator=generator))  # two 64-row blocks
    weight[0] = 127
    x = torch.randn(rows, columns, generator=generator).to(torch.bfloat16)
    x[0] = 3.0
    if rows > 2:
        x[1] = 0.0  # a row of zeros has no step to divide by
        x[2, 7] = -40.0  # an outlier feature sets its row's step
    b = torch.randn(128, generator=generator).to(torch.bfloat16) if bias else None
    laid_out = native.to_row_blocks(weight)
    got = native.linear(x, laid_out, b, scale, isa=isa, layout=native.ONEDNN)
    assert torch.equal(got, _words_reference(x, weight, scale, b))
    assert _within_one_rounding(got, _reference(x, weight, b, scale))
    if rows > 1:  # a NaN poisons its own row's outputs, as a float sum would, and no other
        x[-1, 3] = float("nan")
        poisoned = native.linear(x, laid_out, b, scale, isa=isa, layout=native.ONEDNN)
        assert poisoned[-1].isnan().all() and torch.equal(poisoned[:-1], got[:-1])


@pytest.mark.parametrize("isa", [isa for isa in ISAS if isa in (native.SCALAR, native.AVX512_BF16)])
@pytest.mark.parametrize("rows", [1, 2, 6, 7, 67])
@pytest.mark.parametrize("gelu", [False, True])
def test_the_amx_blocking_of_the_onednn_layout_is_read_as_documented(isa, rows, gelu):
    """oneDNN packs for AMX in blocks of 32 rows: the same bytes' order, half the rows a block (read by AMX
    tiles from 3 rows where the CPU has them: 6 and 7 rows one partial tile of x, 67 two pairs and a part)."""
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=generator).to(torch.bfloat16)  # three blocks of 32 rows
    bias = torch.randn(96, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
    laid_out = _onednn_layout(weight, native.AMX_BLOCK_ROWS)
    got = native.linear(
        x, laid_out, bias, isa=isa, layout=native.ONEDNN, gelu=gelu, block_rows=native.AMX_BLOCK_ROWS
    )
    want = _reference(x, weight, bias, None)
    if gelu:
        want = torch.nn.functional.gelu(want, approximate="tanh")
    assert _within_one_rounding(got, want)


def test_bad_row_block_calls_are_told_what_is_wrong():
    weight = torch.randn(96, 64).to(torch.bfloat16)
    x = torch.randn(1, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="blocks hold 64 rows, or 32"):
        native.linear(x, weight, None, isa=native.SCALAR, layout=native.ONEDNN, block_rows=48)
    if native.AVX2 in ISAS:
        with pytest.raises(ValueError, match=r"32-row blocks .* AVX512-BF16 and scalar"):
            native.linear(x, weight, None, isa=native.AVX2, layout=native.ONEDNN, block_rows=32)
    int8, scale = per_channel_int8(torch.randn(96, 64))
    with pytest.raises(ValueError, match="32-row blocks"):
        native.linear(x, int8, None, scale, isa=native.SCALAR, layout=native.ONEDNN, block_rows=32)


def _weights_with_tails(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """bf16 weights as a trained matrix has them (most |w| within a few binades) plus some far outside them
    (tiny, huge, zeros of both signs), which no block's 16-entry table holds: the compact layout's patches."""
    weight = torch.randn(rows, columns, generator=generator) * 0.02
    tails = torch.tensor([1e-30, -3e-25, 0.0, -0.0, 5.0, -7e3, 2e-9])
    places = torch.randint(0, rows * columns, (3 * len(tails),), generator=generator)
    weight.view(-1)[places] = tails.repeat(3)
    return weight.to(torch.bfloat16)


# (isa, block_rows): every ISA reads 64-row blocks (AVX2 and plain AVX512 with the AVX2 FMA form); the 32-row
# blocks of oneDNN's AMX packing are read by the scalar and AVX512-BF16 paths only
COMPACT_READS = [
    (isa, block_rows)
    for isa in ISAS
    for block_rows in (native.AMX_BLOCK_ROWS, native.ONEDNN_BLOCK_ROWS)
    if block_rows == native.ONEDNN_BLOCK_ROWS or isa in (native.SCALAR, native.AVX512_BF16)
]


@pytest.mark.parametrize(
    ("isa", "block_rows"), COMPACT_READS, ids=[f"{native.ISA_NAMES[i]}-{b}" for i, b in COMPACT_READS]
)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 16, 33])
@pytest.mark.parametrize("gelu", [False, True])
def test_compact_blocks_give_the_plain_blocks_products_to_the_bit(isa, block_rows, rows, gelu):
    """bf16 weights in 12 bits (+ patches) are the same weights: every path reading them (the scalar one on
    every CPU; AVX512-BF16's registers up to 6 rows, or 2 where AMX's tiles take over, decoded blocks
    for more than 6 rows of 64-row blocks; the AVX2 form's registers for one row, decoded blocks for more)
    gives the plain row blocks' output bit for bit; K = 640 is five of AMX's stretches of 128 columns."""
    generator = torch.Generator().manual_seed(rows)
    columns = 64 if isa == native.SCALAR else 640
    weight = _weights_with_tails(128, columns, generator)
    bias = torch.randn(128, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, columns, generator=generator).to(torch.bfloat16)
    compact = native.to_compact(weight, block_rows)
    assert compact.patches > 0
    got = native.linear(x, compact, bias, isa=isa, gelu=gelu)
    want = native.linear(
        x,
        native.to_row_blocks(weight, block_rows),
        bias,
        isa=isa,
        layout=native.ONEDNN,
        gelu=gelu,
        block_rows=block_rows,
    )
    assert torch.equal(got, want)
    reference = _reference(x, weight, bias, None)
    if gelu:
        reference = torch.nn.functional.gelu(reference, approximate="tanh")
    assert _within_one_rounding(got, reference)


def test_a_compact_weight_takes_three_quarters_of_the_bytes_and_patches_only_what_its_tables_miss():
    generator = torch.Generator().manual_seed(0)
    plain = (torch.randn(256, 1024, generator=generator) * 0.02).to(torch.bfloat16)
    # a weight whose every block has at most 16 top bytes: no patch, the bytes 12 bits a weight plus tables
    few = torch.tensor([0.5, -0.25, 0.125, 1.0]).repeat(256 * 256).view(256, 1024).to(torch.bfloat16)
    for block_rows in (native.AMX_BLOCK_ROWS, native.ONEDNN_BLOCK_ROWS):
        exact = native.to_compact(few, block_rows)
        blocks = 256 // block_rows
        assert exact.patches == 0
        assert exact.data.numel() == 256 * 1024 * 3 // 2 + blocks * native.COMPACT_CODES + 4 * (blocks + 1)
        usual = native.to_compact(plain, block_rows)
        # N(0, 0.02): the 16 likeliest top bytes hold all but ~1e-4 of the weights, 6 bytes each outside them
        assert 0 < usual.patches < 1e-3 * plain.numel()
        assert usual.data.numel() < 0.76 * plain.numel() * 2
    with pytest.raises(ValueError, match="holds bfloat16 weights"):
        native.to_compact(plain.float(), native.AMX_BLOCK_ROWS)


def test_bad_compact_calls_are_told_what_is_wrong():
    compact = native.to_compact(torch.randn(64, 64).to(torch.bfloat16), native.ONEDNN_BLOCK_ROWS)
    x = torch.randn(1, 64).to(torch.bfloat16)
    if native.AVX2 in ISAS:
        amx_blocks = native.to_compact(torch.randn(64, 64).to(torch.bfloat16), native.AMX_BLOCK_ROWS)
        with pytest.raises(ValueError, match=r"32-row blocks .* by the AVX512-BF16 and scalar paths"):
            native.linear(x, amx_blocks, isa=native.AVX2)
    with pytest.raises(ValueError, match="read for bfloat16 x"):
        native.linear(x.float(), compact, isa=native.SCALAR)
    with pytest.raises(ValueError, match="compact blocks hold 32 or 64 rows"):
        native.to_compact(torch.randn(48, 64).to(torch.bfloat16), native.AMX_BLOCK_ROWS)


def _quantized_reference(x, weight, scale, bias, levels) -> torch.Tensor:
    """What the VNNI layout's kernel defines, in torch: each row of x to `levels` steps spanning [min(x, 0),
    max(x, 0)] (float32 arithmetic, rounded half to even) offset by the byte that holds 0, exact integer
    sums of (byte - zero) x weight, then float32 scaling, bias and one rounding to x's dtype."""
    rows = x.float()
    span = rows.amax(dim=1, keepdim=True).clamp_min(0) - rows.amin(dim=1, keepdim=True).clamp_max(0)
    inverse = torch.where(span > 0, torch.full_like(span, float(levels)) / span, torch.zeros_like(span))
    zero = torch.round(-rows.amin(dim=1, keepdim=True).clamp_max(0) * inverse)
    steps = (torch.round(rows * inverse) + zero).clamp(0, levels) - zero
    sums = (steps.double() @ weight.double().T).float()  # exact: well below 2^24 here
    out = sums * ((span / levels) * scale[None, :])
    return (out if bias is None else out + bias.float()).to(x.dtype)


def _vnni_forms() -> list:
    """(isa, form) of every form of the VNNI layout's kernel: the scalar one reading both on every CPU, the
    AVX2 form wherever AVX2 runs, VPDPBUSD (with 8- and 7-bit rows) where the CPU has AVX512-VNNI."""
    vpdpbusd = pytest.mark.skipif(
        native.vnni_form() != native.VPDPBUSD_FORM,
        reason="needs AVX512-VNNI (and an AVX512 level allowed): the AVX2 form runs here",
    )
    amx = pytest.mark.skipif(
        not native.vnni_amx(),
        reason="needs AMX-INT8 (a Xeon with AMX, a compiler that builds it, Linux letting a process use it)",
    )
    return [
        pytest.param(native.SCALAR, native.VPDPBUSD_FORM, id="scalar-vpdpbusd-form"),
        pytest.param(native.SCALAR, native.AVX2_FORM, id="scalar-avx2-form"),
        pytest.param(native.AVX2, native.AVX2_FORM, id="avx2"),
        pytest.param(native.AVX512, native.VPDPBUSD_FORM, id="avx512-vnni", marks=vpdpbusd),
        pytest.param(native.AVX512, native.VnniForm(127, 64), id="avx512-vnni-7bit", marks=vpdpbusd),
        pytest.param(native.AVX512_BF16, native.VPDPBUSD_FORM, id="amx-int8", marks=amx),
    ]


@pytest.mark.parametrize(("isa", "form"), _vnni_forms())
@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 40])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("columns", [96, 128])
def test_the_vnni_layout_quantizes_each_row_and_sums_its_bytes_exactly(
    isa, form, activations, rows, bias, columns
):
    """int8-dynamic's kernel, bit for bit against its definition; the scalar form reads the layout's index
    arithmetic on every CPU, the AVX2 form on every CPU CI runs on, the VPDPBUSD form where the CPU has
    AVX512-VNNI, AMX-INT8 where the CPU has it (from 3 rows, K a multiple of 64: 128 columns; 96 take
    VPDPBUSD; 40 rows are three tiles of x, the last padded)."""
    generator = torch.Generator().manual_seed(rows)
    weight, scale = per_channel_int8(torch.randn(192, columns, generator=generator))
    x = torch.randn(rows, columns, generator=generator).to(activations)
    x[0, 5] = 7.0  # an outlier feature sets its row's step
    if rows > 1:
        x[1] = 0.0  # a row of zeros has no step to divide by
    if rows > 2:
        x[2] = x[2].abs() - 0.05  # a GELU's output: its zero point near the bottom of the bytes
    if rows > 3:
        x[3, :] = -x[3].abs()  # all below zero: the zero point at the top byte
    weight[:, :4] = 127  # the largest pair sums VPMADDUBSW forms (127 x 127 x 2 at the top byte)
    weight[7, 4:8] = -127
    b = torch.randn(192, generator=generator).to(activations) if bias else None
    row_sums = native.vnni_row_sums(weight)
    blocks = native.to_vnni_blocks(weight, form)
    got = native.linear(x, blocks, b, scale, isa, native.VNNI, row_sums=row_sums, vnni=form)
    want = _quantized_reference(x, weight, scale, b, form.levels)
    assert got.dtype == activations and torch.equal(got, want)
    gelu = native.linear(x, blocks, b, scale, isa, native.VNNI, True, row_sums, form)
    want = _quantized_reference(x.float(), weight, scale, b, form.levels)
    assert _within_one_rounding(gelu, torch.nn.functional.gelu(want, approximate="tanh").double())


def test_amx_int8_runs_wherever_the_cpu_has_it():
    """The AMX-INT8 form is not quietly lost (an old compiler, a refused permission): where the CPU lists
    AMX-INT8 and the best level is AVX512-BF16, the kernel must run it, and say so in the worker's kernels."""
    flags = cpu_kernels.cpu_flags()
    expected = {"amx_int8", "amx_tile", "avx512_vnni"} <= flags and native.best_isa() == native.AVX512_BF16
    assert native.vnni_amx() == expected
    weight, scale = per_channel_int8(torch.randn(128, 128))
    linear = Int8Linear(weight, scale, None, INT8_DYNAMIC, torch.bfloat16)
    said = describe(nn.Sequential(linear))
    assert ("AMX from 3 rows" in said) == (expected and linear.kernel == "native vnni"), said


def test_bad_vnni_calls_are_told_what_is_wrong():
    weight, scale = per_channel_int8(torch.randn(64, 48))
    x = torch.randn(2, 48).to(torch.bfloat16)
    row_sums = native.vnni_row_sums(weight)

    def call(isa: int, form: native.VnniForm, sums: torch.Tensor | None = row_sums) -> None:
        blocks = native.to_vnni_blocks(weight, form) if form.block_rows in (32, 64) else weight
        native.linear(x, blocks, None, scale, isa, native.VNNI, row_sums=sums, vnni=form)

    with pytest.raises(ValueError, match="takes the weight's row sums and its VnniForm"):
        call(native.SCALAR, native.VPDPBUSD_FORM, sums=None)
    with pytest.raises(ValueError, match="at most 127 levels"):  # VPMADDUBSW would saturate at 8 bits
        call(native.AVX2, native.VPDPBUSD_FORM)
    with pytest.raises(ValueError, match=r"1 \.\. 255 levels"):
        call(native.SCALAR, native.VnniForm(256, 64))
    with pytest.raises(ValueError, match="blocks hold 64 or 32 rows"):
        call(native.SCALAR, native.VnniForm(127, 16))
    if native.vnni_form() == native.VPDPBUSD_FORM:
        with pytest.raises(ValueError, match="reads blocks of 64 rows"):
            call(native.AVX512, native.AVX2_FORM)
    narrow, narrow_scale = per_channel_int8(torch.randn(32, 48))
    with pytest.raises(ValueError, match="N a multiple of 64"):
        native.linear(
            x,
            narrow,
            None,
            narrow_scale,
            native.SCALAR,
            native.VNNI,
            row_sums=native.vnni_row_sums(narrow),
            vnni=native.AVX2_FORM,
        )
    assert native.vnni_fits(weight) and not native.vnni_fits(narrow) and not native.vnni_fits(weight[:, :40])


@pytest.mark.skipif(
    not (can_pack() and native.reads_onednn_packing()),
    reason="needs oneDNN packing bfloat16 in a layout the kernel reads, with AVX512-BF16 (this CPU or "
    "torch build packs no bfloat16, or packs it another way: the native path is then off)",
)
def test_onednn_packs_the_layout_the_kernel_reads():
    """The layout made above is the one oneDNN really makes (64-row blocks for AVX512-BF16, 32 for AMX):
    the kernel on oneDNN's own bytes."""
    weight = torch.randn(256, 1024).to(torch.bfloat16)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    block_rows = native.onednn_block_rows(packed)
    assert block_rows in (native.ONEDNN_BLOCK_ROWS, native.AMX_BLOCK_ROWS)
    x = torch.randn(3, 1024).to(torch.bfloat16)
    got = native.linear(x, packed, None, layout=native.ONEDNN, block_rows=block_rows)
    want = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    assert cpu_kernels._error(got, want, torch.bfloat16) <= cpu_kernels.TOLERANCE_EPS
    laid_out = _onednn_layout(weight, block_rows)
    assert torch.equal(native.linear(x, laid_out, None, layout=native.ONEDNN, block_rows=block_rows), got)


@pytest.mark.skipif(
    not (can_pack() and native.reads_onednn_packing()),
    reason="needs oneDNN packing bfloat16 in a layout the kernel reads, with AVX512-BF16",
)
def test_a_weight_every_blocking_reads_alike_takes_the_one_onednn_packs_in():
    """An all-zero weight (a rank's LM head slice past a small tokenizer's vocabulary) gives oneDNN's product
    read with any blocking: it must still be read as oneDNN packed it, or AMX's 32-row blocks, read as 64-row
    ones, would never reach the AMX tiles (that rank's 16-row steps took 30 ms longer than its peer's)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(256, 1024, dtype=torch.bfloat16), None)
    assert native.onednn_block_rows(packed) == native.onednn_packing_rows()


def test_a_packed_linear_whose_layout_native_misreads_stays_on_onednn(monkeypatch):
    """A oneDNN build that blocks differently must never reach the native path with wrong numbers."""
    if not can_pack():
        pytest.skip("no oneDNN packed bfloat16 layout on this CPU or torch build")
    linear = nn.Linear(64, 128).to(torch.bfloat16).requires_grad_(False)
    route = cpu_kernels.Route(cpu_kernels.PACKED, ((1, cpu_kernels.NATIVE),))
    monkeypatch.setattr(native, "linear", lambda x, *args, **kwargs: torch.zeros(x.shape[0], 128).bfloat16())
    module = cpu_kernels.PackedLinear(linear, route=route)
    assert module._native == [False]
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert cpu_kernels._error(module(x), linear(x), torch.bfloat16) <= cpu_kernels.TOLERANCE_EPS


def test_what_fits_the_tiles_and_bad_calls_are_told_what_is_wrong():
    weight = torch.arange(8 * 64, dtype=torch.float32).view(8, 64).to(torch.bfloat16)
    assert native.fits(weight) and not native.fits(weight[:6]) and not native.fits(weight[:, :48])
    x = torch.randn(1, 48).to(torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 32"):
        native.linear(x, weight[:, :48].contiguous(), None, isa=native.SCALAR)
    with pytest.raises(ValueError, match="N a multiple of the block's rows"):
        native.linear(
            torch.randn(1, 64).to(torch.bfloat16), weight, None, isa=native.SCALAR, layout=native.ONEDNN
        )


@pytest.mark.parametrize("out_features", [96, 128])  # tiles; row blocks on AVX512-BF16 and AVX2
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_weight_only_runs_natively_and_matches_dequantized_weights(out_features, dtype):
    linear = nn.Linear(256, out_features).to(dtype).requires_grad_(False)
    module = Int8Linear.from_linear(linear, INT8)
    assert module.kernel == "native"
    reads_row_blocks = native.best_isa() in (native.AVX2, native.AVX512_BF16)
    row_blocks = dtype == torch.bfloat16 and reads_row_blocks and out_features % 64 == 0
    assert module.layout == (native.ONEDNN if row_blocks else native.TILED)
    x = torch.randn(5, 256).to(dtype)
    weight, scale = per_channel_int8(linear.weight)
    assert _within_one_rounding(module(x), _reference(x, weight, linear.bias, scale))


def test_without_the_built_module_the_workers_keep_torchs_kernels(monkeypatch):
    monkeypatch.setattr(native, "_module", lambda: None)
    cached = (native.best_isa, native.onednn_packing_rows, native.vnni_form)
    for answer in cached:
        answer.cache_clear()
    try:
        assert not native.available() and native.best_isa() == native.SCALAR
        paths = cpu_kernels.candidate_paths(packing=True)
        assert cpu_kernels.NATIVE not in paths and cpu_kernels.TILED not in paths
        linear = nn.Linear(256, 96).to(torch.bfloat16).requires_grad_(False)
        assert Int8Linear.from_linear(linear, INT8).kernel == "aten int8pack"
        # int8-dynamic falls back to fbgemm, whose GEMM takes float32 activations: `auto` serves float32
        assert not native.runs_vnni()
        dynamic = Int8Linear.from_linear(linear, INT8_DYNAMIC)
        assert dynamic.kernel == "fbgemm" and dynamic.vnni is None
        x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        want = linear(x).float()
        assert (dynamic(x).float() - want).abs().max() <= 0.05 * want.abs().max()  # 8-bit steps, not garbage
        assert resolve_dtype("auto", torch.bfloat16, torch.device("cpu"), INT8_DYNAMIC) == torch.float32
        with pytest.raises(RuntimeError, match="reinstall bloomduo with a C compiler"):
            native.linear(torch.randn(1, 256).bfloat16(), native.to_tiles(linear.weight))
    finally:  # what was answered without the module must not outlive the test
        for answer in cached:
            answer.cache_clear()


def _torch_one_query_attention(q, keys, values, bias, scale):
    """model.py's torch version: scores rounded to bf16, float32 softmax, bf16 probabilities (for bfloat16
    inputs; float32 throughout for float32 ones)."""
    scores = torch.matmul(q[:, :, None], keys.transpose(-1, -2)).float() * scale + bias.float()
    return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)[:, :, 0]


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scattered", [False, True])
def test_one_query_attention_reads_the_cache_in_place_and_rounds_like_torch(isa, dtype, head_dim, scattered):
    generator = torch.Generator().manual_seed(head_dim)
    slots_total, heads, capacity, length = 6, 4, 40, 27
    cache_keys = torch.randn(slots_total, heads, capacity, head_dim, generator=generator).to(dtype)
    cache_values = torch.randn(slots_total, heads, capacity, head_dim, generator=generator).to(dtype)
    keys, values = cache_keys[:, :, :length], cache_values[:, :, :length]  # strided views, as the cache's
    bias = torch.randn(slots_total, heads, 1, length, generator=generator).to(dtype)
    bias[:, :, :, -4:] = torch.finfo(dtype).min  # positions a sequence may not see
    fused = torch.randn(3, heads, 3, head_dim, generator=generator).to(dtype)
    q = fused.unbind(2)[0]  # a strided view of the fused projection, as the model's
    slots = torch.tensor([4, 0, 2]) if scattered else None
    got = native.one_query_attention(q, keys, values, bias, head_dim**-0.5, slots, isa=isa)
    at = slots if scattered else torch.arange(3)
    want = _torch_one_query_attention(q, keys[at], values[at], bias[at], head_dim**-0.5)
    # bfloat16: one rounding of the output; float32: sums of head_dim and length terms in another order
    steps = 1 if dtype == torch.bfloat16 else head_dim + length
    bound = steps * torch.finfo(dtype).eps * want.float().abs().max()
    assert got.dtype == dtype and got.shape == want.shape
    assert (got.float() - want.float()).abs().max() <= bound
    with pytest.raises(ValueError, match="all of one dtype"):
        native.one_query_attention(q, keys, values, bias.to(torch.float16), head_dim**-0.5, slots)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scattered", [False, True])
def test_prompt_attention_is_one_query_attention_row_by_row_and_stores_the_prompts(head_dim, scattered):
    """Whole prompts: each row attends to its prompt's keys up to itself under the causal ALiBi bias, with
    model.py's torch roundings, storing the prompts' keys and values where KVCache.write_prompts would."""
    generator = torch.Generator().manual_seed(head_dim)
    prompts, n, heads, capacity = 3, 21, 4, 40
    slopes = alibi_slopes(2 * heads)[:heads]
    bias = causal_alibi_bias(slopes, 0, n, torch.bfloat16)
    q, k, v = torch.randn(prompts * n, heads, 3, head_dim, generator=generator).to(torch.bfloat16).unbind(2)
    slots = torch.tensor([4, 0, 2]) if scattered else torch.tensor([1, 2, 3])
    cache = [torch.randn(6, heads, capacity, head_dim, generator=generator).to(torch.bfloat16) for _ in "kv"]
    written = [tensor.clone() for tensor in cache]  # as write_prompts stores them
    for tensor, new in zip(written, (k, v), strict=True):
        tensor[slots, :, :n] = new.reshape(prompts, n, heads, head_dim).transpose(1, 2)
    got = native.prompt_attention(
        q, cache[0][:, :, :n], cache[1][:, :, :n], bias, head_dim**-0.5, slots, (k, v)
    )
    assert torch.equal(cache[0], written[0]) and torch.equal(cache[1], written[1])
    qs, ks, vs = (t.reshape(prompts, n, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qs, ks.transpose(-1, -2)).float() * head_dim**-0.5 + bias.float()
    want = torch.matmul(torch.softmax(scores, dim=-1).to(torch.bfloat16), vs).transpose(1, 2).flatten(0, 1)
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().max()
    assert got.shape == want.shape and (got.float() - want.float()).abs().max() <= ulp
    with pytest.raises(ValueError, match="not prompts of"):
        native.prompt_attention(q[:-1], cache[0][:, :, :n], cache[1][:, :, :n], bias, 0.125, slots)


@pytest.mark.parametrize("isa", [isa for isa in ISAS if isa != native.SCALAR])
@pytest.mark.parametrize(("n", "head_dim"), [(1, 64), (3, 64), (8, 64), (21, 128), (67, 64)])
def test_prompt_attention_gives_each_row_what_one_query_attention_gives_it_alone(isa, n, head_dim):
    """Bit for bit, at every vector ISA: AVX2 takes four rows of a prompt at a time (a prompt's last rows
    fewer), widening each key and value once for all four, and must sum each row's scores and values exactly
    as the one-query kernel does for that row against its keys 0..t."""
    generator = torch.Generator().manual_seed(n)
    prompts, heads = 2, 3
    bias = causal_alibi_bias(alibi_slopes(2 * heads)[:heads], 0, n, torch.bfloat16)
    q, k, v = torch.randn(prompts * n, heads, 3, head_dim, generator=generator).to(torch.bfloat16).unbind(2)
    cache = [torch.zeros(prompts, heads, n, head_dim, dtype=torch.bfloat16) for _ in "kv"]
    got = native.prompt_attention(q, *cache, bias, head_dim**-0.5, torch.arange(prompts), (k, v), isa=isa)
    for row in range(prompts * n):
        prompt, t = divmod(row, n)
        keys, values = (c[prompt : prompt + 1, :, : t + 1] for c in cache)
        row_bias = bias[None, :, t : t + 1, : t + 1].contiguous()
        alone = native.one_query_attention(q[row : row + 1], keys, values, row_bias, head_dim**-0.5, isa=isa)
        assert torch.equal(got[row : row + 1], alone), f"row {row} of {prompts} prompts of {n}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scattered", [False, True])
def test_one_query_attention_stores_each_querys_new_key_and_value_before_it_attends(dtype, scattered):
    """What model.py hands the kernel: the new tokens' keys and values (views of the fused projection, like
    q) and their positions; the cache must end as KVCache.write_tokens leaves it, the output the same."""
    generator = torch.Generator().manual_seed(7)
    slots_total, heads, capacity, length, head_dim = 6, 4, 40, 27, 64
    cache = [torch.randn(slots_total, heads, capacity, head_dim, generator=generator).to(dtype)]
    cache.append(torch.randn(cache[0].shape, generator=generator).to(dtype))
    bias = torch.randn(slots_total, heads, 1, length, generator=generator).to(dtype)
    q, k, v = torch.randn(3, heads, 3, head_dim, generator=generator).to(dtype).unbind(2)
    slots = torch.tensor([4, 0, 2]) if scattered else torch.arange(3)
    positions = torch.tensor([26, 3, 17])
    written = [tensor.clone() for tensor in cache]  # as write_tokens stores them
    written[0][slots, :, positions], written[1][slots, :, positions] = k, v
    want = native.one_query_attention(
        q, written[0][:, :, :length], written[1][:, :, :length], bias, 0.125, slots if scattered else None
    )
    got = native.one_query_attention(
        q,
        cache[0][:, :, :length],
        cache[1][:, :, :length],
        bias,
        0.125,
        slots if scattered else None,
        new_kv=(k, v, positions),
    )
    assert torch.equal(cache[0], written[0]) and torch.equal(cache[1], written[1])
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="outside the keys"):
        native.one_query_attention(
            q,
            cache[0][:, :, :length],
            cache[1][:, :, :length],
            bias,
            0.125,
            None,
            new_kv=(k, v, torch.tensor([length, 0, 1])),
        )


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("columns", [1, 17, 4096 + 35, 20000])  # tails, one block and a few, many blocks
def test_summaries_are_torchs_best_and_column_and_a_float64_log_sum_exp(isa, dtype, columns):
    generator = torch.Generator().manual_seed(columns)
    full = (torch.randn(6, columns + 3, generator=generator) * 6).to(dtype)
    full[1, columns // 2] = full[1, columns - 1] = full[1].max() + 1  # a tie: the lower column wins
    full[2, columns - 1] = float("nan")  # torch's max gives the NaN, and then its log-sum-exp is NaN
    full[3, :columns] = float("-inf")  # no finite best: NaN log-sum-exp, as torch's x - max gives
    full[4, columns // 3] = float("inf")
    rows = full[:, :columns]  # a slice's view: rows further apart than their length
    best, index, logsumexp = native.summarize(rows, isa)
    want = torch.max(rows, dim=-1)
    torch.testing.assert_close(best, want.values.float(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(index, want.indices)
    finite = [0, 1, 5]
    exact = torch.logsumexp(rows[finite].double(), dim=-1)
    # float32 sums of up to 4096 terms each, the blocks added in double: within a few float32 roundings
    assert (logsumexp[finite].double() - exact).abs().max() <= 64 * torch.finfo(
        torch.float32
    ).eps * exact.abs().max()
    assert logsumexp[[2, 3, 4]].isnan().all()
    if isa >= native.AVX2:
        assert native.summarizes(rows, float32=True)


def test_summaries_take_bfloat16_and_float32_only_when_asked():
    rows = torch.randn(2, 64)
    assert not native.summarizes(rows)  # float32 workers keep torch's, held to transformers
    assert native.summarizes(rows, float32=True)  # int8 ones need not
    assert not native.summarizes(rows.to(torch.bfloat16).t())  # columns not contiguous
    assert native.summarizes(rows.to(torch.bfloat16))
    assert not native.summarizes(rows.double(), float32=True)


def test_untiling_gives_back_the_plain_rows_widened():
    weight = torch.randn(16, 96).to(torch.bfloat16)
    out = torch.empty(8, 96)
    native.untile_into(out, native.to_tiles(weight), 4, 12)
    assert torch.equal(out, weight[4:12].float())
    with pytest.raises(ValueError, match="whole tiles"):
        native.untile_into(torch.empty(6, 96), native.to_tiles(weight), 2, 8)
