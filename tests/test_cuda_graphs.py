"""Decode steps replayed as CUDA graphs (cuda_graphs.py) against model.py's loop over the same steps.

The padded step a graph records (rows to a bucket, keys to a power of two, padding in free slots) runs on
every machine without a graph (`record=False`), the CPU twin; recorded and replayed, it needs a CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bloomduo.shard_worker.cuda_graphs import ENV, DecodeGraphs, key_bucket
from bloomduo.shard_worker.model import BloomShardModel
from bloomduo.shard_worker.step_plan import Chunk
from bloomduo.shard_worker.tensor_parallel import load_shard
from tests._dist_helpers import make_checkpoint, relative_error

SMALL = dict(vocab_size=1009, hidden_size=128, n_layer=2, n_head=8, layer_norm_epsilon=1e-5)
PROMPT = 6
# Each step reads its keys over another length (masked keys weigh exactly 0, but sums may run in another
# order), and a step's differences reach the next through the cache.
ROUNDINGS = 16
GRAPHED_STEPS = 15  # of _steps' steps, those the graphs take

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("graphed_bloom")
    make_checkpoint(model_dir, config=SMALL)
    return model_dir


def _steps() -> list[tuple[torch.Tensor, list[Chunk], list[int]]]:
    """Hidden states, chunks, and sequences to free first: four prompts; three of them decode while the
    fourth holds the slot their padding would take (not graphed); all four decode (graphed); the fourth goes
    and the three decode 14 times (graphed, the cache growing past 16 positions on the way); then sequences
    that do not sit in their rows' slots (not graphed)."""
    generator = torch.Generator().manual_seed(0)
    hidden = lambda rows: torch.randn(rows, SMALL["hidden_size"], generator=generator)  # noqa: E731
    steps = [(hidden(4 * PROMPT), [Chunk(s, 0, PROMPT) for s in range(4)], [])]
    steps.append((hidden(3), [Chunk(s, PROMPT, 1) for s in range(3)], []))
    steps.append((hidden(4), [Chunk(s, PROMPT + 1 - (s == 3), 1) for s in range(4)], []))
    for i in range(14):
        steps.append((hidden(3), [Chunk(s, PROMPT + 2 + i, 1) for s in range(3)], [3] if i == 0 else []))
    steps.append((hidden(2), [Chunk(0, PROMPT + 16, 1), Chunk(2, PROMPT + 16, 1)], []))
    steps.append((hidden(1), [Chunk(1, PROMPT + 16, 1)], []))
    return steps


def _run(model: BloomShardModel, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every step's blocks output, and the keys of the slots sequences 0..2 hold."""
    cache = model.new_kv_cache(initial_capacity=16, initial_slots=2)
    device = model.ln_f.weight.device
    outputs = []
    with torch.inference_mode():
        for hidden, chunks, free in _steps():
            for sequence_id in free:
                cache.free(sequence_id)
            outputs.append(model.blocks(hidden.to(device, dtype), chunks, cache).cpu())
    used = [cache.slot(s) for s in range(3)]
    return outputs, cache.keys[:, used, :, : PROMPT + 17].cpu()


def _compare(model_dir: Path, device: str, dtype: torch.dtype, record: bool) -> DecodeGraphs:
    model = load_shard(model_dir, 0, 1, device=torch.device(device), dtype=dtype)
    looped, looped_keys = _run(model, dtype)
    model.fused_blocks = graphs = DecodeGraphs(model, record=record)
    got, keys = _run(model, dtype)
    assert graphs.padded_steps == GRAPHED_STEPS
    for step, (out, want) in enumerate(zip(got, looped, strict=True)):
        error = relative_error(out, want, dtype)
        assert error <= ROUNDINGS, f"step {step}: {error:.3g} eps from the layer loop"
    assert relative_error(keys, looped_keys, dtype) <= ROUNDINGS
    return graphs


def test_key_buckets_are_powers_of_two_within_the_cache():
    assert [key_bucket(n, 1024) for n in (1, 128, 129, 300, 513)] == [128, 128, 256, 512, 1024]
    assert key_bucket(150, 160) == 160


def test_the_padded_step_computes_what_the_layer_loop_does(model_dir):
    _compare(model_dir, "cpu", torch.float32, record=False)


def test_graphs_are_built_only_for_cuda(model_dir, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert (
        DecodeGraphs.build(load_shard(model_dir, 0, 1, device=torch.device("cpu"), dtype=torch.float32), 1)
        is None
    )


@pytest.fixture
def as_a_worker_attends():
    """cuDNN's attention off, as engine.py turns it off in a CUDA worker."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    yield
    torch.backends.cuda.enable_cudnn_sdp(was)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replayed_graphs_compute_what_the_layer_loop_does(model_dir, dtype, as_a_worker_attends):
    graphs = _compare(model_dir, "cuda", dtype, record=True)
    assert not graphs.failed
    assert graphs.graphs  # recorded after the cache last grew, for the addresses it has now
    assert graphs.cache_address is not None


@needs_cuda
def test_graphs_stay_off_for_more_ranks_and_when_turned_off(model_dir, monkeypatch):
    model = load_shard(model_dir, 0, 1, device=torch.device("cuda"), dtype=torch.float16)
    monkeypatch.delenv(ENV, raising=False)
    assert DecodeGraphs.build(model, 1) is not None
    assert DecodeGraphs.build(model, 2) is None
    monkeypatch.setenv(ENV, "0")
    assert DecodeGraphs.build(model, 1) is None
