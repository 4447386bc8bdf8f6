"""The shared-memory all-reduce against gloo, on real processes joined by a real gloo group.

Every rank draws its tensors from a seed of (rank, step), so each can also rebuild its peers' tensors
and compute the sum in rank order locally: the shared-memory result must equal that bit for bit on
every rank, and gloo's result exactly for W = 2 (and for integer-valued tensors at any W, where the
order of additions cannot matter).

`python -m tests.test_shm_allreduce` prints median latencies, gloo against shared memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bloomduo.shard_worker import native
from bloomduo.shard_worker.distributed import (
    all_reduce_sum,
    init_distributed,
    shutdown_distributed,
)

SLOT_BYTES = 64 << 10  # small, so that a [16, 1024] float32 tensor already goes through gloo
SHAPES = [(4096,), (16, 1024), (3, 5, 7), (1,), (2, 0), ()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RACE_STEPS = 1500

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /dev/shm and /proc")


def _rank_tensor(rank: int, step: int, shape: tuple[int, ...], dtype: torch.dtype, integers: bool = False):
    generator = torch.Generator().manual_seed(rank * 1_000_003 + step)
    if integers:  # sums of W of these are exact in every dtype, whatever the order
        return torch.randint(-64, 65, shape, generator=generator).to(dtype)
    return torch.randn(shape, generator=generator).to(dtype)


def _rank_order_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0] + parts[1]
    for part in parts[2:]:
        total = total + part
    return total


def _spawn(body, world_size: int, tmp_path: Path, *extra) -> None:
    init_method = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(body, args=(world_size, init_method, str(tmp_path), *extra), nprocs=world_size, join=True)


def _join(rank: int, world_size: int, init_method: str, timeout_s: float):
    torch.set_num_threads(1)
    os.environ["BLOOMDUO_SHM_ALLREDUCE_BYTES"] = str(SLOT_BYTES)
    return init_distributed(rank, world_size, init_method, "cpu", timeout_s=timeout_s)


def _agree_with_gloo(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    group = _join(rank, world_size, init_method, timeout_s=60)
    reducer = group.shm
    assert reducer is not None, "ranks on one cpu host must get the shared-memory all-reduce"
    dist.barrier(group.process_group)  # rank 0 unlinks the segment before it gets here
    report = {"segment": reducer.name, "linked_after_setup": os.path.exists(f"/dev/shm/{reducer.name}")}
    digest = hashlib.sha256()
    try:
        cases = itertools.product(SHAPES, DTYPES, (False, True))
        for step, (shape, dtype, integers) in enumerate(cases):
            mine = _rank_tensor(rank, step, shape, dtype, integers)
            assert reducer.fits(mine)
            got = all_reduce_sum(mine.clone(), group)
            via_gloo = mine.clone()
            dist.all_reduce(via_gloo, group=group.process_group)
            parts = [_rank_tensor(r, step, shape, dtype, integers) for r in range(world_size)]
            case = f"rank {rank}, {dtype}, shape {shape}, integers={integers}"
            assert torch.equal(got, _rank_order_sum(parts)), f"not the rank-order sum: {case}"
            if world_size == 2 or integers:
                assert torch.equal(got, via_gloo), f"differs from gloo: {case}"
            else:  # gloo's ring adds in another order: each of the W - 1 additions rounds differently
                bound = (world_size - 1) * torch.finfo(dtype).eps * sum(p.float().abs() for p in parts)
                assert bool(((got.float() - via_gloo.float()).abs() <= bound).all()), f"far from gloo: {case}"
            digest.update(got.reshape(-1).view(torch.uint8).numpy().tobytes())

        # More than a slot holds: all_reduce_sum takes gloo, and the shared memory stays in step.
        big = _rank_tensor(rank, -1, (SLOT_BYTES // 4 + 1,), torch.float32)
        assert not reducer.fits(big)
        expected = big.clone()
        dist.all_reduce(expected, group=group.process_group)
        assert torch.equal(all_reduce_sum(big, group), expected)

        # Many calls in a row, sizes changing, with nothing else between them: a rank that overwrote
        # its slot before a peer read it, or read a stale one, shows up as a wrong sum.
        for step in range(RACE_STEPS):
            shape = (1 + step % 7, 64 + 8 * (step % 5))
            dtype = DTYPES[step % len(DTYPES)]
            got = all_reduce_sum(_rank_tensor(rank, step, shape, dtype), group)
            parts = [_rank_tensor(r, step, shape, dtype) for r in range(world_size)]
            assert torch.equal(got, _rank_order_sum(parts)), f"race at call {step} on rank {rank}"
            ping = all_reduce_sum(torch.full((3,), float(rank + 1)), group)
            assert ping.tolist() == [world_size * (world_size + 1) / 2] * 3, f"ping {step} on rank {rank}"
            digest.update(got.reshape(-1).view(torch.uint8).numpy().tobytes())
        report["digest"] = digest.hexdigest()
    finally:
        shutdown_distributed(group)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_matches_gloo_bit_for_bit(world_size, tmp_path):
    _spawn(_agree_with_gloo, world_size, tmp_path)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    segment = reports[0]["segment"]
    assert segment.startswith("bloomduo_ar_")
    assert {r["segment"] for r in reports} == {segment}
    assert not any(r["linked_after_setup"] for r in reports), "the segment must be unlinked once attached"
    assert len({r["digest"] for r in reports}) == 1, "ranks must end with bit-identical tensors"
    assert not os.path.exists(f"/dev/shm/{segment}")


def _stuck_peer(rank: int, world_size: int, init_method: str, out_dir: str, timeout_s: float) -> None:
    group = _join(rank, world_size, init_method, timeout_s=timeout_s)
    done = Path(out_dir, "rank0.json")
    try:
        if rank == 1:  # alive, but never joins the all-reduce
            while not done.exists():
                time.sleep(0.05)
            return
        started = time.monotonic()
        with pytest.raises(RuntimeError) as first:
            all_reduce_sum(torch.ones(8), group)
        elapsed = time.monotonic() - started
        with pytest.raises(RuntimeError) as second:
            all_reduce_sum(torch.ones(8), group)
        result = {"elapsed": elapsed, "first": str(first.value), "second": str(second.value)}
        done.write_text(json.dumps(result))
    finally:
        shutdown_distributed(group)


def test_stuck_peer_raises_after_the_timeout(tmp_path):
    timeout_s = 1.0
    _spawn(_stuck_peer, 2, tmp_path, timeout_s)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert timeout_s <= result["elapsed"] < timeout_s + 5
    assert "rank 1 did not reach call #1 within 1 s" in result["first"]
    assert "unusable after an earlier failure" in result["second"]


def _dead_peer(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    group = _join(rank, world_size, init_method, timeout_s=60)
    if rank == 1:
        os._exit(0)  # gone without a word, like an OOM kill
    try:
        time.sleep(0.5)  # let it go
        started = time.monotonic()
        with pytest.raises(RuntimeError) as error:
            all_reduce_sum(torch.ones(8), group)
        result = {"elapsed": time.monotonic() - started, "error": str(error.value)}
        Path(out_dir, "rank0.json").write_text(json.dumps(result))
    finally:
        shutdown_distributed(group)


def test_dead_peer_is_noticed_long_before_the_timeout(tmp_path):
    _spawn(_dead_peer, 2, tmp_path)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["elapsed"] < 10
    assert "rank 1 (pid" in result["error"] and "exited" in result["error"]


def _late_peer(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    """Rank 1 comes to every other call 20 ms late, past the native fast path's wait (YIELD_S): rank 0's call
    publishes its part there and the Python version finishes it."""
    group = _join(rank, world_size, init_method, timeout_s=60)
    results = []
    try:
        for step, dtype in enumerate([torch.bfloat16, torch.float32] * 3):
            if rank == 1 and step % 2 == 0:
                time.sleep(0.02)
            mine = _rank_tensor(rank, step, (16, 64), dtype)
            before = (
                native.shm_all_reduce(group.shm.segment, mine.clone())
                if rank == 0 and step % 2 == 0
                else None
            )
            got = mine if before == native.SHM_REDUCED else all_reduce_sum(mine, group)
            parts = [_rank_tensor(r, step, (16, 64), dtype) for r in range(world_size)]
            results.append({"published": before, "right": torch.equal(got, _rank_order_sum(parts))})
    finally:
        shutdown_distributed(group)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def test_a_late_peer_hands_the_call_from_the_fast_path_to_python(tmp_path):
    _spawn(_late_peer, 2, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(step["right"] for rank in ranks for step in rank)
    # rank 0 published its part and left: the peer had not come within the fast path's wait
    assert [step["published"] for step in ranks[0][::2]] == [native.SHM_PUBLISHED] * 3


def _no_shared_memory(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    os.environ["BLOOMDUO_SHM_ALLREDUCE"] = "0"
    group = _join(rank, world_size, init_method, timeout_s=60)
    try:
        assert group.shm is None
        assert all_reduce_sum(torch.full((4,), rank + 1.0), group).tolist() == [3.0] * 4
    finally:
        shutdown_distributed(group)

    del os.environ["BLOOMDUO_SHM_ALLREDUCE"]
    socket.gethostname = lambda: f"host-{rank}"  # ranks that do not share a host
    group = _join(rank, world_size, init_method + "-2", timeout_s=60)
    try:
        assert group.shm is None
        assert all_reduce_sum(torch.full((4,), rank + 1.0), group).tolist() == [3.0] * 4
    finally:
        shutdown_distributed(group)


def test_gloo_when_disabled_or_on_different_hosts(tmp_path):
    _spawn(_no_shared_memory, 2, tmp_path)


def _benchmark(rank: int, world_size: int, init_method: str, out_dir: str, repeats: int) -> None:
    os.environ.pop("BLOOMDUO_SHM_ALLREDUCE_BYTES", None)
    torch.set_num_threads(1)
    group = init_distributed(rank, world_size, init_method, "cpu", timeout_s=60)
    reducer = group.shm
    try:
        for shape, dtype in (((4096,), torch.float32), ((16, 1024), torch.bfloat16)):
            tensor = torch.randn(shape).to(dtype)
            paths = {
                "gloo": lambda t: dist.all_reduce(t, group=group.process_group),
                "shm": reducer.all_reduce,
            }
            for name, reduce in paths.items():
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    reduce(tensor)
                    times.append(time.perf_counter() - started)
                    tensor.div_(world_size)  # keep the values finite
                if rank == 0:
                    median_us = statistics.median(times[repeats // 10 :]) * 1e6
                    print(f"W={world_size} {list(shape)} {dtype}: {name} median {median_us:.1f} us")
    finally:
        shutdown_distributed(group)


if __name__ == "__main__":
    import tempfile

    for size in (2, 3, 4):
        with tempfile.TemporaryDirectory() as directory:
            _spawn(_benchmark, size, Path(directory), 2000)
