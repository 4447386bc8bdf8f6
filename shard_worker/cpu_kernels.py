"""Which kernel runs each Linear of a bfloat16 CPU worker, chosen at start by timing them on this machine.

The fastest path depends on the CPU and on how many rows a call has, and no rule written in advance
got both right. The paths, by the weight layout they read:

    oneDNN packed   packed      oneDNN's bf16 matmul                   (oneDNN bf16 native: AVX512-BF16, AMX)
                    native      native.py's kernel on oneDNN's bytes   (the same, with AVX512-BF16; AMX's
                                                                            32-row blocks too)
    tiles           tiled       native.py's kernel on its own tiles    (x86-64 with AVX2, where it was built)
                    tiled-fp32  float32 GEMM on untiled, widened slices (bf16 emulated)
    row blocks      row-blocks  native.py's FMA kernel on oneDNN's     (bf16 emulated, where it was built)
                                bf16 byte order, made by native.py
    compact         compact     native.py's kernel on the row blocks   (AVX2 and up; AMX: 32-row blocks)
                                in 12 bits a weight, losslessly
    plain           eager       nn.Linear
                    aten        ATen's own kernel, oneDNN off          (where oneDNN is the default)
                    fp32        float32 GEMM on widened slices         (bf16 emulated)

Measured at one thread on bloom-560m's shapes split over two ranks (AMD EPYC; ms for 64 MiB of block
weights at 1 and 4 rows, cold, one block at 32 and 256 rows):

    AVX512-BF16                 rows=1     4     32    256
      native                      3.3    3.0   1.9   14.4
      packed                      5.3    4.4   2.1   14.5
      tiled                       3.1    4.1   2.8   18.8
      eager / aten                8.1 / 4.0   8.4 / 15.2
    the same, AVX2 only (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2; bfloat16 emulated)
      tiled                       3.3    9.2   5.9   45.2
      fp32                        8.8   16.4   6.2   34.9
      eager                       4.1   15.3  18.7      -
    Xeon with AMX (both ranks probing at once; oneDNN packs 32-row blocks here)
      native (AMX from 3 rows)    7.6    8.8   0.9    4.1
      packed                     12.5    9.8   1.5    3.5
      tiled                       7.8   12.3   5.2      -
    the same Xeon, 2026-12-03 (the bus faster that day)
      native                      5.8    6.3   1.17   3.13
      compact                     4.7    5.2   0.92   3.12
    AVX2-only EPYC, real (both ranks probing at once)
      tiled                       3.2    9.3   6.3   47.5
      tiled-fp32                 13.6   23.4   8.4   45.9
      row-blocks                  3.6    6.9   5.1   38.5
    AVX2-only EPYC (Zen 4, its AVX512 hidden; a core reads ~28 GB/s), 2026-12-04
      row-blocks                  3.2    5.0   4.6   38.7
      compact                     2.8    6.4   4.9   39.2
    AVX2-only EPYC (Zen 3; a core reads ~23 GB/s), 2026-12-05: the two layouts within 4 % on the mean below,
    so either is taken; forced, compact's one-stream TPOT was 0.75x row-blocks' (docs/performance-record.md)
      row-blocks                  4.2    5.3   4.2   35.4
      compact                     3.0    6.2   4.6   37.2
    AVX512-BF16 without AMX, a Zen 4 EPYC (2026-12-06, both ranks probing at once): compact chosen
      native                      3.2    3.2   1.9   14.8
      compact                     3.0    2.4   2.0   14.9

Sums along k (tiles) need widening work per FMA that outer products over row blocks (each x value broadcast
against 16 rows' weights) spread over 6 rows: 68 against 82 GFLOP/s of this CPU's ~91 at 256 rows.

oneDNN's small-batch kernel streams its packed weights at ~15 GB/s where native.py's reads the same bytes
at ~21 GB/s; where bfloat16 arithmetic is emulated, a float32 GEMM on slices converted into one reused
float32 scratch wins from a few dozen rows up and loses 3x at one row. A worker times the paths its CPU
can run on its own weights, at its thread count: decode sizes (1 and 4 rows) on weights past the
last-level cache, prefill sizes (32 and 256 rows) on one block; the LM head, whose calls have one row per
sequence, at 1, 4 and 16 rows. Each path's output is checked against nn.Linear's first (`TOLERANCE_EPS`
roundings of the output's scale); a path that misses is dropped, and so is one that is `PRUNE_FACTOR`
times slower than the best at a size, for larger sizes (not the float32 ones, slow at one row by design).

One weight layout per group (blocks, LM head): two layouts cannot be held without a second copy of the
weights. The layout whose fastest path is the least slower than the best over the probed sizes (the
geometric mean of the ratios, among layouts never more than MAX_REGRET slower) wins; within it each call
takes the path whose time, interpolated between the probed sizes, is smallest for its row count. The paths
take turns in the timed runs, and the ranks of a group choose alike, from their mean times: on a noisy
2-core VM the worst-ratio rule on one rank's back-to-back runs picked the tiles over the row blocks (15-25 %
slower at 4 to 32 rows) when a single one-row run of the row blocks came out 1.2x slow.

`BLOOMDUO_CPU_KERNELS` (or `bloomduo shard --cpu-kernels`) forces a route instead, e.g. `packed`, `native`,
`compact`, `tiled`, or steps of one layout such as `native,packed@33` or `aten,fp32@8` (aten below 8 rows,
fp32 from 8): no timing, the same on every run. float32 and float16 workers keep nn.Linear as it is: float32
is held to transformers bit for bit.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bloomduo.core.logs import get_logger
from bloomduo.shard_worker import native
from bloomduo.shard_worker.model import MLP

log = get_logger(__name__)

PACKED, NATIVE, TILED, TILED_FP32 = "packed", "native", "tiled", "tiled-fp32"
ROW_BLOCKS, COMPACT = "row-blocks", "compact"
EAGER, ATEN, FP32 = "eager", "aten", "fp32"
PATHS = (PACKED, NATIVE, TILED, TILED_FP32, ROW_BLOCKS, COMPACT, EAGER, ATEN, FP32)
PLAIN = "plain"  # the weight as loaded, row-major
# The layout each path reads: oneDNN's packed one (read by oneDNN, or by native.py's kernel for few rows),
# native.py's own tiles, its row blocks (oneDNN's byte order, made without oneDNN), or the plain weight. One
# layout per group: two would hold the weights twice.
LAYOUT_OF = {
    PACKED: PACKED,
    NATIVE: PACKED,
    TILED: TILED,
    TILED_FP32: TILED,
    ROW_BLOCKS: ROW_BLOCKS,
    COMPACT: COMPACT,
    EAGER: PLAIN,
    ATEN: PLAIN,
    FP32: PLAIN,
}
LAYOUTS = (PACKED, TILED, ROW_BLOCKS, COMPACT, PLAIN)  # preferred in this order when their mean slowdowns tie
# What each of native.py's own layouts takes of a weight's shape
LAYOUT_FITS = {TILED: native.fits, ROW_BLOCKS: native.row_blocks_fit, COMPACT: native.compact_fits}
KERNELS_ENV = "BLOOMDUO_CPU_KERNELS"
BLOCKS, LM_HEAD = "blocks", "lm_head"
PROBE_ROWS = {BLOCKS: (1, 4, 32, 256), LM_HEAD: (1, 4, 16)}
PREFILL_FROM = 32  # probes of this many rows or more are compute-bound: timed on one block only
# Decode probes stream this many weight bytes per pass: twice a 32 MiB L3, so the weights come from
# memory as they do in a real step (a hot 3 MiB Linear made packed look 2x faster than it is).
SAMPLE_BYTES = 64 << 20
TIMED_RUNS, TIMED_BUDGET_S = 3, 0.05  # best of up to 3 runs after a warm-up, fewer when one is slow
PRUNE_FACTOR = 3.0
# A layout this much slower than the best at some probed size loses to any that is not: the mean regret
# alone would let a large loss at one size be bought by small gains at the others.
MAX_REGRET = 1.5
# Every path rounds a float32 sum to bfloat16 once, in its own order: measured <= 1 rounding apart.
TOLERANCE_EPS = 2
# float32 scratch for the FP32 path: 4 MiB, big enough for a GEMM of good shape, small enough to stay
# in cache between the conversion and the GEMM that reads it. One per process, shared by all Linears.
SCRATCH_ELEMENTS = 1 << 20


def bf16_is_emulated() -> bool:
    """Whether this CPU lacks bfloat16 dot-product instructions that oneDNN uses (AVX512-BF16, AMX).

    oneDNN's own check is also False when ONEDNN_MAX_CPU_ISA caps a newer CPU, which is how tests
    imitate an AVX2-only one.
    """
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return True
    flags = cpu_flags()
    return not flags or not flags & {"avx512_bf16", "amx_bf16"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return set(next((line for line in cpuinfo if line.startswith("flags")), "").split())
    except OSError:
        return set()


def aten_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear on ATen's own kernel: oneDNN switched off for this call only.

    The raw switch costs 0.2 us a call against 7.7 us for `torch.backends.mkldnn.flags`. It is
    process-wide; a worker runs its model on one thread, so no other matmul sees it.
    """
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(previous)


class Fp32Scratch:
    """The one reused float32 buffer the FP32 path converts weight slices into (never a whole weight)."""

    def __init__(self, elements: int = SCRATCH_ELEMENTS) -> None:
        self.elements = elements
        self._buffer: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self._buffer is None:  # allocated on first use: a worker that never takes the path pays nothing
            self._buffer = torch.empty(self.elements, dtype=torch.float32)
        return self._buffer

    def release(self) -> None:
        """Drop the buffer (the next get() makes it again): the kernel probes use it, the routes may not."""
        self._buffer = None


def fp32_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scratch: Fp32Scratch,
    approximate: str | None = None,
    tiled: bool = False,
) -> torch.Tensor:
    """F.linear computed in float32 from a bfloat16 weight (plain, or in native.py's tiles), slice by
    slice of output features, and rounded to the weight's dtype once, after the optional GELU
    (`approximate`: "tanh" or "none").

    Converting a whole weight per call into a fresh buffer cost more than the GEMM saves (page faults
    of 256 MiB a call); a slice converted into the cache-sized scratch costs ~0.1 ms per 2 M weights.
    """
    rows = x.reshape(-1, x.shape[-1]).float()
    out_features, in_features = weight.shape
    buffer = scratch.get()
    step = native.TILE_ROWS if tiled else 1  # a tiled slice is whole tiles
    per_slice = max(step, buffer.numel() // in_features // step * step)
    out = None if per_slice >= out_features else torch.empty(rows.shape[0], out_features, dtype=weight.dtype)
    for start in range(0, out_features, per_slice):
        stop = min(out_features, start + per_slice)
        w = buffer[: (stop - start) * in_features].view(stop - start, in_features)
        if tiled:
            native.untile_into(w, weight, start, stop)
        else:
            w.copy_(weight[start:stop])
        y = F.linear(rows, w, None if bias is None else bias[start:stop].float())
        if approximate:
            y = F.gelu(y, approximate=approximate)
        if out is None:
            return y.to(weight.dtype).view(*x.shape[:-1], out_features)
        out[:, start:stop] = y
    return out.view(*x.shape[:-1], out_features)


@dataclass(frozen=True)
class Route:
    """One group's kernels: its weight layout and the path for each row count."""

    layout: str  # one of LAYOUTS
    steps: tuple[tuple[int, str], ...]  # (first row count, path), ascending, the first from 1 row

    def path_for(self, rows: int) -> str:
        index = bisect.bisect_right([first for first, _ in self.steps], rows) - 1
        return self.steps[max(index, 0)][1]

    @property
    def paths(self) -> set[str]:
        return {path for _, path in self.steps}

    def describe(self) -> str:
        """ "packed", or "aten 1-7, fp32 8+" """
        if len(self.steps) == 1:
            return self.steps[0][1]
        parts = []
        for (first, path), (following, _) in zip(self.steps, [*self.steps[1:], (0, "")], strict=True):
            last = f"-{following - 1}" if following - 1 > first else ""
            parts.append(f"{path} {first}{last}" if following else f"{path} {first}+")
        return ", ".join(parts)


def parse_route(spec: str) -> Route:
    """A forced route: one path ("packed", "native", "tiled", "row-blocks", "eager", "aten", "fp32"), or
    steps like "aten,fp32@8" (aten below 8 rows, fp32 from 8) over paths of one layout."""
    steps: list[tuple[int, str]] = []
    for part in spec.replace(" ", "").split(","):
        path, _, first = part.partition("@")
        valid_first = first in ("", "1") if not steps else first.isdigit()
        if path not in PATHS or not valid_first:
            raise ValueError(
                f"{KERNELS_ENV}/--cpu-kernels: {spec!r} is not auto, one of {', '.join(PATHS)}, or steps "
                "like aten,fp32@8 (a path for 1 row, then path@first-row)"
            )
        start = int(first) if steps else 1
        if steps and start <= steps[-1][0]:
            raise ValueError(f"{KERNELS_ENV}/--cpu-kernels: the steps of {spec!r} must start at rising rows")
        steps.append((start, path))
    layouts = {LAYOUT_OF[path] for _, path in steps}
    if len(layouts) > 1:
        raise ValueError(
            f"{KERNELS_ENV}/--cpu-kernels: {spec!r} mixes weight layouts; steps may combine packed and "
            "native, or eager, aten and fp32"
        )
    return Route(layouts.pop(), tuple(steps))


def kernels_setting(option: str = "auto") -> str:
    """The worker's setting: its --cpu-kernels when not "auto", else BLOOMDUO_CPU_KERNELS, else "auto"."""
    return option if option != "auto" else os.environ.get(KERNELS_ENV, "").strip() or "auto"


class PackedLinear(nn.Module):
    """A Linear whose weight is in oneDNN's packed layout, optionally with a oneDNN post-op on its output.

    Its route's NATIVE steps read the same packed weight with native.py's kernel, which streams it at the
    memory's speed where oneDNN's own small-batch kernel does not, the GELU applied in the same pass. A
    weight oneDNN packed some other way than native.py reads (checked on one random row here) stays on
    oneDNN for every row count."""

    def __init__(
        self, linear: nn.Linear, activation: str = "none", algorithm: str = "", route: Route | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = linear.bias
        # post-op applied in the same pass: "gelu" with algorithm "tanh", or "none"
        self.activation, self.algorithm = activation, algorithm
        route = route or Route(PACKED, ((1, PACKED),))
        erf_gelu = activation == "gelu" and algorithm != "tanh"  # the native kernel folds the tanh GELU only
        reads = NATIVE in route.paths and not erf_gelu
        block_rows = native.onednn_block_rows(self.weight, self.bias) if reads else None
        if NATIVE in route.paths and block_rows is None:
            route = Route(PACKED, ((1, PACKED),))
        self._firsts = [first for first, _ in route.steps]
        self._native = [path == NATIVE for _, path in route.steps]
        self._kernel = (
            native.LinearKernel(
                self.weight, self.bias, layout=native.ONEDNN, gelu=activation == "gelu", block_rows=block_rows
            )
            if NATIVE in route.paths
            else None
        )

    def kernel_for(self, rows: int) -> native.LinearKernel | None:
        """The native kernel a call of `rows` rows runs, or None when it runs on oneDNN."""
        return self._kernel if self._native[bisect.bisect_right(self._firsts, rows) - 1] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel_for(x.numel() // self.in_features)
        if kernel is not None:
            return kernel(x)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(
            rows, self.weight, self.bias, self.activation, [], self.algorithm
        )
        return out.view(*x.shape[:-1], self.out_features)


class RoutedLinear(nn.Module):
    """A Linear that runs each call on its route's path for the call's row count, its weight held in the
    route's layout (plain, or native.py's tiles or row blocks), with an optional GELU folded in (inside the
    float32 paths, and native.py's kernels for the tanh GELU, before their one rounding; after the others)."""

    def __init__(
        self,
        linear: nn.Linear,
        route: Route,
        scratch: Fp32Scratch,
        activation: str = "none",
        algorithm: str = "",
    ) -> None:
        super().__init__()
        if route.layout not in (PLAIN, TILED, ROW_BLOCKS, COMPACT):
            raise ValueError("RoutedLinear runs plain-, tiled-, row-block- and compact-layout paths only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        arrange = {TILED: native.to_tiles, ROW_BLOCKS: native.to_row_blocks}.get(route.layout)
        compact = None
        if arrange is not None:
            self.weight = nn.Parameter(arrange(linear.weight.detach()), requires_grad=False)
        elif route.layout == COMPACT:  # its bytes are the weight: nothing else reads this layout
            compact = native.to_compact(linear.weight.detach(), native.compact_block_rows())
            self.weight = nn.Parameter(compact.data, requires_grad=False)
        self.route, self.scratch = route, scratch
        self.approximate = (algorithm or "none") if activation == "gelu" else None
        self._firsts = [first for first, _ in route.steps]
        self._paths = [path for _, path in route.steps]
        # native.py's kernels apply the tanh GELU to their float32 sums: one bf16 pass and rounding fewer
        tanh_gelu = self.approximate == "tanh"
        layout = native.ONEDNN if route.layout == ROW_BLOCKS else native.TILED
        own = route.paths & {TILED, ROW_BLOCKS, COMPACT}
        weight = compact._replace(data=self.weight) if compact is not None else self.weight
        self._kernel = native.LinearKernel(weight, self.bias, layout=layout, gelu=tanh_gelu) if own else None

    def kernel_for(self, rows: int) -> native.LinearKernel | None:
        """The native kernel a call of `rows` rows runs, its GELU included, or None when another path does."""
        path = self._paths[bisect.bisect_right(self._firsts, rows) - 1]
        own = path in (TILED, ROW_BLOCKS, COMPACT)
        return self._kernel if own and self.approximate in (None, "tanh") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self._paths[bisect.bisect_right(self._firsts, x.numel() // self.in_features) - 1]
        if path == FP32:
            return fp32_linear(x, self.weight, self.bias, self.scratch, self.approximate)
        if path == TILED_FP32:
            return fp32_linear(x, self.weight, self.bias, self.scratch, self.approximate, tiled=True)
        if path in (TILED, ROW_BLOCKS, COMPACT):
            out = self._kernel(x)
            return out if self.approximate in (None, "tanh") else F.gelu(out, approximate=self.approximate)
        out = aten_linear(x, self.weight, self.bias) if path == ATEN else F.linear(x, self.weight, self.bias)
        return F.gelu(out, approximate=self.approximate) if self.approximate else out


@dataclass
class KernelChoice:
    """What a worker chose (or was told) for each group, and what it measured."""

    routes: dict[str, Route]
    forced: bool = False
    timings_ms: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)  # group, path, rows
    rejected: dict[str, dict[str, str]] = field(default_factory=dict)  # group, path: why
    seconds: float = 0.0

    def describe(self) -> str:
        """The line Info shows: "blocks: packed; lm_head: aten 1-3, packed 4+"."""
        text = "; ".join(f"{group}: {route.describe()}" for group, route in self.routes.items())
        return f"{text} (forced)" if self.forced else text

    def agree(self, timings_by_rank: list[dict[str, dict[str, dict[int, float]]]]) -> None:
        """Take the routes the mean of a group's timings (each rank's timings_ms, in rank order) calls for,
        a path counting at a size only where every rank timed it: every rank, given the same timings,
        chooses the same, and averaging halves the weight of one rank's noisy run."""
        self.timings_ms = {
            group: {
                path: {
                    rows: round(statistics.fmean(rank[group][path][rows] for rank in timings_by_rank), 3)
                    for rows in times
                    if all(rows in rank.get(group, {}).get(path, {}) for rank in timings_by_rank)
                }
                for path, times in timings.items()
            }
            for group, timings in timings_by_rank[0].items()
        }
        self.routes = {
            group: route_from({path: t for path, t in timings.items() if t}, PROBE_ROWS[group])
            for group, timings in self.timings_ms.items()
        }


def candidate_paths(packing: bool) -> list[str]:
    """The paths this CPU can run: packed where packing applies, and native beside it where native.py's
    kernel reads the layout oneDNN packs in here (AVX512-BF16); compact and tiled where native.py was built
    with a vector ISA (and tiled-fp32 and row-blocks beside them, and fp32, where bfloat16 arithmetic is
    emulated); aten where the default is oneDNN's (elsewhere it is the same kernel as eager)."""
    paths = [PACKED] if packing else []
    if packing and native.reads_onednn_packing():
        paths.append(NATIVE)
    if native.best_isa() >= native.AVX2:
        paths += [COMPACT, TILED] + ([TILED_FP32, ROW_BLOCKS] if bf16_is_emulated() else [])
    paths.append(EAGER)
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        paths.append(ATEN)
    if bf16_is_emulated():
        paths.append(FP32)
    return paths


def groups_of(model: nn.Module) -> dict[str, list[nn.Linear]]:
    """The plain nn.Linear modules of `model` by group: its `lm_head`, and all the others (the blocks)."""
    head = getattr(model, "lm_head", None)
    blocks = [m for m in model.modules() if type(m) is nn.Linear and m is not head]
    groups = {BLOCKS: blocks}
    if type(head) is nn.Linear:
        groups[LM_HEAD] = [head]
    return {group: linears for group, linears in groups.items() if linears}


def choose(
    groups: dict[str, list[nn.Linear]], paths: list[str], scratch: Fp32Scratch, forced: str = "auto"
) -> KernelChoice:
    """Each group's route: `forced` ("auto": measured on `groups`' own weights, see the module doc)."""
    if forced != "auto":
        route = parse_route(forced)
        if route.layout == PACKED and PACKED not in paths:
            raise ValueError(
                f"{KERNELS_ENV}/--cpu-kernels: packed needs oneDNN's bfloat16 matmul (AVX512-BF16 or AMX), "
                "which this CPU or torch build lacks, or BLOOMDUO_CPU_PACKED_WEIGHTS=0 turned it off"
            )
        # row-blocks runs wherever the tiles do (VDPBF16PS reads its layout where the CPU has it), though
        # timed only where bf16 is emulated
        runnable = set(paths) | ({ROW_BLOCKS} if TILED in paths else set())
        missing = route.paths & {NATIVE, TILED, TILED_FP32, ROW_BLOCKS, COMPACT} - runnable
        if missing:
            raise ValueError(
                f"{KERNELS_ENV}/--cpu-kernels: {', '.join(sorted(missing))} needs bloomduo's native kernels "
                "(built by its install with a C compiler) and, for native, AVX512-BF16; this "
                f"worker has {', '.join(paths)}"
            )
        return KernelChoice({group: route for group in groups}, forced=True)
    started = time.perf_counter()
    choice = KernelChoice({})
    generator = torch.Generator().manual_seed(0)
    for group, linears in groups.items():
        fitting = [p for p in paths if _fit(LAYOUT_OF[p], linears)]
        timings, rejected = measure_group(group, linears, fitting, scratch, generator)
        choice.timings_ms[group], choice.rejected[group] = timings, rejected
        choice.routes[group] = route_from(timings, PROBE_ROWS[group])
    choice.seconds = time.perf_counter() - started
    return choice


def _fit(layout: str, linears: list[nn.Linear]) -> bool:
    """Whether every one of `linears` can take `layout` (any for oneDNN's and the plain one)."""
    fits = LAYOUT_FITS.get(layout)
    return fits is None or all(fits(linear.weight) for linear in linears)


def route_from(timings: dict[str, dict[int, float]], probes: tuple[int, ...]) -> Route:
    """The route the measured `timings` (path -> rows -> ms) call for.

    Layout: a layout's regret at a probed size is its fastest path's time there over the best time of
    all. The one of least geometric mean regret over the sizes wins (LAYOUTS' order on a tie), among
    those whose worst regret is at most MAX_REGRET when any is. Within it: per row count, the path of
    least time interpolated linearly between the probed sizes; a path not timed at a size (pruned) is
    out from the size before it onwards.
    """
    # A size no path was timed at says nothing: after `agree`, one that the ranks pruned differently (each
    # timed its own fastest path at 256 rows, say) is left to none.
    probes = tuple(rows for rows in probes if any(rows in t for t in timings.values()))
    if not probes:
        return Route(PLAIN, ((1, EAGER),))
    best = {rows: min(t[rows] for t in timings.values() if rows in t) for rows in probes}
    by_layout = {
        layout: {path: t for path, t in timings.items() if LAYOUT_OF[path] == layout} for layout in LAYOUTS
    }
    regrets = {
        layout: [min(t.get(rows, float("inf")) for t in paths.values()) / best[rows] for rows in probes]
        for layout, paths in by_layout.items()
        if paths
    }

    def rank(name: str) -> tuple[bool, float, int]:
        mean = math.exp(statistics.fmean(map(math.log, regrets[name])))
        return max(regrets[name]) > MAX_REGRET, mean, LAYOUTS.index(name)

    layout = min(regrets, key=rank)
    paths = by_layout[layout]
    steps: list[tuple[int, str]] = []
    for rows in range(1, probes[-1] + 1):
        path = min(paths, key=lambda p: (_interpolate(paths[p], probes, rows), list(paths).index(p)))
        if not steps or steps[-1][1] != path:
            steps.append((rows, path))
    return Route(layout, tuple(steps))


def _interpolate(times: dict[int, float], probes: tuple[int, ...], rows: int) -> float:
    for low, high in itertools.pairwise(probes):
        if low <= rows <= high:
            if rows in (low, high):
                return times.get(rows, float("inf"))
            if low not in times or high not in times:
                return float("inf")
            return times[low] + (times[high] - times[low]) * (rows - low) / (high - low)
    return times.get(rows, float("inf"))


def _sample(group: str, linears: list[nn.Linear], budget: int) -> list[nn.Linear]:
    """The Linears a probe times: whole blocks (4 Linears each, one of every shape) up to `budget`
    weight bytes; for the LM head, its first vocabulary rows up to `budget` (a view, not a copy)."""
    if group == LM_HEAD:
        head = linears[0]
        rows = max(1, min(head.out_features, budget // (head.in_features * head.weight.element_size())))
        part = nn.Linear(head.in_features, rows, bias=head.bias is not None, device="meta")
        part.weight = nn.Parameter(head.weight[:rows], requires_grad=False)
        part.bias = None if head.bias is None else nn.Parameter(head.bias[:rows], requires_grad=False)
        return [part]
    chosen: list[nn.Linear] = []
    for linear in linears:
        if len(chosen) % 4 == 0 and chosen and sum(m.weight.nbytes for m in chosen) >= budget:
            break
        chosen.append(linear)
    return chosen


def _runner(path: str, linears: list[nn.Linear], scratch: Fp32Scratch) -> list[nn.Module]:
    """The modules that run `path` on `linears`: exactly what apply_routes installs."""
    if LAYOUT_OF[path] == PACKED:
        return [PackedLinear(linear, route=Route(PACKED, ((1, path),))) for linear in linears]
    if path == EAGER:
        return list(linears)
    return [RoutedLinear(linear, Route(LAYOUT_OF[path], ((1, path),)), scratch) for linear in linears]


@torch.inference_mode()
def measure_group(
    group: str, linears: list[nn.Linear], paths: list[str], scratch: Fp32Scratch, generator: torch.Generator
) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    """ms of each path at each probe size of `group` (path -> rows -> ms), and the paths rejected."""
    dtype = linears[0].weight.dtype
    timings: dict[str, dict[int, float]] = {path: {} for path in paths}
    rejected: dict[str, str] = {}
    alive = list(paths)
    for sample_kind in ("decode", "prefill"):
        probes = [r for r in PROBE_ROWS[group] if (r >= PREFILL_FROM) == (sample_kind == "prefill")]
        if not probes:
            continue
        sample = _sample(group, linears, SAMPLE_BYTES if sample_kind == "decode" or group == LM_HEAD else 0)
        runners = {path: _runner(path, sample, scratch) for path in alive}
        for rows in probes:
            inputs = _probe_inputs(rows, {m.in_features for m in sample}, dtype, generator)
            first = inputs[0][sample[0].in_features]
            reference = sample[0](first)
            for path in list(alive):
                error = _error(runners[path][0](first), reference, dtype)
                if not error <= TOLERANCE_EPS:
                    rejected[path] = f"{error:.3g} eps from nn.Linear at {rows} rows"
                    alive.remove(path)
                    timings.pop(path)
            for path, ms in _time({path: runners[path] for path in alive}, inputs).items():
                timings[path][rows] = ms
            fastest = min(timings[path][rows] for path in alive)
            for path in list(alive):  # hopeless at this size: worse still at larger ones
                # ...except the float32 paths: a weight conversion per call, slow at one row by design
                if timings[path][rows] > PRUNE_FACTOR * fastest and path not in (FP32, TILED_FP32):
                    alive.remove(path)
        del runners  # the packed copies of the sample
    return {path: t for path, t in timings.items() if t}, rejected


def _error(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    """max|got - want| in roundings of `dtype` at the scale of `want` (inf when either is not finite)."""
    scale = torch.finfo(dtype).eps * want.float().abs().max().item()
    difference = (got.float() - want.float()).abs().max().item()
    return difference / scale if scale > 0 else (0.0 if difference == 0 else float("inf"))


def _probe_inputs(
    rows: int, features: set[int], dtype: torch.dtype, generator: torch.Generator
) -> list[dict[int, torch.Tensor]]:
    """The inputs of a probe's warm-up and of each of its timed runs (in_features -> [rows, in_features]).

    A decode probe's runs see its row count again, as decode steps of a batch do. A prefill probe's runs see
    one row fewer each: a prefill step's row count is seldom seen twice, and oneDNN builds (JIT-compiles) a
    primitive for every new one, 3.5-4.5 ms a Linear shape against 0.4 ms for the call itself (a 200-row
    bf16 packed 1024 -> 2048 Linear, Xeon with AMX). Timed at one size again and again, packed looked 16 %
    faster than native at 256 rows and took the prefill steps from 155 rows; in the stack it was no faster
    there, and the kernels it compiled kept each worker 7-10 MiB larger (RSS 1030-1035 against 1023-1026)."""
    fresh = rows >= PREFILL_FROM
    sizes = [rows - run if fresh else rows for run in range(1 + TIMED_RUNS)]
    return [{n: torch.randn(size, n, generator=generator).to(dtype) for n in features} for size in sizes]


def _time(runners: dict[str, list[nn.Module]], inputs: list[dict[int, torch.Tensor]]) -> dict[str, float]:
    """Each path's best ms over up to TIMED_RUNS runs (fewer when its runs use TIMED_BUDGET_S), the paths
    taking turns: a burst of noise from the machine (the other rank's probe, a neighbour) lands on every
    path's runs alike, where timing one path's runs back to back gave it all to one (on a 2-core EPYC a
    row-blocks run at one row came out 1.17x the tiles' in one probe and 0.89x in another). `inputs`: the
    warm-up's, then each run's (_probe_inputs)."""

    def once(modules: list[nn.Module], run: int) -> float:
        started = time.perf_counter()
        for module in modules:
            module(inputs[run][module.in_features])
        return time.perf_counter() - started

    for modules in runners.values():
        once(modules, 0)  # warm-up: oneDNN builds its primitive on the first call of each shape
    best = dict.fromkeys(runners, float("inf"))
    spent = dict.fromkeys(runners, 0.0)
    for run in range(TIMED_RUNS):
        for path, modules in runners.items():
            if run == 0 or spent[path] < TIMED_BUDGET_S:
                elapsed = once(modules, 1 + run)
                best[path], spent[path] = min(best[path], elapsed), spent[path] + elapsed
    return {path: round(seconds * 1e3, 3) for path, seconds in best.items()}


def apply_routes(model: nn.Module, choice: KernelChoice, scratch: Fp32Scratch) -> nn.Module:
    """Install `choice` in `model`, in place: PackedLinear or RoutedLinear per group (a group
    routed to eager alone keeps its nn.Linear), each MLP's tanh GELU folded into the Linear before it.

    Nothing here holds a replaced Linear: each one's plain weight is freed as soon as its packed copy is in
    place. Holding them all until the end (a list of the model's Linears did) made loading peak at twice the
    weights: 13.8 GB for a bloom-7b1 rank of 7.0 GB, and the second of two such workers on a 24 GB host was
    killed by the kernel."""

    def convert(
        linear: nn.Linear, group: str, activation: str = "none", algorithm: str = ""
    ) -> nn.Module | None:
        route = choice.routes.get(group)
        if route is None or route.paths == {EAGER}:
            return None
        if route.layout == PACKED:
            return PackedLinear(linear, activation, algorithm, route)
        if not _fit(route.layout, [linear]):  # forced: a weight the layout does not fit keeps nn.Linear
            return None
        return RoutedLinear(linear, route, scratch, activation, algorithm)

    for mlp in [m for m in model.modules() if isinstance(m, MLP)]:
        if isinstance(mlp.gelu, nn.GELU) and type(mlp.dense_h_to_4h) is nn.Linear:
            folded = convert(mlp.dense_h_to_4h, BLOCKS, "gelu", mlp.gelu.approximate)
            if folded is not None:
                mlp.dense_h_to_4h, mlp.gelu = folded, nn.Identity()
    for parent in [m for m in model.modules() if type(m) is not nn.Linear]:  # a list of all would hold them
        for name, child in list(parent.named_children()):
            group = LM_HEAD if parent is model and name == "lm_head" else BLOCKS  # as groups_of splits them
            if type(child) is nn.Linear and (converted := convert(child, group)) is not None:
                setattr(parent, name, converted)
    return model
