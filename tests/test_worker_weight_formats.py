"""The Linear weight formats of weight_formats.py.

oneDNN-packed bfloat16 (CPUs with a native oneDNN bfloat16 matmul, AVX512-BF16 or AMX; forced here, as
the chooser of tests/test_worker_kernels.py may pick another kernel on tiny shapes): the same
matmuls as the plain layout, a GELU folded into the MLP's first one that rounds once instead of twice,
and the tensor-parallel all-reduces kept. Its fallback, the plain layout, is tested on every CPU: turned
off by BLOOMDUO_CPU_PACKED_WEIGHTS=0 (then never chosen), and on an AVX2-class CPU, imitated with
ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2 (oneDNN then reports no bfloat16 matmul, as it
does on such a CPU).

FRACTAL_NZ on the npu, with a stand-in torch_npu.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BloomConfig

from bloomduo.shard_worker.distributed import ShardGroup
from bloomduo.shard_worker.model import MLP, BloomShardModel
from bloomduo.shard_worker.step_plan import Chunk
from bloomduo.shard_worker.tensor_parallel import RowParallel, add_all_reduces
from bloomduo.shard_worker.weight_formats import (
    NPU_FORMAT_FRACTAL_NZ,
    PackedLinear,
    format_weights,
    npu_nz_requested,
    packing_applies,
    to_npu_nz_format,
)
from tests._dist_helpers import AVX2_CLASS, needs_packing, relative_error

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CONFIG = dict(hidden_size=64, n_head=4, n_layer=2, vocab_size=300)


class _CountingReducer:
    """Stands in for the shared-memory all-reduce of a one-rank group: the sum of one part is itself."""

    def __init__(self) -> None:
        self.calls = 0

    def fits(self, tensor: torch.Tensor) -> bool:
        return True

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return tensor


def _model(dtype: torch.dtype, reducer: _CountingReducer | None = None) -> BloomShardModel:
    """The same random model for every call, with float32 slopes as load_shard leaves them."""
    torch.manual_seed(0)
    model = BloomShardModel(BloomConfig(**CONFIG)).eval().to(dtype)
    for block in model.h:
        block.self_attention.alibi_slopes = block.self_attention.alibi_slopes.float()
    if reducer is not None:
        add_all_reduces(model, ShardGroup(process_group=None, shm=reducer))
    return model


def _steps(model: BloomShardModel, hidden: torch.Tensor) -> list[torch.Tensor]:
    """A ragged prefill, a decode step of both sequences, then a chunk joining a decode."""
    cache = model.new_kv_cache(initial_capacity=4)
    hidden = hidden.to(model.ln_f.weight.dtype)
    return [
        model(hidden[:9], [Chunk(0, 0, 5), Chunk(1, 0, 4)], cache),
        model(hidden[9:11], [Chunk(0, 5, 1), Chunk(1, 4, 1)], cache),
        model(hidden[11:15], [Chunk(0, 6, 1), Chunk(2, 0, 3)], cache),
    ]


def _hidden() -> torch.Tensor:
    return torch.randn(15, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(3))


@needs_packing
def test_packed_model_keeps_its_logits_and_all_reduces(monkeypatch):
    monkeypatch.setenv("BLOOMDUO_CPU_KERNELS", "packed")  # auto may not pick it on these tiny shapes
    plain = _model(torch.bfloat16)
    reducer = _CountingReducer()
    packed = _model(torch.bfloat16, reducer)

    assert format_weights(packed, CPU, torch.bfloat16).startswith("blocks: packed")
    assert not [m for m in packed.modules() if isinstance(m, nn.Linear)]
    linears = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 4 * CONFIG["n_layer"] + 1 and all(m.weight.is_mkldnn for m in linears)
    assert sum(p.numel() for p in packed.parameters()) == sum(p.numel() for p in plain.parameters())
    for block in packed.h:  # the GELU now runs inside dense_h_to_4h; the ROW layers keep their all-reduce
        assert isinstance(block.mlp.gelu, nn.Identity)
        assert (block.mlp.dense_h_to_4h.activation, block.mlp.dense_h_to_4h.algorithm) == ("gelu", "tanh")
        assert isinstance(block.mlp.dense_4h_to_h, RowParallel)
        assert isinstance(block.mlp.dense_4h_to_h.linear, PackedLinear)

    hidden = _hidden()
    for want, got in zip(_steps(plain, hidden), _steps(packed, hidden), strict=True):
        # only the GELU's rounding differs: a few bfloat16 roundings of the logits at most
        assert relative_error(got, want, torch.bfloat16) < 4
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert reducer.calls == 2 * CONFIG["n_layer"] * 3  # two all-reduces per block, every step


@needs_packing
def test_packing_frees_each_plain_weight_as_its_packed_copy_takes_its_place(monkeypatch):
    """Holding the replaced Linears until the end made a bloom-7b1 rank peak at twice its weights while
    loading (13.8 GB for 7.0), and the second of two workers on a 24 GB host was killed."""
    monkeypatch.setenv("BLOOMDUO_CPU_KERNELS", "packed")
    model = _model(torch.bfloat16, _CountingReducer())
    plain_weights = [weakref.ref(m.weight) for m in model.modules() if type(m) is nn.Linear]
    alive_at_each_packing: list[int] = []
    pack = PackedLinear.__init__

    def counting_pack(self, *args, **kwargs) -> None:
        pack(self, *args, **kwargs)
        alive_at_each_packing.append(sum(ref() is not None for ref in plain_weights))

    monkeypatch.setattr(PackedLinear, "__init__", counting_pack)
    format_weights(model, CPU, torch.bfloat16)
    assert len(alive_at_each_packing) == len(plain_weights) == 4 * CONFIG["n_layer"] + 1
    # At most a layer's Linears (its attention's two) wait beside their copies; the rest are gone.
    assert max(alive - (len(plain_weights) - i) for i, alive in enumerate(alive_at_each_packing)) <= 2
    assert all(ref() is None for ref in plain_weights)


@needs_packing
def test_packed_linear_is_bit_identical_to_the_plain_one():
    torch.manual_seed(1)
    plain = nn.Linear(256, 96).to(torch.bfloat16)
    packed = PackedLinear(plain)
    for rows in (1, 7, 64):
        x = torch.randn(rows, 256).to(torch.bfloat16)
        assert torch.equal(packed(x), plain(x))


@needs_packing
def test_folded_gelu_rounds_once_so_it_is_closer_to_float32():
    torch.manual_seed(2)
    config = BloomConfig(hidden_size=256, n_head=4, n_layer=1, vocab_size=8)
    mlp = MLP(config).eval().to(torch.bfloat16)
    fc1 = mlp.dense_h_to_4h
    x = torch.randn(64, 256).to(torch.bfloat16)
    exact = torch.nn.functional.gelu(  # float32 throughout, from the same bfloat16 inputs
        torch.nn.functional.linear(x.float(), fc1.weight.float(), fc1.bias.float()), approximate="tanh"
    )
    unfused = mlp.gelu(fc1(x)).float()
    format_weights(mlp, CPU, torch.bfloat16, "packed")
    folded = mlp.gelu(mlp.dense_h_to_4h(x)).float()
    error_folded, error_unfused = (folded - exact).abs().mean(), (unfused - exact).abs().mean()
    assert error_folded < 0.8 * error_unfused, (error_folded, error_unfused)
    # and no output is further from float32 than one bfloat16 rounding of the result
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert bool(((folded - exact).abs() <= ulp).all())


def test_packing_applies_to_bfloat16_cpu_only(monkeypatch):
    monkeypatch.delenv("BLOOMDUO_CPU_PACKED_WEIGHTS", raising=False)
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert packing_applies(CPU, torch.bfloat16) == native
    assert not packing_applies(CPU, torch.float32)  # float32 stays bit for bit with transformers
    assert not packing_applies(torch.device("meta"), torch.bfloat16)
    monkeypatch.setenv("BLOOMDUO_CPU_PACKED_WEIGHTS", "0")
    assert not packing_applies(CPU, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_switched_off_the_plain_layout_stays_and_computes_the_same(monkeypatch, dtype):
    monkeypatch.setenv("BLOOMDUO_CPU_PACKED_WEIGHTS", "0")
    monkeypatch.setenv("BLOOMDUO_CPU_KERNELS", "eager")  # nn.Linear as it is: the fallback on every CPU
    reducer = _CountingReducer()
    model = _model(dtype, reducer)
    before = _steps(model, _hidden())
    assert format_weights(model, CPU, dtype).startswith(("eager", "blocks: eager"))
    assert not [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert all(isinstance(block.mlp.gelu, nn.GELU) for block in model.h)
    for want, got in zip(before, _steps(model, _hidden()), strict=True):
        assert torch.equal(got, want)
    assert reducer.calls == 2 * 2 * CONFIG["n_layer"] * 3


def test_switched_off_packing_is_never_chosen(monkeypatch):
    monkeypatch.setenv("BLOOMDUO_CPU_PACKED_WEIGHTS", "0")
    monkeypatch.delenv("BLOOMDUO_CPU_KERNELS", raising=False)
    model = _model(torch.bfloat16)
    format_weights(model, CPU, torch.bfloat16)
    assert not [m for m in model.modules() if isinstance(m, PackedLinear)]
    for want, got in zip(_steps(_model(torch.bfloat16), _hidden()), _steps(model, _hidden()), strict=True):
        assert relative_error(got, want, torch.bfloat16) < 4  # other kernels sum in another order


# Run in a fresh interpreter: oneDNN and ATen read their ISA caps once, at the first kernel.
_AVX2_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from tests.test_worker_weight_formats import CPU, _hidden, _model, _steps
    from tests._dist_helpers import AVX2_CLASS, needs_packing, relative_error
    from bloomduo.shard_worker.cpu_kernels import FP32, TILED_FP32, RoutedLinear
    from bloomduo.shard_worker.weight_formats import PackedLinear, format_weights, packing_applies

    model = _model(torch.bfloat16)
    format_weights(model, CPU, torch.bfloat16)
    routed = [m for m in model.modules() if isinstance(m, RoutedLinear)]
    errors = [
        relative_error(got, want, torch.bfloat16)
        for got, want in zip(_steps(model, _hidden()), _steps(_model(torch.float32), _hidden()))
    ]
    print(json.dumps({
        "capability": torch.backends.cpu.get_cpu_capability(),
        "packing": packing_applies(CPU, torch.bfloat16),
        "packed_modules": sum(isinstance(m, PackedLinear) for m in model.modules()),
        "errors": errors,
        "fp32_routes": any(m.route.paths & {FP32, TILED_FP32} for m in routed),
        "scratch_held": any(m.scratch._buffer is not None for m in routed),
    }))
    """
)


def test_an_avx2_class_cpu_keeps_the_plain_layout_and_is_correct():
    env = {**os.environ, **AVX2_CLASS}
    env.pop("BLOOMDUO_CPU_PACKED_WEIGHTS", None)
    env.pop("BLOOMDUO_CPU_KERNELS", None)
    result = subprocess.run(
        [sys.executable, "-c", _AVX2_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["capability"] in ("AVX2", "DEFAULT"), report  # the ATen cap took effect
    assert not report["packing"] and report["packed_modules"] == 0
    # bfloat16 rounds every layer's output; measured < 1 eps from float32 at the logits' scale
    assert max(report["errors"]) < 4, report
    # the probes timed the float32 paths here (bf16 is emulated); their scratch stays only if a route runs one
    assert report["scratch_held"] == report["fp32_routes"], report


def test_nz_format_only_on_the_npu_when_asked(monkeypatch):
    monkeypatch.setenv("BLOOMDUO_NPU_NZ", "1")
    assert npu_nz_requested("npu:0") and npu_nz_requested("npu")
    assert not npu_nz_requested("cpu") and not npu_nz_requested("cuda:0")
    monkeypatch.setenv("BLOOMDUO_NPU_NZ", "0")
    assert not npu_nz_requested("npu:0")
    monkeypatch.delenv("BLOOMDUO_NPU_NZ")
    assert not npu_nz_requested("npu:0")


def test_nz_format_casts_every_linear_weight_and_nothing_else(monkeypatch):
    casts = []

    def npu_format_cast(tensor, acl_format):
        casts.append((tensor, acl_format))
        return tensor.clone()

    monkeypatch.setitem(sys.modules, "torch_npu", types.SimpleNamespace(npu_format_cast=npu_format_cast))
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(10, 8),
            "qkv": nn.Linear(8, 24),
            "norm": nn.LayerNorm(8),
            "head": nn.Linear(8, 10, bias=False),
        }
    ).requires_grad_(False)
    before = {name: p for name, p in model.named_parameters()}
    monkeypatch.setenv("BLOOMDUO_NPU_NZ", "1")
    assert format_weights(model, torch.device("meta"), torch.float16) == "eager"  # meta: no npu here
    assert not casts
    assert to_npu_nz_format(model) is model
    assert [(tuple(t.shape), acl_format) for t, acl_format in casts] == [
        ((24, 8), NPU_FORMAT_FRACTAL_NZ),
        ((10, 8), NPU_FORMAT_FRACTAL_NZ),
    ]
    after = dict(model.named_parameters())
    changed = {name for name in before if after[name] is not before[name]}
    assert changed == {"qkv.weight", "head.weight"}
    assert all(isinstance(p, nn.Parameter) and not p.requires_grad for p in after.values())
    assert torch.equal(after["qkv.weight"], before["qkv.weight"])
