"""The gateway's connections to its shard workers: one long-lived Step stream each, driven in lock step.

The only gateway module that speaks the shard protocol: the rest of the gateway hands it plain chunks.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import torch

from bloomduo.core.logprobs import (
    NO_PENALTY,
    NO_SCORING,
    RepetitionPenalty,
    RowScore,
    Scoring,
    join_scores,
    join_slices,
)
from bloomduo.core.logs import get_logger
from bloomduo.core.serving import NO_TLS, SHARD_PROTOCOL_VERSION, TlsFiles, secure_or_insecure_channel
from bloomduo.core.tensor_wire import decode_tensor, write_tensor
from bloomduo.gateway.sequence import Chunk
from bloomduo.v1 import shard_pb2, shard_pb2_grpc

log = get_logger(__name__)


class ShardUnavailable(RuntimeError):
    """A shard worker cannot be reached or broke its stream; in-flight requests cannot finish."""


class ShardsStalled(ShardUnavailable):
    """A step got no answer within its deadline: a worker hangs (or waits in a collective for one that
    does), still alive, so nothing will end the step and the group must be replaced."""


class ShardConnection:
    def __init__(self, target: str, tls: TlsFiles) -> None:
        self.target = target
        self.channel = secure_or_insecure_channel(target, tls)
        self.stub = shard_pb2_grpc.ShardServiceStub(self.channel)
        self.call: grpc.aio.StreamStreamCall | None = None

    async def info(self, timeout_s: float = 5.0) -> shard_pb2.ShardInfoResponse:
        return await self.stub.Info(shard_pb2.ShardInfoRequest(), timeout=timeout_s)

    async def step(self, request: shard_pb2.StepRequest) -> shard_pb2.StepResponse:
        if self.call is None:
            self.call = self.stub.Step()
        try:
            await self.call.write(request)
            response = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            self.call = None
            raise ShardUnavailable(f"shard worker {self.target}: {exc.code().name}: {exc.details()}") from exc
        if response is grpc.aio.EOF:
            code = await self.call.code()
            details = await self.call.details()
            self.call = None
            raise ShardUnavailable(f"shard worker {self.target} ended its stream: {code.name}: {details}")
        return response

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None
        await self.channel.close()


@dataclass(frozen=True)
class StepResult:
    logits: torch.Tensor  # float32 [sequences that asked for full logits, vocab_size]
    greedy: list[tuple[int, float]]  # (token, logprob) of the others, in order
    worker_seconds: float  # slowest worker's compute; the rest of the round trip is wire and queueing
    scores: list[list[RowScore]] = field(default_factory=list)  # per chunk, its scored rows (Scoring)


def _join_greedy(responses: Sequence[shard_pb2.StepResponse]) -> list[tuple[int, float]]:
    """The vocabulary's best token and its log-softmax, from each slice's summary."""
    if not responses[0].best_token:
        return []
    return join_slices(
        [r.best_logit for r in responses], [r.best_token for r in responses], [r.logsumexp for r in responses]
    )


def _join_scores(
    responses: Sequence[shard_pb2.StepResponse], chunks: Sequence[Chunk], scoring: Sequence[Scoring]
) -> list[list[RowScore]]:
    """Each chunk's scored rows over the whole vocabulary, from each slice's scores."""
    if not any(asked.next_token_ids or asked.top_n for asked in scoring):  # most steps score nothing
        return [[] for _ in chunks]
    shapes = [
        [(row < len(asked.next_token_ids), asked.top_n) for row in asked.rows(chunk.num_tokens)]
        for chunk, asked in zip(chunks, scoring, strict=True)
    ]
    rows = iter(
        join_scores(
            torch.tensor([list(r.scored_logsumexp) for r in responses]),
            torch.tensor([list(r.next_token_logit) for r in responses]),
            torch.tensor([list(r.top_logit) for r in responses]),
            torch.tensor([list(r.top_token) for r in responses]),
            [row for shape in shapes for row in shape],
        )
    )
    return [[next(rows) for _ in shape] for shape in shapes]


def _wire_chunk(chunk: Chunk, scoring: Scoring, penalty: RepetitionPenalty) -> shard_pb2.SequenceChunk:
    return shard_pb2.SequenceChunk(
        sequence_id=chunk.sequence_id,
        start_position=chunk.start_position,
        num_tokens=chunk.num_tokens,
        prefix_sequence_id=chunk.prefix_sequence_id,
        next_token_ids=scoring.next_token_ids,
        top_n=scoring.top_n,
        repetition_penalty=penalty.penalty,
        penalized_token_ids=penalty.token_ids,
    )


class ShardPool:
    """All W workers of one tensor-parallel group, addressed in rank order."""

    def __init__(
        self,
        targets: Sequence[str],
        vocab_size: int,
        step_timeout_s: float = 120.0,
        tls: TlsFiles = NO_TLS,
    ) -> None:
        """step_timeout_s: the deadline of a step that is given none."""
        if not targets:
            raise ValueError("the gateway needs at least one shard worker address")
        self.connections = [ShardConnection(target, tls) for target in targets]
        self.vocab_size = vocab_size
        self.no_rows = torch.empty(0, vocab_size)  # the logits of a step that asked for no whole row
        self.infos: list[shard_pb2.ShardInfoResponse] = []
        self.step_ids = itertools.count(1)
        self.step_timeout_s = step_timeout_s

    @property
    def world_size(self) -> int:
        return len(self.connections)

    async def wait_ready(self, timeout_s: float) -> list[shard_pb2.ShardInfoResponse]:
        """Poll Info until every worker has loaded into one process group; order them by rank."""
        deadline = time.monotonic() + timeout_s
        while True:
            infos = await asyncio.gather(*(c.info() for c in self.connections), return_exceptions=True)
            waiting_for = [
                c.target
                for c, info in zip(self.connections, infos, strict=True)
                if isinstance(info, BaseException) or not info.ready
            ]
            # A restarted worker reports ready only once its group formed; until its peers restarted
            # too, group ids differ and the old survivor must not be driven.
            if not waiting_for and len({info.group_id for info in infos}) == 1:
                break
            if time.monotonic() > deadline:
                missing = ", ".join(waiting_for) or "workers in different process groups"
                raise ShardUnavailable(
                    f"shard workers not ready after {timeout_s:.0f} s: {missing}; "
                    "check that they run and can reach each other"
                )
            await asyncio.sleep(0.5)
        ranked = sorted(zip(infos, self.connections, strict=True), key=lambda pair: pair[0].rank)
        self.infos = [info for info, _ in ranked]
        self.connections = [connection for _, connection in ranked]
        self._check_group()
        log.info(
            "shards_ready", targets=[c.target for c in self.connections], group_id=self.infos[0].group_id
        )
        return self.infos

    def _check_group(self) -> None:
        other = [
            f"{connection.target} (rank {info.rank}) speaks {info.protocol_version}"
            for info, connection in zip(self.infos, self.connections, strict=True)
            if info.protocol_version != SHARD_PROTOCOL_VERSION
        ]
        if other:
            raise ShardUnavailable(
                f"shard workers of another bloomduo release: this gateway speaks shard protocol "
                f"{SHARD_PROTOCOL_VERSION}, {', '.join(other)}; run one release on the gateway and every "
                "worker"
            )
        ranks = [info.rank for info in self.infos]
        sizes = {info.world_size for info in self.infos}
        if ranks != list(range(self.world_size)) or sizes != {self.world_size}:
            raise ShardUnavailable(
                f"the gateway was given {self.world_size} workers but they report ranks {ranks} of world "
                f"sizes {sorted(sizes)}; pass every worker of one group, and only those"
            )
        dtypes = {info.dtype for info in self.infos}
        if len(dtypes) > 1:
            served = ", ".join(
                f"{connection.target} (rank {info.rank}) {info.dtype}"
                for info, connection in zip(self.infos, self.connections, strict=True)
            )
            raise ShardUnavailable(
                f"shard workers disagree on the dtype they serve: {served}; start every worker of one "
                "group with the same --dtype"
            )
        bounds = [(info.vocab_start, info.vocab_end) for info in self.infos]
        if bounds[0][0] != 0 or any(a[1] != b[0] for a, b in itertools.pairwise(bounds)):
            raise ShardUnavailable(f"workers' vocabulary slices do not tile the vocabulary: {bounds}")
        if bounds[-1][1] < self.vocab_size:
            raise ShardUnavailable(
                f"workers cover {bounds[-1][1]} vocabulary rows, the model has {self.vocab_size}"
            )

    async def step(
        self,
        hidden_states: torch.Tensor,
        chunks: Sequence[Chunk],
        free_ids: Sequence[int],
        request_ids: Sequence[str] = (),
        full_logits: Sequence[bool] = (),
        timeout_s: float | None = None,
        scoring: Sequence[Scoring] = (),
        penalties: Sequence[RepetitionPenalty] = (),
    ) -> StepResult:
        """Send one step to every worker and join their vocabulary slices.

        full_logits[i] false: sequence i needs only its greedy token (the default is every row), after
        penalties[i] (default none). scoring[i]: the rows of chunk i to score (default none). A step still
        unanswered after timeout_s (None: step_timeout_s) raises ShardsStalled.
        """
        timeout_s = self.step_timeout_s if timeout_s is None else timeout_s
        scoring = list(scoring) or [NO_SCORING] * len(chunks)
        penalties = list(penalties) or [NO_PENALTY] * len(chunks)
        request = shard_pb2.StepRequest(
            step_id=next(self.step_ids),
            sequences=[
                _wire_chunk(chunk, asked, penalty)
                for chunk, asked, penalty in zip(chunks, scoring, penalties, strict=True)
            ],
            free_sequence_ids=list(free_ids),
            request_ids=list(request_ids),
            full_logits=list(full_logits),
        )
        write_tensor(request.hidden_states, hidden_states)
        tasks = [asyncio.ensure_future(c.step(request)) for c in self.connections]
        done, pending = await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
        if pending:
            # One worker failed (or stalled): its peers are stuck in a collective with it, so waiting
            # for them would hang the requests; break every stream instead.
            silent = [c.target for c, task in zip(self.connections, tasks, strict=True) if task in pending]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self.reset_streams()
            failed = [task.exception() for task in done if task.exception() is not None]
            if failed:
                raise failed[0]
            raise ShardsStalled(
                f"a shard worker stalled: {', '.join(silent)} gave no answer to step {request.step_id} "
                f"within {timeout_s:.1f} s"
            )
        responses = [task.result() for task in tasks]
        return StepResult(
            self._join_logits(responses),
            _join_greedy(responses),
            max(response.compute_seconds for response in responses),
            _join_scores(responses, chunks, scoring),
        )

    def _join_logits(self, responses: Sequence[shard_pb2.StepResponse]) -> torch.Tensor:
        """The workers' vocabulary slices of the full rows as one float32 tensor over the real vocabulary,
        widened straight into place: a concatenation first, then .float(), made two fresh tensors of a
        step's rows (24 MiB for 16 rows at BLOOM's vocabulary)."""
        if all(response.logits.shape[:1] == [0] for response in responses):
            return self.no_rows  # a greedy step's: its few torch ops cost ~0.2 ms a step (py-spy)
        slices = [decode_tensor(response.logits) for response in responses]
        logits = torch.empty(slices[0].shape[0], self.vocab_size, dtype=torch.float32)
        start = 0
        for piece in slices:
            width = min(piece.shape[-1], self.vocab_size - start)
            logits[:, start : start + width].copy_(piece[:, :width])
            start += width
        return logits

    async def load(self) -> list[shard_pb2.ShardInfoResponse]:
        """Every worker's current Info (cached sequences and tokens), in rank order."""
        return list(await asyncio.gather(*(c.info() for c in self.connections)))

    def reset_streams(self) -> None:
        for connection in self.connections:
            if connection.call is not None:
                connection.call.cancel()
                connection.call = None

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.connections))
