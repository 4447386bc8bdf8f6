"""The gateway's ShardPool against real `bloomduo shard` processes on loopback: the handshake's checks on
the group, and one step sent to every worker of a W=2 group whose joined slices give transformers' logits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
import torch
from tokenizers import Tokenizer

from bloomduo.core.checkpoint import Checkpoint
from bloomduo.core.serving import SHARD_PROTOCOL_VERSION
from bloomduo.gateway.embedding import Embedder
from bloomduo.gateway.sequence import Chunk
from bloomduo.gateway.shards import ShardPool, ShardUnavailable
from bloomduo.v1 import shard_pb2, shard_pb2_grpc
from tests._shard_workers import ShardWorkers
from tests.reference import hf_model

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def pair(demo_model) -> Iterator[ShardWorkers]:
    """Two float32 workers of one group: each holds half of every split matrix and of the vocabulary."""
    with ShardWorkers(demo_model(), ["float32", "float32"]) as workers:
        yield workers


def test_workers_serving_different_dtypes_are_refused_by_name(demo_model) -> None:
    with ShardWorkers(demo_model(), ["float32", "bfloat16"]) as workers:

        async def refuse() -> str:
            pool = ShardPool(workers.targets, vocab_size=1030, step_timeout_s=10.0)
            try:
                with pytest.raises(ShardUnavailable, match="disagree on the dtype") as refused:
                    await pool.wait_ready(timeout_s=30.0)
                return str(refused.value)
            finally:
                await pool.close()

        message = asyncio.run(refuse())
    for rank, (target, dtype) in enumerate(zip(workers.targets, workers.dtypes, strict=True)):
        assert f"{target} (rank {rank}) {dtype}" in message


class GapShard(shard_pb2_grpc.ShardServiceServicer):
    """A stand-in worker that only answers Info. Real workers always tile the vocabulary (each takes its
    slice from the same shard_layout) and speak this release's protocol, so the gap or the old protocol that
    ShardPool must refuse (a worker of another build or model) can only be produced by a servicer that
    reports one."""

    def __init__(
        self, rank: int, vocab_start: int, vocab_end: int, protocol: int = SHARD_PROTOCOL_VERSION
    ) -> None:
        self.info = shard_pb2.ShardInfoResponse(
            protocol_version=protocol,
            rank=rank,
            world_size=2,
            ready=True,
            dtype="float32",
            vocab_start=vocab_start,
            vocab_end=vocab_end,
            group_id="group-1",
        )

    async def Info(self, request, context) -> shard_pb2.ShardInfoResponse:
        return self.info


def _refusal(shards: list[GapShard], vocab_size: int) -> tuple[list[str], str]:
    """The stand-ins' targets, and what ShardPool.wait_ready refuses them with."""

    async def scenario() -> tuple[list[str], str]:
        servers, targets = [], []
        for shard in shards:
            server = grpc.aio.server()
            shard_pb2_grpc.add_ShardServiceServicer_to_server(shard, server)
            targets.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            await server.start()
            servers.append(server)
        pool = ShardPool(targets, vocab_size=vocab_size, step_timeout_s=10.0)
        try:
            with pytest.raises(ShardUnavailable) as refused:
                await pool.wait_ready(timeout_s=5.0)
            return targets, str(refused.value)
        finally:
            await pool.close()
            await asyncio.gather(*(server.stop(None) for server in servers))

    return asyncio.run(scenario())


def test_workers_whose_vocabulary_slices_leave_a_gap_are_refused() -> None:
    _, message = _refusal([GapShard(0, 0, 5), GapShard(1, 6, 10)], vocab_size=10)
    assert "do not tile the vocabulary: [(0, 5), (6, 10)]" in message


def test_a_worker_of_an_older_release_is_refused_by_name() -> None:
    """A worker from before the protocol field reports 0: it would drop fields it does not know (a greedy
    sequence's repetition penalty) and answer something else, so the gateway refuses to drive it."""
    targets, message = _refusal([GapShard(0, 0, 5), GapShard(1, 5, 10, protocol=0)], vocab_size=10)
    assert f"{targets[1]} (rank 1) speaks 0" in message and targets[0] not in message
    assert f"this gateway speaks shard protocol {SHARD_PROTOCOL_VERSION}" in message


def test_a_step_reaches_every_worker_and_their_slices_join_in_rank_order(pair, demo_model) -> None:
    """Given out of rank order, the pool drives rank 0 first: the joined logits rows and greedy picks are
    transformers' on the whole vocabulary, a prefix copy included, and freed ids reach every worker."""
    model_dir = demo_model()
    checkpoint = Checkpoint(model_dir)
    vocab_size = checkpoint.config.vocab_size
    embed = Embedder(checkpoint, torch.float32)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    a = tokenizer.encode("The quick brown fox jumps over the lazy dog").ids[:7]
    b = tokenizer.encode("Bonjour tout le monde").ids[:3]
    c = [*a[:5], b[0]]  # shares a's first 5 tokens, then goes its own way
    assert len(a) == 7 and len(b) == 3 and c[5] != a[5]
    steps = [
        # (chunks, their tokens, free ids, full logits?)
        ([Chunk(7, 0, 6), Chunk(9, 0, 3)], a[:6] + b, [], [True, False]),
        ([Chunk(7, 6, 1), Chunk(8, 5, 1, prefix_sequence_id=7)], [a[6], c[5]], [9], [True, False]),
        ([Chunk(8, 6, 1)], [a[0]], [], [True]),
    ]
    # What each step's rows must be: transformers' logits after each sequence's tokens so far.
    expected_rows = [[a[:6]], [a], [[*c, a[0]]]]
    expected_greedy = [[b], [c], []]

    async def scenario() -> tuple[list, list, list[list[int]]]:
        pool = ShardPool(list(reversed(pair.targets)), vocab_size=vocab_size, step_timeout_s=30.0)
        try:
            infos = await pool.wait_ready(timeout_s=30.0)
            assert [info.rank for info in infos] == [0, 1]
            assert [connection.target for connection in pool.connections] == pair.targets
            assert infos[0].vocab_end == infos[1].vocab_start and infos[1].vocab_end >= vocab_size
            results, cached = [], []
            for chunks, tokens, free_ids, full in steps:
                hidden = embed(torch.tensor(tokens))
                results.append(await pool.step(hidden, chunks, free_ids, full_logits=full))
                cached.append([info.cached_sequences for info in await pool.load()])
            await pool.step(torch.empty(0, embed.hidden_size), [], free_ids=[7, 8])
            cached.append([info.cached_sequences for info in await pool.load()])
            return results, cached
        finally:
            await pool.close()

    results, cached = asyncio.run(scenario())
    assert cached == [[2, 2], [2, 2], [2, 2], [0, 0]]  # 7 and 9; 9 freed, 8 copied 7's prefix; all freed

    model = hf_model(model_dir)
    for result, rows, greedy in zip(results, expected_rows, expected_greedy, strict=True):
        with torch.inference_mode():
            want = torch.stack([model(torch.tensor([ids])).logits[0, -1] for ids in rows])
            picks = [model(torch.tensor([ids])).logits[0, -1].log_softmax(-1) for ids in greedy]
        assert result.logits.shape == (len(rows), vocab_size)
        # Splitting the hidden dimension between two ranks changes the order of the sums the all-reduce
        # adds up, twice per block (3 blocks): a few roundings at the logits' scale (about 5 measured).
        tolerance = 16 * EPS32 * want.abs().max().item()
        assert (result.logits - want).abs().max().item() <= tolerance
        assert [token for token, _ in result.greedy] == [int(pick.argmax()) for pick in picks]
        for (_, logprob), pick in zip(result.greedy, picks, strict=True):
            assert abs(logprob - pick.max().item()) <= 16 * EPS32 * pick.abs().max().item()
