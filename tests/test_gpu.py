"""The GPU path: triton_int8's weight-only int8 kernel, and the stack serving on cuda.

The kernel's arithmetic is checked on any machine with Triton through Triton's interpreter (numpy on the
CPU), the same kernel source the GPU compiles; everything else here needs a CUDA device and says so when it
is skipped. The CPU twin of every GPU choice (float32 parity, int8 through the CPU kernels) is tested on
every machine by test_parity.py and test_quantize.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bloomduo.apps.demo_model import write_demo_model
from bloomduo.client import Client
from bloomduo.core.checkpoint import Checkpoint
from bloomduo.shard_worker import triton_int8
from tests.conftest import running_stack
from tests.test_parity import assert_matches_transformers

needs_triton = pytest.mark.skipif(not triton_int8.triton_installed(), reason="Triton is not installed here")


def interpreter_runs() -> bool:
    """Triton's interpreter before 3.9 turns 1-element arrays into loop bounds with int(), which numpy >= 2.5
    refuses (seen with Triton 3.6 on a GPU machine)."""
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split(".")[:2])

    return major_minor(triton.__version__) >= (3, 9) or major_minor(numpy.__version__) < (2, 5)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible")

# (rows, out_features, in_features): one row and a few (decode, K split), ragged edges on every axis,
# and more rows than one tile (prefill)
INTERPRETED_SHAPES = [(1, 40, 1100), (3, 130, 96), (17, 64, 300), (70, 200, 260)]
GPU_SHAPES = [
    (1, 4096, 4096),
    (1, 4096, 16384),
    (5, 12288, 4096),
    (16, 1000, 4096),
    (17, 4096, 4096),
    (300, 1000, 4000),
]


def check_against_float64(device: str, shapes: list[tuple[int, int, int]], dtypes: list[torch.dtype]) -> None:
    """int8_linear's outputs, with and without a bias, under its own tiling and a forced 4-way split, lie
    within one rounding of the output dtype of the float64 product of the same int8 weight and scales."""
    generator = torch.Generator().manual_seed(0)
    for rows, out_features, in_features in shapes:
        for dtype in dtypes:
            x = torch.randn(rows, in_features, generator=generator).to(device, dtype)
            weight = torch.randint(
                -127, 128, (out_features, in_features), generator=generator, dtype=torch.int8
            )
            scale = torch.rand(out_features, generator=generator).add_(0.5).div_(1000)
            bias = torch.randn(out_features, generator=generator).to(dtype)
            weight, scale, bias = weight.to(device), scale.to(device), bias.to(device)
            triton_int8.warm_up(weight, scale, bias, dtype)  # what a worker compiles at start
            product = (x.double() @ weight.double().T) * scale.double()
            for with_bias in (False, True):
                want = product + bias.double() if with_bias else product
                for shape in (None, triton_int8.Tiling(16, 32, 32, split=4)):
                    got = triton_int8.int8_linear(x, weight, scale, bias if with_bias else None, shape)
                    assert got.dtype == dtype and got.shape == (rows, out_features)
                    # one rounding to dtype (half an ulp), float32 sums far below it
                    bound = torch.finfo(dtype).eps * want.abs().max().item()
                    error = (got.double() - want).abs().max().item()
                    assert error <= bound, (
                        rows,
                        out_features,
                        in_features,
                        dtype,
                        with_bias,
                        shape,
                        error,
                        bound,
                    )


@needs_triton
def test_the_int8_kernel_computes_within_one_rounding_in_tritons_interpreter():
    if not interpreter_runs():
        pytest.skip("Triton's interpreter before 3.9 fails on numpy >= 2.5; the GPU test runs the kernel")
    code = (
        "import torch; from tests.test_gpu import check_against_float64, INTERPRETED_SHAPES; "
        "check_against_float64('cpu', INTERPRETED_SHAPES, [torch.float16])"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_tiling_splits_k_only_where_output_tiles_are_too_few():
    decode = triton_int8.tiling(1, 4096, 16384, multiprocessors=132)
    assert (decode.block_m, decode.split) == (16, 1)  # 128 output tiles: a wave
    narrow = triton_int8.tiling(1, 64, 16384, multiprocessors=132)
    assert narrow.split == 32  # 2 output tiles: 64 programs, each 2 steps of K
    lm_head = triton_int8.tiling(1, 250880, 4096, multiprocessors=132)
    assert lm_head.split == 1  # 3920 output tiles already
    prefill = triton_int8.tiling(512, 4096, 4096, multiprocessors=132)
    assert (prefill.block_m, prefill.split) == (128, 1)
    short = triton_int8.tiling(1, 64, 512, multiprocessors=132)
    assert short.split == 1  # each part keeps two steps of K


@needs_cuda
@needs_triton
def test_the_int8_kernel_computes_within_one_rounding_on_the_gpu():
    check_against_float64("cuda", GPU_SHAPES, [torch.float16, torch.bfloat16])


@needs_cuda
def test_the_stack_on_cuda_gives_transformers_tokens_and_logprobs(demo_model):
    model_dir = demo_model()
    shards = min(2, torch.cuda.device_count())  # NCCL takes one rank per GPU
    with running_stack(model_dir, num_shards=shards, device="cuda", dtype="float32") as stack:
        assert_matches_transformers(stack.target, model_dir)


@needs_cuda
@needs_triton
def test_the_stack_on_cuda_serves_int8_weights_through_triton(demo_model):
    model_dir = demo_model()
    with (
        running_stack(model_dir, num_shards=1, device="cuda", dtype="float16", quantize="int8") as stack,
        Client(stack.target) as bloom,
    ):
        assert bloom.info().worker_kernels == ["int8 (triton), decode steps as CUDA graphs"]
        result = bloom.generate("The int8 stack", max_new_tokens=8, ignore_eos=True, details=True)
        assert result.generated_tokens == 8 and all(token.logprob <= 0 for token in result.tokens)


@needs_cuda
def test_demo_weights_drawn_on_the_gpu_are_other_weights_of_the_same_shapes(tmp_path):
    on_cpu = Checkpoint(write_demo_model(tmp_path / "cpu", "tiny", seed=3))
    on_gpu = Checkpoint(write_demo_model(tmp_path / "gpu", "tiny", seed=3, draw_on="cuda"))
    again = Checkpoint(write_demo_model(tmp_path / "again", "tiny", seed=3, draw_on="cuda"))
    assert on_gpu.names() == on_cpu.names()
    name = "h.0.mlp.dense_h_to_4h.weight"
    assert on_gpu.read(name).shape == on_cpu.read(name).shape
    assert not torch.equal(on_gpu.read(name), on_cpu.read(name))
    assert torch.equal(on_gpu.read(name), again.read(name))
