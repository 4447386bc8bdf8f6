"""The gateway's ShardPool against stand-in workers served over gRPC: the handshake's checks on the group,
and the plain chunks it puts on the wire."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
import torch

from bloomduo.core.tensor_wire import decode_tensor, encode_tensor
from bloomduo.gateway.sequence import Chunk
from bloomduo.gateway.shards import ShardPool, ShardUnavailable
from bloomduo.v1 import shard_pb2, shard_pb2_grpc

VOCAB = 10


class FakeShard(shard_pb2_grpc.ShardServiceServicer):
    """One worker of two: reports `info`, answers each step with its half of a logits row per chunk."""

    def __init__(self, info: shard_pb2.ShardInfoResponse) -> None:
        self.info = info
        self.target = ""  # known once served
        self.requests: list[shard_pb2.StepRequest] = []

    async def Info(self, request, context) -> shard_pb2.ShardInfoResponse:
        return self.info

    async def Step(self, requests, context) -> AsyncIterator[shard_pb2.StepResponse]:
        async for request in requests:
            self.requests.append(request)
            rows = torch.full((len(request.sequences), VOCAB // 2), float(self.info.rank))
            yield shard_pb2.StepResponse(step_id=request.step_id, logits=encode_tensor(rows))


def _info(rank: int, dtype: str = "float32") -> shard_pb2.ShardInfoResponse:
    half = VOCAB // 2
    return shard_pb2.ShardInfoResponse(
        rank=rank,
        world_size=2,
        ready=True,
        dtype=dtype,
        vocab_start=rank * half,
        vocab_end=(rank + 1) * half,
        group_id="group-1",
    )


def _with_pool(
    infos: list[shard_pb2.ShardInfoResponse], use: Callable[[ShardPool, list[FakeShard]], Awaitable]
):
    async def scenario() -> None:
        shards = [FakeShard(info) for info in infos]
        servers, targets = [], []
        for shard in shards:
            server = grpc.aio.server()
            shard_pb2_grpc.add_ShardServiceServicer_to_server(shard, server)
            shard.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
            targets.append(shard.target)
            await server.start()
            servers.append(server)
        pool = ShardPool(targets, vocab_size=VOCAB, step_timeout_s=10.0)
        try:
            await use(pool, shards)
        finally:
            await pool.close()
            await asyncio.gather(*(server.stop(None) for server in servers))

    asyncio.run(scenario())


def test_workers_serving_different_dtypes_are_refused_by_name() -> None:
    async def use(pool: ShardPool, shards: list[FakeShard]) -> None:
        with pytest.raises(ShardUnavailable, match="disagree on the dtype") as refused:
            await pool.wait_ready(timeout_s=5.0)
        message = str(refused.value)
        for shard in shards:
            assert f"{shard.target} (rank {shard.info.rank}) {shard.info.dtype}" in message

    _with_pool([_info(0, "float32"), _info(1, "bfloat16")], use)


def test_workers_whose_vocabulary_slices_leave_a_gap_are_refused() -> None:
    gap = _info(1)
    gap.vocab_start += 1

    async def use(pool: ShardPool, shards: list[FakeShard]) -> None:
        with pytest.raises(ShardUnavailable, match="do not tile the vocabulary"):
            await pool.wait_ready(timeout_s=5.0)

    _with_pool([_info(0), gap], use)


def test_a_step_sends_the_chunks_to_every_worker_and_joins_their_slices_in_rank_order() -> None:
    chunks = [Chunk(7, 0, 3), Chunk(8, 5, 1, prefix_sequence_id=7)]

    async def use(pool: ShardPool, shards: list[FakeShard]) -> None:
        infos = await pool.wait_ready(timeout_s=5.0)
        assert [info.rank for info in infos] == [0, 1]  # given out of order, driven in rank order
        result = await pool.step(torch.zeros(4, 2), chunks, free_ids=[3], full_logits=[True, True])
        assert result.logits.tolist() == [[0.0] * 5 + [1.0] * 5] * 2
        for shard in shards:
            (request,) = shard.requests
            assert [
                Chunk(c.sequence_id, c.start_position, c.num_tokens, c.prefix_sequence_id)
                for c in request.sequences
            ] == chunks
            assert list(request.free_sequence_ids) == [3]
            assert decode_tensor(request.hidden_states).shape == (4, 2)

    _with_pool([_info(1), _info(0)], use)
