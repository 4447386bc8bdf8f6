"""A step's blocks in one native call (fused_blocks.py) against model.py's loop over the same kernels."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bloomduo.shard_worker import native
from bloomduo.shard_worker.cpu_kernels import KERNELS_ENV, candidate_paths
from bloomduo.shard_worker.distributed import ShardGroup, init_distributed, shutdown_distributed
from bloomduo.shard_worker.fused_blocks import ENV, FusedBlocks
from bloomduo.shard_worker.model import BloomShardModel
from bloomduo.shard_worker.step_plan import Chunk
from bloomduo.shard_worker.tensor_parallel import add_all_reduces, load_shard
from bloomduo.shard_worker.weight_formats import format_weights, packing_applies
from tests._dist_helpers import make_checkpoint, relative_error

CPU = torch.device("cpu")
# head_dim 16 and widths in 64s: the shapes the attention kernel and every weight layout take
SMALL = dict(vocab_size=1009, hidden_size=128, n_layer=2, n_head=8, layer_norm_epsilon=1e-5)
PROMPT = 6  # tokens of each of sequences 0, 1, 2
# The two sides run the same kernels on the same operands; LayerNorm's moments are summed in another order in
# C (a bf16 output may differ in its last bit), and a step's differences reach the next through the cache.
ROUNDINGS = 8

pytestmark = pytest.mark.skipif(
    not native.available() or native.best_isa() < native.AVX2,
    reason="the fused blocks run bloomduo's kernels, which need the built extension and AVX2 or better",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("fused_bloom")
    make_checkpoint(model_dir, config=SMALL)
    return model_dir


def _model(
    model_dir: Path,
    dtype: torch.dtype,
    quantize: str,
    group: ShardGroup | None = None,
    rank=0,
    world=1,
    route: str = "tiled",
):
    """The shard's model, its bf16 Linears on `route` (native.py's tiles or its row blocks)."""
    model = load_shard(model_dir, rank, world, device=CPU, dtype=dtype, quantize=quantize, group=group)
    format_weights(model, CPU, dtype, route if quantize == "none" else "auto", group)
    return model


class _Counted:
    """A FusedBlocks that counts the steps it took."""

    def __init__(self, fused: FusedBlocks) -> None:
        self.fused, self.steps = fused, 0

    def __call__(self, *args):
        out = self.fused(*args)
        self.steps += out is not None
        return out


def _steps(dtype: torch.dtype, world: int = 1) -> list[tuple[torch.Tensor, list[Chunk], list[int]]]:
    """Hidden states, chunks and sequences to free first: three prompts of one length, two decode steps of all
    three, one of sequences 0 and 2 (slots 0 and 2: not the rows' own), then a step mixing a new prompt with
    a decode row (the loop's)."""
    generator = torch.Generator().manual_seed(world)
    hidden = lambda rows: torch.randn(rows, SMALL["hidden_size"], generator=generator).to(dtype)  # noqa: E731
    steps = [(hidden(3 * PROMPT), [Chunk(s, 0, PROMPT) for s in range(3)], [])]
    for i in range(2):
        steps.append((hidden(3), [Chunk(s, PROMPT + i, 1) for s in range(3)], []))
    steps.append((hidden(2), [Chunk(0, PROMPT + 2, 1), Chunk(2, PROMPT + 2, 1)], [1]))
    steps.append((hidden(6), [Chunk(3, 0, 5), Chunk(2, PROMPT + 3, 1)], []))
    return steps


def _fused_steps(dtype: torch.dtype) -> int:
    """How many of _steps' steps run in one call: the decode ones, and the prompts where their kernel runs."""
    query = torch.empty(1, SMALL["n_head"], SMALL["hidden_size"] // SMALL["n_head"], dtype=dtype)
    return 3 + native.attends(query, query)


def _run(model: BloomShardModel, steps) -> tuple[list[torch.Tensor], object]:
    cache = model.new_kv_cache(initial_capacity=16, initial_slots=2)  # the decode steps grow it
    outputs = []
    with torch.inference_mode():
        for hidden, chunks, free in steps:
            for sequence_id in free:
                cache.free(sequence_id)
            outputs.append(model.blocks(hidden, chunks, cache))
    return outputs, cache


@pytest.mark.parametrize(
    "dtype, quantize, route",
    [
        (torch.bfloat16, "none", "tiled"),
        (torch.bfloat16, "none", "row-blocks"),  # the AVX2 class's choice; VDPBF16PS reads it on AVX512-BF16
        (torch.bfloat16, "int8", "auto"),
        (torch.bfloat16, "int8-dynamic", "auto"),
        (torch.float32, "int8-dynamic", "auto"),
    ],
)
def test_a_step_in_one_call_computes_what_the_layer_loop_does(model_dir, dtype, quantize, route, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    model = _model(model_dir, dtype, quantize, route=route)
    fused = FusedBlocks.build(model)
    assert fused is not None
    steps = _steps(dtype)
    looped, looped_cache = _run(model, steps)
    model.fused_blocks = counted = _Counted(fused)
    got, cache = _run(model, steps)
    assert counted.steps == _fused_steps(dtype)
    for step, (out, want) in enumerate(zip(got, looped, strict=True)):
        error = relative_error(out, want, dtype)
        assert error <= ROUNDINGS, f"step {step}: {error:.3g} eps from the layer loop"
    for name in ("keys", "values"):  # the new tokens' keys and values went where the loop puts them
        error = relative_error(getattr(cache, name), getattr(looped_cache, name), dtype)
        assert error <= ROUNDINGS, f"{name}: {error:.3g} eps"
        stored = getattr(cache, name)[:, 2, :, : PROMPT + 4]
        assert stored.abs().amax(dim=(0, 1, 3)).min() > 0  # every position of sequence 2 written


def test_the_loop_keeps_what_one_call_cannot_take(model_dir, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    # float32 workers held to transformers' numbers keep torch's Linears and attention
    assert FusedBlocks.build(_model(model_dir, torch.float32, "none")) is None
    monkeypatch.setenv(ENV, "0")
    assert FusedBlocks.build(_model(model_dir, torch.bfloat16, "int8-dynamic")) is None
    monkeypatch.delenv(ENV)
    # a route that leaves the kernels from 3 rows: two rows run in one call, three in the loop
    paths = candidate_paths(packing_applies(CPU, torch.bfloat16))
    monkeypatch.setenv(KERNELS_ENV, "native,packed@3" if "native" in paths else "tiled,tiled-fp32@3")
    model = load_shard(model_dir, 0, 1, device=CPU, dtype=torch.bfloat16)
    format_weights(model, CPU, torch.bfloat16)
    fused = FusedBlocks.build(model)
    assert fused is not None and fused.records(2) is not None and fused.records(3) is None
    model.fused_blocks = counted = _Counted(fused)
    _run(model, _steps(torch.bfloat16))
    assert counted.steps == 1  # the last step's two rows


def test_a_hidden_size_the_layer_norm_lanes_do_not_divide_is_refused_by_name():
    # _kernels.c's LayerNorm sums NORM_LANES lanes of whole vectors: build() keeps such a model in the loop
    operands = [0] * 22
    operands[2], operands[3] = 1, native.NORM_LANES + 8  # one row of a hidden size of 24
    with pytest.raises(ValueError, match=f"multiple of {native.NORM_LANES}, got 24"):
        native.blocks(*operands, 1.0, 1e-5, dtype=torch.bfloat16, residual_from_normed=False)


class _FailingReducer:
    """A one-rank group's shared-memory all-reduce failing its `fail_at`-th call, as when a peer vanished."""

    segment = native.NO_SEGMENT  # no shared memory: every call comes here

    def __init__(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def fits(self, tensor: torch.Tensor) -> bool:
        return True

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("shared-memory all-reduce on rank 0: rank 1 (pid 7) exited before call #3")
        return tensor


def test_an_all_reduce_that_fails_mid_step_raises_and_the_cache_is_untouched(model_dir):
    model = _model(model_dir, torch.bfloat16, "int8-dynamic")
    reducer = _FailingReducer(fail_at=2 * SMALL["n_layer"] + 3)  # the first decode step's third all-reduce
    add_all_reduces(model, ShardGroup(process_group=None, shm=reducer))
    model.fused_blocks = FusedBlocks.build(model)
    steps = _steps(torch.bfloat16)
    cache = model.new_kv_cache(initial_capacity=16)
    with torch.inference_mode():
        model.blocks(*steps[0][:2], cache)
        with pytest.raises(RuntimeError, match="exited before call #3"):
            model.blocks(*steps[1][:2], cache)
        assert [cache.length(s) for s in range(3)] == [PROMPT] * 3  # nothing committed
        retried = model.blocks(*steps[1][:2], cache)  # the same step again, now that the reducer answers
    assert reducer.calls == 2 * SMALL["n_layer"] + 3 + 2 * SMALL["n_layer"]
    # what the step gives where nothing failed: the failed call's stored keys and values were written over
    assert torch.equal(retried, _run(model, steps[:2])[0][1])


@pytest.mark.parametrize("isa", [native.SCALAR, native.AVX2])
@pytest.mark.parametrize("route", ["tiled", "row-blocks"])
def test_every_isa_level_computes_the_same_step(model_dir, isa, route):
    """The call at a lower ISA (the AVX2 class's, and the scalar reference) against the best one here."""
    model = _model(model_dir, torch.bfloat16, "none", route=route)
    fused = FusedBlocks.build(model)
    steps = _steps(torch.bfloat16)
    outputs = []
    for level in (native.best_isa(), isa):
        model.fused_blocks = lambda x, plan, cache, level=level: fused(x, plan, cache, isa=level)
        outputs.append(_run(model, steps)[0])
    for step, (got, want) in enumerate(zip(outputs[1], outputs[0], strict=True)):
        error = relative_error(got, want, torch.bfloat16)
        assert error <= ROUNDINGS, f"step {step} at ISA {isa}: {error:.3g} eps"


def _rank(rank: int, world: int, init_method: str, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    group = init_distributed(rank, world, init_method, CPU, timeout_s=60)
    try:
        model = _model(Path(model_dir), torch.bfloat16, "int8-dynamic", group, rank, world)
        steps = _steps(torch.bfloat16, world)
        looped, _ = _run(model, steps)
        model.fused_blocks = counted = _Counted(FusedBlocks.build(model))
        fused, _ = _run(model, steps)
        torch.save(
            {"looped": looped, "fused": fused, "steps": counted.steps}, Path(out_dir) / f"rank{rank}.pt"
        )
    finally:
        shutdown_distributed(group)


def test_two_ranks_sum_their_halves_in_one_call_and_agree(model_dir, tmp_path):
    world = 2
    init_method = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank, args=(world, init_method, str(model_dir), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert [r["steps"] for r in ranks] == [_fused_steps(torch.bfloat16)] * world
    for step in range(len(ranks[0]["fused"])):
        # every rank ends each step with the same residual stream, bit for bit
        assert torch.equal(ranks[0]["fused"][step], ranks[1]["fused"][step])
        error = relative_error(ranks[0]["fused"][step], ranks[0]["looped"][step], torch.bfloat16)
        assert error <= ROUNDINGS, f"step {step}: {error:.3g} eps from the layer loop"


def test_a_worker_runs_its_steps_in_one_call_and_says_so(model_dir, tmp_path):
    """The worker's own engine: Info's kernels name the fused blocks; its logits and clear greedy tokens are
    the loop's."""
    from bloomduo.shard_worker.config import ShardOptions
    from bloomduo.shard_worker.engine import ShardEngine

    options = ShardOptions(
        model_dir=model_dir,
        rank=0,
        world_size=1,
        dist_init=f"file://{tmp_path / 'rendezvous'}",
        dtype="bfloat16",
        quantize="int8-dynamic",
    )
    # load and steps on a thread of their own, as a worker's step thread: load() turns on flush-denormal for
    # the thread it runs on, which must not carry over to the pytest thread the other tests run on
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="step") as step_thread:
        engine = step_thread.submit(ShardEngine.load, options).result()
        try:
            assert engine.kernels.endswith(", blocks in one native call")
            counted = _Counted(engine.model.fused_blocks)
            answers = [step_thread.submit(_greedy_answers, engine, counted).result()]
            answers.append(step_thread.submit(_greedy_answers, engine, None).result())
        finally:
            shutdown_distributed()
    assert counted.steps == _fused_steps(torch.bfloat16)
    for step, (got, want) in enumerate(zip(*answers, strict=True)):
        error = relative_error(got, want, torch.bfloat16)
        assert error <= ROUNDINGS, f"step {step}: logits {error:.3g} eps from the loop's"
        # the same greedy token wherever the loop's best is clear of the runner-up by more than that bound
        top = want.float().topk(2, dim=-1).values
        clear = (top[:, 0] - top[:, 1]) > 2 * ROUNDINGS * torch.finfo(torch.bfloat16).eps * want.abs().max()
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), f"step {step}: greedy tokens"


def _greedy_answers(engine, blocks) -> list[torch.Tensor]:
    """Each of _steps' logits rows from a fresh cache, the engine's blocks run by `blocks`."""
    engine.model.fused_blocks = blocks
    engine.reset()
    return [engine.step(h, chunks, free).logits for h, chunks, free in _steps(torch.bfloat16)]
