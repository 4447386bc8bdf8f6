"""The Linear kernels a bfloat16 CPU worker chooses at start (shard_worker/cpu_kernels.py).

Every path the chooser may pick against nn.Linear, on this CPU, where it can run: packed needs oneDNN's
bfloat16 matmul (skipped elsewhere); eager, aten and fp32 run on every CPU. The decision logic on
given timings and forced routes; a whole model's bfloat16 logits with each route against transformers,
within the bound tests/test_shard_model.py uses; float32 untouched; the choice in the worker's Info.
The AVX2 class is imitated in a fresh interpreter with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
(and the whole file can be run under them too).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BloomConfig

from bloomduo.shard_worker import cpu_kernels, native
from bloomduo.shard_worker.config import ShardOptions
from bloomduo.shard_worker.cpu_kernels import (
    ATEN,
    BLOCKS,
    COMPACT,
    EAGER,
    FP32,
    KERNELS_ENV,
    LM_HEAD,
    NATIVE,
    PACKED,
    PLAIN,
    PROBE_ROWS,
    ROW_BLOCKS,
    TILED,
    TILED_FP32,
    TOLERANCE_EPS,
    Fp32Scratch,
    KernelChoice,
    PackedLinear,
    Route,
    RoutedLinear,
    apply_routes,
    candidate_paths,
    choose,
    groups_of,
    kernels_setting,
    parse_route,
    route_from,
)
from bloomduo.shard_worker.distributed import ShardGroup, shutdown_distributed
from bloomduo.shard_worker.model import MLP, BloomShardModel
from bloomduo.shard_worker.step_plan import Chunk
from bloomduo.shard_worker.tensor_parallel import RowParallel, add_all_reduces, load_shard
from bloomduo.shard_worker.weight_formats import format_weights, packing_applies
from bloomduo.v1 import shard_pb2
from tests._dist_helpers import AVX2_CLASS, TINY, can_pack, make_checkpoint, needs_packing, relative_error

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CAN_PACK = can_pack()
PLAIN_PATHS = [EAGER, ATEN, FP32]  # run on every CPU: aten is eager's own kernel where oneDNN has no bf16


@pytest.fixture(autouse=True)
def _no_forced_kernels(monkeypatch):
    monkeypatch.delenv(KERNELS_ENV, raising=False)


def _linear(in_features: int, out_features: int, bias: bool = True, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16).requires_grad_(False)


def _module_for(path: str, linear: nn.Linear, scratch: Fp32Scratch, activation: str = "none") -> nn.Module:
    algorithm = "tanh" if activation == "gelu" else ""
    if path in (PACKED, NATIVE):
        module = PackedLinear(linear, activation, algorithm, Route(PACKED, ((1, path),)))
        assert module._native == [path == NATIVE]  # native read oneDNN's layout right, or was not asked
        return module
    if path in (TILED, TILED_FP32, ROW_BLOCKS, COMPACT):
        route = Route(cpu_kernels.LAYOUT_OF[path], ((1, path),))
        return RoutedLinear(linear, route, scratch, activation, algorithm)
    return RoutedLinear(linear, Route(PLAIN, ((1, path),)), scratch, activation, algorithm)


needs_native_onednn = pytest.mark.skipif(
    not (CAN_PACK and native.reads_onednn_packing()),
    reason="the native path reads oneDNN's AVX512-BF16 layout: this CPU or torch build packs no bfloat16, "
    "or packs it in another layout (then the native path is no candidate here)",
)
needs_compact = pytest.mark.skipif(
    native.best_isa() < native.AVX2,
    reason="the compact path's kernel runs at AVX2 and up (its scalar twin: tests/test_native_kernels.py)",
)
# the install built them; row-blocks reads its layout on every CPU, though a candidate where bf16 is emulated
OWN_PATHS = [
    pytest.param(NATIVE, marks=needs_native_onednn),
    TILED,
    TILED_FP32,
    ROW_BLOCKS,
    pytest.param(COMPACT, marks=needs_compact),
]


# ------------------------------------------------------------------------------ each path, one Linear
@pytest.mark.parametrize("path", [pytest.param(PACKED, marks=needs_packing), *OWN_PATHS, *PLAIN_PATHS])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 33])
@torch.inference_mode()
def test_every_path_computes_what_nn_linear_does(path, bias, rows):
    linear = _linear(320, 192, bias)  # 192 rows: three of oneDNN's 64-row blocks, so native reads them
    # a scratch smaller than the weight: the fp32 path converts it in slices
    module = _module_for(path, linear, Fp32Scratch(320 * 64))
    x = torch.randn(rows, 320, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    want, got = linear(x), module(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert relative_error(got, want, torch.bfloat16) <= TOLERANCE_EPS
    if path in (EAGER, ATEN) and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert torch.equal(got, want)  # one kernel: ATen's, with or without oneDNN switched on
    three_d = module(x.view(1, rows, 320))  # [batch, tokens, hidden] keeps its shape
    assert three_d.shape == (1, rows, 192) and torch.equal(three_d[0], got)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(PACKED, marks=needs_packing),
        pytest.param(NATIVE, marks=needs_native_onednn),
        FP32,
        TILED_FP32,
        TILED,
        ROW_BLOCKS,
        pytest.param(COMPACT, marks=needs_compact),
    ],
)
@torch.inference_mode()
def test_a_folded_gelu_rounds_once(path):
    """packed, native, fp32, tiled and row-blocks apply the GELU to the float32 sum: within a rounding of
    float32 throughout."""
    linear = _linear(256, 384, seed=2)
    x = torch.randn(16, 256).to(torch.bfloat16)
    exact = nn.functional.gelu(
        nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float()), approximate="tanh"
    )
    got = _module_for(path, linear, Fp32Scratch(), "gelu")(x).float()
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert bool(((got - exact).abs() <= ulp).all())


@pytest.mark.parametrize("path", [EAGER, ATEN])
@torch.inference_mode()
def test_a_gelu_after_the_bfloat16_paths_is_the_unfused_pair(path):
    linear = _linear(96, 64, seed=3)
    x = torch.randn(5, 96).to(torch.bfloat16)
    plain = nn.functional.gelu(_module_for(path, linear, Fp32Scratch())(x), approximate="tanh")
    assert torch.equal(_module_for(path, linear, Fp32Scratch(), "gelu")(x), plain)


@torch.inference_mode()
def test_the_aten_path_leaves_onednn_as_it_found_it():
    linear = _linear(64, 32)
    before = torch._C._get_mkldnn_enabled()
    cpu_kernels.aten_linear(torch.randn(2, 64).to(torch.bfloat16), linear.weight, linear.bias)
    assert torch._C._get_mkldnn_enabled() == before


def test_the_fp32_path_holds_one_small_scratch_not_a_weight_copy():
    scratch = Fp32Scratch(1024)
    linear = _linear(256, 100)
    module = RoutedLinear(linear, Route(PLAIN, ((1, FP32),)), scratch)
    with torch.inference_mode():
        module(torch.randn(4, 256).to(torch.bfloat16))
    assert scratch.get().numel() == 1024 and scratch.get().dtype == torch.float32
    assert module.weight is linear.weight and module.weight.dtype == torch.bfloat16  # stored once, in bf16


# --------------------------------------------------------------------------- routes and the decision
def test_a_route_dispatches_by_row_count_and_says_so():
    route = parse_route("aten,fp32@8")
    assert route == Route(PLAIN, ((1, ATEN), (8, FP32)))
    assert [route.path_for(rows) for rows in (1, 7, 8, 500)] == [ATEN, ATEN, FP32, FP32]
    assert route.describe() == "aten 1-7, fp32 8+"
    assert parse_route("eager,aten@2,fp32@3").describe() == "eager 1, aten 2, fp32 3+"
    assert parse_route("packed") == Route(PACKED, ((1, PACKED),))
    assert parse_route("eager").describe() == "eager"


@pytest.mark.parametrize(
    "spec", ["fast", "aten,fp32", "aten@2", "fp32,aten@0", "aten,fp32@8,eager@4", "packed,aten@4"]
)
def test_a_bad_forced_route_is_refused_naming_the_setting(spec):
    with pytest.raises(ValueError, match=KERNELS_ENV):
        parse_route(spec)


def test_the_setting_is_the_flag_then_the_environment(monkeypatch):
    assert kernels_setting("auto") == "auto" and ShardOptions.cpu_kernels == "auto"
    monkeypatch.setenv(KERNELS_ENV, "fp32")
    assert kernels_setting("auto") == "fp32"
    assert kernels_setting("eager") == "eager"


def test_forced_routes_measure_nothing(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "measure_group", lambda *a: pytest.fail("a forced route was timed"))
    groups = {BLOCKS: [_linear(8, 8)], LM_HEAD: [_linear(8, 16, False)]}
    choice = choose(groups, [EAGER, ATEN, FP32], Fp32Scratch(), "aten,fp32@8")
    assert (
        choice.forced
        and choice.describe() == "blocks: aten 1-7, fp32 8+; lm_head: aten 1-7, fp32 8+ (forced)"
    )
    with pytest.raises(ValueError, match="packed needs oneDNN"):
        choose(groups, [EAGER, FP32], Fp32Scratch(), "packed")


def test_packing_switched_off_takes_packed_out_of_the_candidates(monkeypatch):
    monkeypatch.setenv("BLOOMDUO_CPU_PACKED_WEIGHTS", "0")
    assert PACKED not in candidate_paths(packing_applies(CPU, torch.bfloat16))
    assert EAGER in candidate_paths(False)


# Measured on the AMD EPYC (AVX512-BF16) and with the AVX2 caps, bloom-560m shapes (ms).
AVX512_BLOCKS = {
    PACKED: {1: 20.0, 4: 18.4, 32: 51.8, 256: 358.0},
    EAGER: {1: 31.4, 4: 33.3, 32: 69.5, 256: 375.0},
    ATEN: {1: 15.3, 4: 61.5, 32: 452.0},
}
AVX2_BLOCKS = {EAGER: {1: 16.0, 4: 61.6, 32: 462.0}, FP32: {1: 31.0, 4: 65.4, 32: 152.0, 256: 1614.0}}


def test_the_layout_least_slower_than_the_best_wins():
    # packed is 1.31x the best at one row; plain's best is 1.81x packed at four rows
    assert route_from(AVX512_BLOCKS, PROBE_ROWS[BLOCKS]) == Route(PACKED, ((1, PACKED),))
    # without packing: ATen's GEMV for a row, oneDNN from the crossover on
    plain = {path: t for path, t in AVX512_BLOCKS.items() if path != PACKED}
    route = route_from(plain, PROBE_ROWS[BLOCKS])
    assert route.layout == PLAIN and route.steps[0] == (1, ATEN) and route.path_for(4) == EAGER
    assert route.path_for(256) == EAGER  # aten was pruned at 32: out from there on
    # a one-row-heavy machine where packing loses everywhere keeps the plain layout
    slow_packing = {**AVX512_BLOCKS, PACKED: {rows: 3 * t for rows, t in AVX512_BLOCKS[PACKED].items()}}
    assert route_from(slow_packing, PROBE_ROWS[BLOCKS]).layout == PLAIN


def test_emulated_bfloat16_switches_to_float32_where_the_interpolated_times_cross():
    route = route_from(AVX2_BLOCKS, PROBE_ROWS[BLOCKS])
    assert route.layout == PLAIN and [path for _, path in route.steps] == [EAGER, FP32]
    crossover = route.steps[1][0]
    assert 4 < crossover < 32
    for rows in range(4, 33):  # the line through (4, 61.6)-(32, 462) against (4, 65.4)-(32, 152)
        eager = 61.6 + (462 - 61.6) * (rows - 4) / 28
        fp32 = 65.4 + (152 - 65.4) * (rows - 4) / 28
        assert route.path_for(rows) == (EAGER if eager <= fp32 else FP32)
    assert route_from({}, PROBE_ROWS[BLOCKS]) == Route(PLAIN, ((1, EAGER),))


def test_ranks_that_pruned_a_size_differently_agree_on_the_sizes_both_timed():
    # Each rank went on to 256 rows with the one path that led at 32 rows, and they led on different ranks
    # (a fresh clone's CI run on a Xeon with AMX): no path has a 256-row time from both.
    rank0 = {BLOCKS: {PACKED: {1: 7.7, 4: 8.1, 32: 3.2, 256: 30.0}, NATIVE: {1: 5.7, 4: 6.3, 32: 3.3}}}
    rank1 = {BLOCKS: {PACKED: {1: 7.9, 4: 8.3, 32: 3.4}, NATIVE: {1: 5.9, 4: 6.5, 32: 3.3, 256: 29.0}}}
    choice = KernelChoice({})
    choice.agree([rank0, rank1])
    assert all(256 not in times for times in choice.timings_ms[BLOCKS].values())
    route = choice.routes[BLOCKS]
    assert route.layout == PACKED and route.path_for(1) == NATIVE and route.path_for(256) in (PACKED, NATIVE)


# The chooser's times on a real AVX2-only EPYC (commit 764fed2, rank 0), plus the plain layout's float32 GEMM.
AVX2_EPYC_BLOCKS = {
    TILED: {1: 3.2, 4: 9.3, 32: 6.3, 256: 47.5},
    TILED_FP32: {1: 13.6, 4: 23.4, 32: 8.4, 256: 45.9},
    ROW_BLOCKS: {1: 3.6, 4: 6.9, 32: 5.1, 256: 38.5},
    FP32: {1: 10.1, 4: 19.7, 32: 7.7, 256: 44.2},
}


def test_one_slow_run_does_not_hand_the_layout_to_one_slower_at_every_other_size():
    assert route_from(AVX2_EPYC_BLOCKS, PROBE_ROWS[BLOCKS]) == Route(ROW_BLOCKS, ((1, ROW_BLOCKS),))
    # a one-row run of the row blocks caught by noise (1.38x the tiles'): the tiles are still 1.19-1.35x
    # slower at every other size, and the worst ratio alone (1.38 against 1.35) would have taken them
    noisy = {**AVX2_EPYC_BLOCKS, ROW_BLOCKS: {**AVX2_EPYC_BLOCKS[ROW_BLOCKS], 1: 4.4}}
    assert route_from(noisy, PROBE_ROWS[BLOCKS]).layout == ROW_BLOCKS


def test_a_layout_far_slower_at_one_size_loses_to_one_that_is_never():
    # fastest at three sizes, 1.6x at the fourth (mean ratio 1.12) against 1.3x at three (mean 1.22)
    timings = {
        PACKED: {1: 10.0, 4: 10.0, 32: 10.0, 256: 160.0},
        EAGER: {1: 13.0, 4: 13.0, 32: 13.0, 256: 100.0},
    }
    assert route_from(timings, PROBE_ROWS[BLOCKS]).layout == PLAIN
    timings[PACKED][256] = 140.0  # 1.4x: within the bound, the mean decides
    assert route_from(timings, PROBE_ROWS[BLOCKS]).layout == PACKED


def test_the_paths_take_turns_in_the_timed_runs():
    calls: list[str] = []

    class Recorder(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name, self.in_features = name, 8

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.name)
            return x

    inputs = [{8: torch.zeros(1, 8)}] * (1 + cpu_kernels.TIMED_RUNS)
    times = cpu_kernels._time({"a": [Recorder("a")], "b": [Recorder("b")]}, inputs)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == ["a", "b"] * (1 + cpu_kernels.TIMED_RUNS)  # a warm-up each, then runs in turn


def test_a_prefill_probe_charges_a_path_that_builds_a_kernel_per_row_count():
    """Decode probes see one row count again and again, as decode batches do; prefill probes a new one each
    run, as prefill steps do, so a path that compiles a kernel per new shape (oneDNN's packed Linear) pays
    for it in the probe as it would in serving."""
    build_s = 0.01

    class CompilesPerShape(nn.Module):
        in_features = 8

        def __init__(self) -> None:
            super().__init__()
            self.built: set[int] = set()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] not in self.built:
                self.built.add(x.shape[0])
                time.sleep(build_s)
            return x

    generator = torch.Generator().manual_seed(0)
    for rows, fresh in ((4, False), (cpu_kernels.PREFILL_FROM, True), (256, True)):
        inputs = cpu_kernels._probe_inputs(rows, {8}, torch.float32, generator)
        sizes = [batch[8].shape[0] for batch in inputs]
        assert len(sizes) == 1 + cpu_kernels.TIMED_RUNS and sizes[0] == rows and max(sizes) == rows
        assert len(set(sizes)) == (len(sizes) if fresh else 1)
        ms = cpu_kernels._time({"compiles": [CompilesPerShape()]}, inputs)["compiles"]
        assert (ms >= build_s * 1e3) == fresh, (rows, ms)


def test_a_group_chooses_from_its_ranks_mean_times():
    # rank 0 alone (the noisy one-row run) and rank 1 alone would choose alike here; the point is that the
    # route comes from the mean, and a path one rank did not time at a size is out at that size
    rank0 = {BLOCKS: {**AVX2_EPYC_BLOCKS, ROW_BLOCKS: {**AVX2_EPYC_BLOCKS[ROW_BLOCKS], 1: 4.4}}}
    rank1 = {BLOCKS: {path: dict(t) for path, t in AVX2_EPYC_BLOCKS.items()}}
    del rank1[BLOCKS][TILED_FP32][256]  # pruned on rank 1
    choice = KernelChoice({BLOCKS: Route(TILED, ((1, TILED),))})
    choice.agree([rank0, rank1])
    assert choice.timings_ms[BLOCKS][ROW_BLOCKS][1] == 4.0
    assert 256 not in choice.timings_ms[BLOCKS][TILED_FP32]
    assert choice.routes == {BLOCKS: Route(ROW_BLOCKS, ((1, ROW_BLOCKS),))}
    again = KernelChoice({})
    again.agree([rank0, rank1])
    assert again.routes == choice.routes and again.timings_ms == choice.timings_ms


@torch.inference_mode()
def test_measuring_times_every_candidate_checks_it_and_drops_a_wrong_one(monkeypatch):
    model = _model(torch.bfloat16)
    groups = groups_of(model)
    assert [len(groups[BLOCKS]), len(groups[LM_HEAD])] == [4 * TINY["n_layer"], 1]
    paths = candidate_paths(CAN_PACK)
    choice = choose(groups, paths, Fp32Scratch(), "auto")
    assert not choice.forced and choice.seconds > 0
    for group in (BLOCKS, LM_HEAD):
        fitting = {p for p in paths if cpu_kernels._fit(cpu_kernels.LAYOUT_OF[p], groups[group])}
        assert set(choice.timings_ms[group]) == fitting  # every candidate timed at one row
        assert all(t[1] > 0 for t in choice.timings_ms[group].values())
        assert choice.routes[group].paths <= set(paths) and not choice.rejected[group]

    def off_by_much(x, weight, bias, scratch, approximate=None):
        return torch.nn.functional.linear(x, weight, bias) * 1.1

    monkeypatch.setattr(cpu_kernels, "fp32_linear", off_by_much)
    choice = choose(groups, [EAGER, FP32], Fp32Scratch(), "auto")
    assert set(choice.rejected[BLOCKS]) == {FP32} and "eps from nn.Linear" in choice.rejected[BLOCKS][FP32]
    assert choice.routes[BLOCKS] == Route(PLAIN, ((1, EAGER),))


# ------------------------------------------------------------------------------ the whole model
class _CountingReducer:
    """The shared-memory all-reduce of a one-rank group: the sum of one part is itself."""

    def __init__(self) -> None:
        self.calls = 0

    def fits(self, tensor: torch.Tensor) -> bool:
        return True

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return tensor


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny checkpoint, transformers' logits for a ragged prefill and two decode steps, per dtype."""
    model_dir = tmp_path_factory.mktemp("kernels_bloom")
    hf32 = make_checkpoint(model_dir)
    models = {torch.float32: hf32, torch.bfloat16: copy.deepcopy(hf32).to(torch.bfloat16)}
    ids = torch.randint(3, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(4))
    steps = [([Chunk(0, 0, 10), Chunk(1, 0, 7)], [(0, 0, 10), (1, 0, 7)])]
    steps += [([Chunk(0, 10 + i, 1), Chunk(1, 7 + i, 1)], [(0, 10 + i, 1), (1, 7 + i, 1)]) for i in range(2)]
    expected, hidden = {}, {}
    with torch.no_grad():
        for dtype, hf in models.items():
            logits = hf(ids).logits  # [2, 12, vocab]: no padding, both rows are full prompts
            embed = hf.transformer.word_embeddings_layernorm(hf.transformer.word_embeddings(ids))
            expected[dtype] = [torch.stack([logits[s, p + n - 1] for s, p, n in rows]) for _, rows in steps]
            hidden[dtype] = [torch.cat([embed[s, p : p + n] for s, p, n in rows]) for _, rows in steps]
    return {"model_dir": model_dir, "steps": [c for c, _ in steps], "expected": expected, "hidden": hidden}


def _model(dtype: torch.dtype, model_dir: Path | None = None, reducer=None) -> BloomShardModel:
    if model_dir is None:
        torch.manual_seed(0)
        model = BloomShardModel(BloomConfig(**TINY)).eval().to(dtype).requires_grad_(False)
        for block in model.h:
            block.self_attention.alibi_slopes = block.self_attention.alibi_slopes.float()
    else:
        model = load_shard(model_dir, 0, 1, device=CPU, dtype=dtype)
    if reducer is not None:
        add_all_reduces(model, ShardGroup(process_group=None, shm=reducer))
    return model


def _run(model: BloomShardModel, reference, dtype: torch.dtype) -> list[torch.Tensor]:
    cache = model.new_kv_cache(initial_capacity=4)
    return [
        model(h, chunks, cache)
        for h, chunks in zip(reference["hidden"][dtype], reference["steps"], strict=True)
    ]


FORCED = [
    pytest.param("packed", marks=needs_packing),
    pytest.param("compact", marks=needs_compact),
    "eager",
    "aten",
    "fp32",
    "aten,fp32@3",
    "auto",
]


@pytest.mark.parametrize("setting", FORCED)
def test_bfloat16_logits_with_the_chosen_kernels_stay_with_transformers(reference, setting, monkeypatch):
    if setting != "auto":
        monkeypatch.setenv(KERNELS_ENV, setting)
    reducer = _CountingReducer()
    model = _model(torch.bfloat16, reference["model_dir"], reducer)
    described = format_weights(model, CPU, torch.bfloat16)
    assert described.startswith("blocks: ") and "; lm_head: " in described
    if setting != "auto":
        assert described.endswith("(forced)") and parse_route(setting).describe() in described
    for block in model.h:  # the row-parallel all-reduces stay around whatever Linear is inside
        assert isinstance(block.self_attention.dense, RowParallel)
        assert isinstance(block.mlp.dense_4h_to_h, RowParallel)
    if setting in ("eager",):
        assert all(type(m) is not RoutedLinear and type(m) is not PackedLinear for m in model.modules())
    got = _run(model, reference, torch.bfloat16)
    for step, (logits, want) in enumerate(zip(got, reference["expected"][torch.bfloat16], strict=True)):
        # the bound and agreement tests/test_shard_model.py holds bfloat16 to
        error = relative_error(logits, want, torch.bfloat16)
        assert error < 2, f"{setting} step {step}: |ours - HF| = {error:.3g} eps"
        assert (logits.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert reducer.calls == 2 * TINY["n_layer"] * len(reference["steps"])


@pytest.mark.parametrize("setting", ["auto", "fp32", "aten,fp32@3"])
def test_float32_stays_bit_for_bit_whatever_the_setting(reference, setting, monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, setting)
    model = _model(torch.float32, reference["model_dir"])
    before = _run(model, reference, torch.float32)
    assert format_weights(model, CPU, torch.float32) == "eager"
    assert all(type(m) in (nn.Linear,) for m in model.modules() if "Linear" in type(m).__name__)
    assert all(isinstance(mlp.gelu, nn.GELU) for mlp in model.modules() if isinstance(mlp, MLP))
    for want, got in zip(before, _run(model, reference, torch.float32), strict=True):
        assert torch.equal(got, want)


@torch.inference_mode()
def test_routes_fold_the_gelu_except_where_eager_keeps_the_model_as_it_is():
    model = _model(torch.bfloat16)
    choice = cpu_kernels.KernelChoice({BLOCKS: parse_route("aten,fp32@8"), LM_HEAD: parse_route("eager")})
    apply_routes(model, choice, Fp32Scratch())
    for block in model.h:
        assert isinstance(block.mlp.gelu, nn.Identity) and block.mlp.dense_h_to_4h.approximate == "tanh"
        assert type(block.self_attention.query_key_value) is RoutedLinear
    assert type(model.lm_head) is nn.Linear


# --------------------------------------------------------------------------- a worker's Info says it
def test_the_worker_logs_and_shows_its_choice_in_info(reference, tmp_path, monkeypatch):
    from bloomduo.shard_worker.engine import ShardEngine
    from bloomduo.shard_worker.server import ShardServicer

    options = ShardOptions(
        model_dir=reference["model_dir"],
        rank=0,
        world_size=1,
        dist_init=f"file://{tmp_path / 'store'}",
        dist_timeout_s=60,
        dtype="bfloat16",
        kv_cache_slots=2,
        cpu_kernels="aten,fp32@3",
    )
    with ThreadPoolExecutor(max_workers=1) as loader:  # load() sets flush-denormal on its own thread
        try:
            engine = loader.submit(ShardEngine.load, options).result()
        finally:
            shutdown_distributed()
    servicer = ShardServicer(options, lambda reason: None)
    try:
        servicer.runner.engine = engine
        info = asyncio.run(servicer.Info(shard_pb2.ShardInfoRequest(), None))
    finally:
        servicer.runner.executor.shutdown(wait=True)
    assert info.kernels == "blocks: aten 1-2, fp32 3+; lm_head: aten 1-2, fp32 3+ (forced)"
    assert info.dtype == "bfloat16"


# ------------------------------------------------------------------------ the AVX2 class, imitated
# A fresh interpreter: oneDNN and ATen read their ISA caps once, at the first kernel.
_AVX2_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from bloomduo.shard_worker import native
    from bloomduo.shard_worker.cpu_kernels import PackedLinear, RoutedLinear, candidate_paths
    from bloomduo.shard_worker.weight_formats import format_weights, packing_applies
    from bloomduo.shard_worker.tensor_parallel import load_shard
    model = load_shard(sys.argv[1], 0, 1, device=torch.device("cpu"), dtype=torch.bfloat16)
    print(json.dumps({
        "capability": torch.backends.cpu.get_cpu_capability(),
        "candidates": candidate_paths(packing_applies(torch.device("cpu"), torch.bfloat16)),
        "kernels": format_weights(model, torch.device("cpu"), torch.bfloat16),
        "packed": sum(isinstance(m, PackedLinear) for m in model.modules()),
        "routed": sum(isinstance(m, RoutedLinear) for m in model.modules()),
        "isa": native.ISA_NAMES[native.best_isa()],
    }))
    """
)


def _run_script(script: str, *args: str, env: dict[str, str]) -> dict:
    """Run `script` in a fresh interpreter from the repository; the JSON object on its last line."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_an_avx2_class_cpu_chooses_among_what_it_can_run(reference):
    env = {**os.environ, **AVX2_CLASS}
    env.pop(KERNELS_ENV, None)
    env.pop("BLOOMDUO_CPU_PACKED_WEIGHTS", None)
    report = _run_script(_AVX2_SCRIPT, str(reference["model_dir"]), env=env)
    assert report["capability"] in ("AVX2", "DEFAULT"), report  # the ATen cap took effect
    # bloomduo's own kernel in its AVX2 form where the install built it (the test environment always does)
    assert report["candidates"] == [COMPACT, TILED, TILED_FP32, ROW_BLOCKS, EAGER, FP32], report
    assert report["packed"] == 0, report
    assert report["isa"] == "avx2", report
    assert report["kernels"].startswith("blocks: ") and PACKED not in report["kernels"], report


_COMPILED_KERNELS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from bloomduo.shard_worker.host_memory import bound_onednn_caches
    if sys.argv[1] == "bounded":
        bound_onednn_caches()  # as a worker's load does, before its first oneDNN kernel
    torch.set_num_threads(1)
    def rss():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
    shapes = ((1536, 1024), (1024, 512), (2048, 1024), (1024, 2048))  # a bloom-560m rank's block Linears
    weights = [torch.randn(n, k).to(torch.bfloat16) for n, k in shapes]
    weights = [torch.ops.mkldnn._reorder_linear_weight(weight, None) for weight in weights]
    def prefill(rows):
        for weight in weights:
            x = torch.randn(rows, weight.shape[1]).to(torch.bfloat16)
            torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    prefill(166)
    before = rss()
    for rows in range(167, 167 + 60):  # prompts of 60 lengths, each compiled for its row count
        prefill(rows)
    print(json.dumps({"grown_mib": rss() - before}))
    """
)


@needs_packing
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")
def test_a_worker_keeps_a_few_compiled_onednn_kernels_not_one_per_prompt_length():
    """oneDNN and the ideep layer each cached 1024 kernels: ~2.5 MiB per prefill length, never given back."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    }
    grown = {
        mode: _run_script(_COMPILED_KERNELS_SCRIPT, mode, env=env)["grown_mib"]
        for mode in ("bounded", "default")
    }
    assert grown["default"] > 60, grown  # the leak the bound is for, seen on this machine
    assert grown["bounded"] < 40, grown
