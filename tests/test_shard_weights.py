"""`bloomduo shard-weights` cuts a checkpoint into rank files that the real stack serves unchanged."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bloomduo.apps import shard_weights
from bloomduo.client import Client
from bloomduo.core.checkpoint import Checkpoint, CheckpointError
from bloomduo.shard_worker.tensor_parallel import load_shard
from tests.conftest import running_stack

PROMPTS = ["The quick brown fox", "北京是中国的首都，", "def add(a, b):\n    return"]
NEW_TOKENS = 16


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    shard_weights.add_arguments(parser)
    return shard_weights.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def cut_model(demo_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cut") / "tiny-2"
    assert _run("--model", str(demo_model()), "--num-shards", "2", "--out", str(out)) == 0
    return out


def _greedy(target: str) -> list[tuple[list[int], list[float]]]:
    with Client(target) as bloom:
        results = [
            bloom.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, details=True)
            for prompt in PROMPTS
        ]
    return [([t.id for t in r.tokens], [t.logprob for t in r.tokens]) for r in results]


def test_the_cut_serves_the_same_tokens_and_logprobs(tiny_stack, cut_model: Path) -> None:
    expected = _greedy(tiny_stack.target)  # tiny_stack serves the uncut demo model
    with running_stack(cut_model, num_shards=2) as stack:
        served = _greedy(stack.target)
    for prompt, (ids, logprobs), (expected_ids, expected_logprobs) in zip(
        PROMPTS, served, expected, strict=True
    ):
        assert ids == expected_ids, prompt
        # the same float32 weights and the same arithmetic: at most a few float32 roundings apart
        tolerance = 4 * torch.finfo(torch.float32).eps * max(map(abs, expected_logprobs))
        assert logprobs == pytest.approx(expected_logprobs, rel=0, abs=tolerance), prompt


def test_the_layout(demo_model: Callable[..., Path], cut_model: Path) -> None:
    full = Checkpoint(demo_model())
    cut = Checkpoint(cut_model)
    assert cut.num_shards == 2 and full.num_shards is None
    assert {"tokenizer.json", "gateway.safetensors", "rank-00001-of-00002.safetensors"} <= {
        path.name for path in cut_model.iterdir()
    }
    # What the gateway reads, served from bloomduo.gateway.safetensors.
    assert torch.equal(cut.mmap("word_embeddings.weight"), full.mmap("word_embeddings.weight"))
    assert torch.equal(
        cut.read("word_embeddings_layernorm.bias"), full.read("word_embeddings_layernorm.bias")
    )

    block_bytes = sum(_nbytes(full, name) for name in full.names() if name.startswith("h."))
    for rank in range(2):
        part = cut.rank_part(rank, 2)
        rank_block_bytes = sum(_nbytes(part, name) for name in part.names() if name.startswith("h."))
        assert 0.45 * block_bytes < rank_block_bytes < 0.55 * block_bytes
        assert part.has("lm_head.weight") and part.has("h.0.self_attention.query_key_value.weight")
        assert part.has("h.0.self_attention.dense.bias") == (rank == 0)  # row-parallel biases: once
        assert part.read("h.2.mlp.dense_4h_to_h.weight").equal(
            full.read("h.2.mlp.dense_4h_to_h.weight", 1, rank * 192, (rank + 1) * 192)
        )


def test_a_world_size_mismatch_says_how_to_fix_it(cut_model: Path) -> None:
    with pytest.raises(CheckpointError, match=r"cut for 2 shards but the world size is 3.*--num-shards 3"):
        load_shard(Checkpoint(cut_model), 0, 3, device=torch.device("cpu"), dtype=torch.float32)


def test_refuses_bad_requests(
    demo_model: Callable[..., Path], cut_model: Path, tmp_path: Path, capsys
) -> None:
    assert _run("--model", str(cut_model), "--num-shards", "2", "--out", str(tmp_path / "again")) == 1
    assert "already cut" in capsys.readouterr().err
    assert _run("--model", str(demo_model()), "--num-shards", "5", "--out", str(tmp_path / "five")) == 1
    assert "must divide n_head 12" in capsys.readouterr().err


def _nbytes(checkpoint: Checkpoint, name: str) -> int:
    return math.prod(checkpoint.shape(name)) * checkpoint.dtype(name).itemsize


@pytest.fixture(scope="module")
def int8_cut(demo_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cut") / "tiny-2-int8"
    argv = ["--model", str(demo_model()), "--num-shards", "2", "--out", str(out), "--quantize", "int8"]
    assert _run(*argv) == 0
    return out


def test_an_int8_cut_holds_what_quantizing_at_start_makes(
    demo_model: Callable[..., Path], cut_model: Path, int8_cut: Path
) -> None:
    cut = Checkpoint(int8_cut)
    assert cut.quantized == "int8" and Checkpoint(cut_model).quantized is None
    cpu = torch.device("cpu")
    for rank in range(2):
        part = cut.rank_part(rank, 2)
        assert part.dtype("h.1.mlp.dense_4h_to_h.weight") == torch.int8
        assert part.dtype("lm_head.weight") == torch.int8 and part.has("lm_head.weight_scale")
        float_part = Checkpoint(cut_model).rank_part(rank, 2)
        assert part.dtype("h.1.mlp.dense_h_to_4h.bias") == float_part.dtype("h.1.mlp.dense_h_to_4h.bias")
        # quantized at start from the full checkpoint, and read as stored from the cut: the same buffers
        at_start = load_shard(demo_model(), rank, 2, device=cpu, dtype=torch.float32, quantize="int8")
        from_cut = load_shard(cut, rank, 2, device=cpu, dtype=torch.float32, quantize="int8")
        want, got = at_start.state_dict(), from_cut.state_dict()
        assert want.keys() == got.keys() and any(name.endswith("weight_int8") for name in got)
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), name
    int8_bytes = sum(_nbytes(cut.rank_part(0, 2), n) for n in cut.rank_part(0, 2).names())
    float_bytes = sum(
        _nbytes(Checkpoint(cut_model).rank_part(0, 2), n)
        for n in cut.rank_part(0, 2).names()
        if not n.endswith("_scale")
    )
    assert int8_bytes < 0.3 * float_bytes  # float32 demo weights: a quarter, plus scales, biases, norms


def test_an_int8_cut_serves_as_quantizing_at_start_does_and_refuses_without(
    demo_model: Callable[..., Path], int8_cut: Path
) -> None:
    with pytest.raises(ValueError, match=r"holds int8 weights.*--quantize int8 or int8-dynamic"):
        load_shard(Checkpoint(int8_cut), 0, 2, device=torch.device("cpu"), dtype=torch.float32)
    with running_stack(int8_cut, num_shards=2, quantize="int8") as stack:
        with Client(stack.target) as bloom:
            assert [kernels.split(" ")[0] for kernels in bloom.info().worker_kernels] == ["int8", "int8"]
        served = _greedy(stack.target)
    with running_stack(demo_model(), num_shards=2, quantize="int8") as stack:
        assert served == _greedy(stack.target)  # the same int8 weights and scales, the same arithmetic
