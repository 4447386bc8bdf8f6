"""int8 weights (`--quantize`, shard_worker/quantize.py): each Int8Linear's error stays within what
rounding its weights (and, for int8-dynamic, its activations) can cause; a quantized model keeps its
tensor-parallel all-reduces and close logits; a stack started with `up --quantize` serves from int8
weights, in a real two-rank group."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bloomduo.client import Client
from bloomduo.core.bloom_config import BloomConfig
from bloomduo.core.logprobs import summarize
from bloomduo.shard_worker import native, quantize
from bloomduo.shard_worker.distributed import import_torch_npu
from bloomduo.shard_worker.engine import ShardEngine, resolve_dtype
from bloomduo.shard_worker.model import Attention
from bloomduo.shard_worker.quantize import (
    INT8,
    INT8_DYNAMIC,
    Int8Linear,
    describe,
    per_channel_int8,
    quantize_linears,
    weight_bytes,
)
from bloomduo.shard_worker.step_plan import Chunk
from bloomduo.shard_worker.tensor_parallel import shard_layout
from tests._dist_helpers import AVX2_CLASS, relative_error
from tests.conftest import running_stack
from tests.test_worker_weight_formats import CONFIG, _CountingReducer, _hidden, _model, _steps

SCHEMES = [INT8, INT8_DYNAMIC]


def _linear(dtype: torch.dtype) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(1)
    linear = nn.Linear(256, 192).to(dtype).requires_grad_(False)
    x = torch.randn(33, 256).to(dtype)
    x[3, 7] = 9.0  # one outlier feature, as BLOOM's activations have
    return linear, x


def test_per_channel_weights_round_to_the_nearest_step():
    weight = torch.randn(48, 80, generator=torch.Generator().manual_seed(2))
    weight[5] = 0.0  # an all-zero row keeps a usable (tiny) scale
    q, scale = per_channel_int8(weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and scale.shape == (48,)
    assert bool(((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all())
    assert bool((q[5] == 0).all()) and scale[5] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows", [1, 4, 33])
def test_int8_linear_errs_no_more_than_its_rounding_allows(scheme, dtype, rows):
    """Bound per output: sum_k |x_k| * (weight step)/2, plus for int8-dynamic sum_k |w_k| * (activation
    step), plus one rounding of the output to `dtype` and its float32 accumulation."""
    linear, x = _linear(dtype)
    x = x[:rows]
    quantized = Int8Linear.from_linear(linear, scheme)
    got = quantized(x).double()
    w, b, xd = linear.weight.double(), linear.bias.double(), x.double()
    exact = xd @ w.T + b
    _, scale = per_channel_int8(linear.weight)
    bound = xd.abs() @ (scale.double()[:, None].expand_as(w)).T / 2
    if scheme == INT8_DYNAMIC:
        step = float(xd.max().clamp(min=0) - xd.min().clamp(max=0)) / 127  # 7-bit when reduce_range
        bound += step * (w.abs().sum(dim=1) + scale.double() * 127 / 2)[None, :]
    bound += torch.finfo(dtype).eps * (exact.abs() + bound) + 1e-6
    assert got.dtype == torch.float64 and quantized(x).dtype == dtype
    assert bool(((got - exact).abs() <= bound).all()), float(((got - exact).abs() / bound).max())
    assert float((got - exact).abs().max()) > 0  # it really computed from int8 weights
    row_sums = 192 * 4 if quantized.kernel == "native vnni" else 0  # int32 per output row
    assert quantized.nbytes == 192 * 256 + 192 * 4 + row_sums


def test_int8_dynamic_is_refused_off_the_cpu():
    linear = nn.Linear(8, 8, device="meta")
    with pytest.raises(ValueError, match="int8-dynamic runs on the CPU only"):
        Int8Linear.from_linear(linear, INT8_DYNAMIC)


def test_int8_on_an_npu_names_what_it_needs():
    with pytest.raises(ValueError, match="float16"):
        quantize._npu_weight_quant_kernel(torch.float32)
    if importlib.util.find_spec("torch_npu") is None:
        with pytest.raises(RuntimeError, match="needs the torch_npu package"):
            quantize._npu_weight_quant_kernel(torch.float16)


@pytest.mark.skipif(
    importlib.util.find_spec("torch_npu") is None, reason="needs an Ascend NPU with torch_npu"
)
def test_int8_on_an_npu_multiplies_through_torch_npus_weight_quant_matmul():
    import_torch_npu()  # registers the npu device
    linear, x = _linear(torch.float16)
    quantized = Int8Linear.from_linear(linear.to("npu:0"), INT8)
    assert quantized.kernel == "npu weight-quant"
    got = quantized(x.to("npu:0")).cpu()
    weight = quantized.weight_int8.cpu().double() * quantized.scale.cpu().double()[:, None]
    want = F.linear(x.double(), weight, linear.bias.cpu().double())
    # the weights widened and scaled in float16 (each product's own rounding), then the output's
    assert relative_error(got, want, torch.float16) <= 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_quantized_model_keeps_its_all_reduces_and_close_logits(scheme, dtype):
    full = _steps(_model(dtype), _hidden())
    reducer = _CountingReducer()
    model = _model(dtype, reducer)
    before = weight_bytes(model)
    quantize_linears(model, scheme)
    assert describe(model).startswith(scheme)
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    assert len([m for m in model.modules() if isinstance(m, Int8Linear)]) == 4 * CONFIG["n_layer"] + 1
    int8_linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    folded = [m for m in int8_linears if m.gelu]  # the MLP's GELU runs in bloomduo's kernels' float32 sums
    assert len(folded) == (CONFIG["n_layer"] if int8_linears[0].kernel.startswith("native") else 0)
    # float32 decode attends in bloomduo's kernel too: int8 workers are not held to transformers' float32
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attentions) == CONFIG["n_layer"] and all(m.native_float32 for m in attentions)
    matrices = sum(m.in_features * m.out_features for m in int8_linears)
    assert weight_bytes(model) < before - matrices * (dtype.itemsize - 1) + matrices // 10
    for want, got in zip(full, _steps(model, _hidden()), strict=True):
        assert got.dtype == dtype and relative_error(got, want, torch.bfloat16) < 16  # a few bf16 steps
    assert reducer.calls == 2 * 3 * CONFIG["n_layer"]  # attention and MLP, each of the 3 steps


def test_quantize_none_changes_nothing():
    model = _model(torch.float32)
    quantize_linears(model, "none")
    assert describe(model) == ""
    assert not any(m.native_float32 for m in model.modules() if isinstance(m, Attention))
    assert len([m for m in model.modules() if type(m) is nn.Linear]) == 4 * CONFIG["n_layer"] + 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_up_quantize_serves_from_int8_weights(demo_model, scheme):
    model_dir = demo_model()
    with running_stack(model_dir, dtype="bfloat16", quantize=scheme) as stack, Client(stack.target) as bloom:
        info = bloom.info()
        assert [kernels.split(" ")[0] for kernels in info.worker_kernels] == [scheme, scheme]
        result = bloom.generate("The int8 stack", max_new_tokens=6, ignore_eos=True, details=True)
        assert result.generated_tokens == 6
        assert len(result.tokens) == 6 and all(token.logprob <= 0 for token in result.tokens)


def test_an_avx2_class_cpu_quantizes_activations_to_7_bits_and_stays_within_bounds():
    """AVX2 int8 GEMMs (bloomduo's AVX2 form, fbgemm's) sum u8 x s8 pairs in int16, which 8-bit activations
    can saturate: on that class (simulated) int8-dynamic uses 7-bit activations, and the rounding bounds
    above still hold."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{__file__}::test_int8_linear_errs_no_more_than_its_rounding_allows",
            "-k",
            "int8-dynamic",
        ],
        env={**os.environ, **AVX2_CLASS},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-2000:]
    probe = (
        "from bloomduo.shard_worker import native, quantize; "
        "print(quantize.vnni_available(), native.vnni_form() == native.AVX2_FORM)"
    )
    check = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, **AVX2_CLASS}, capture_output=True, text=True
    )
    assert check.stdout.split() == ["False", "True"], check.stderr


def test_auto_dtype_gives_int8_dynamic_float32_activations_where_fbgemm_runs_it():
    """fbgemm's int8 GEMM takes float32 activations: bfloat16 between Linears would only add conversions.
    The VNNI kernel reads bfloat16 rows itself: where it runs (AVX2 and up) the checkpoint's dtype stays."""
    cpu = torch.device("cpu")
    want = torch.bfloat16 if native.runs_vnni() else torch.float32
    assert resolve_dtype("auto", torch.bfloat16, cpu, INT8_DYNAMIC) == want
    assert resolve_dtype("auto", torch.bfloat16, cpu, INT8) == torch.bfloat16
    assert resolve_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.float32, cpu, INT8_DYNAMIC) == torch.bfloat16  # asked for


@pytest.mark.parametrize("scheme", ["none", *SCHEMES])
def test_int8_workers_summarize_float32_logits_in_bloomduos_kernel(scheme, monkeypatch):
    """A float32 worker held to transformers keeps torch's summaries; an int8 one takes the native kernel's:
    the same best token, and the log-sum-exp to float32 summation order."""
    model = _model(torch.float32)
    quantize_linears(model, scheme)
    engine = ShardEngine(
        model,
        shard_layout(BloomConfig(**CONFIG), 0, 1),
        device=torch.device("cpu"),
        dtype=torch.float32,
        model_name="tiny",
        kv_cache_slots=2,
    )
    native_calls = []
    native_summarize = native.summarize
    monkeypatch.setattr(native, "summarize", lambda rows: native_calls.append(rows) or native_summarize(rows))
    out = engine.step(_hidden()[:5], [Chunk(0, 0, 5)], [], full_logits=[False])
    assert engine.native_float32 == (scheme != "none")
    assert len(native_calls) == int(scheme != "none" and native.best_isa() >= native.AVX2)
    logits = engine.model(_hidden()[:5], [Chunk(1, 0, 5)], engine.cache)
    _, index, logsumexp = summarize(logits[:, : CONFIG["vocab_size"]])
    assert out.best_token == index.tolist()
    torch.testing.assert_close(torch.tensor(out.logsumexp), logsumexp, rtol=1e-6, atol=0)
