"""gRPC face of a shard worker: protos to plain steps for StepRunner and back, failures to status codes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable

import grpc
import structlog

from bloomduo.core.dtypes import name_of
from bloomduo.core.gc_pauses import freeze_loaded_heap, time_pauses
from bloomduo.core.libc import one_arena
from bloomduo.core.logprobs import NO_PENALTY, RepetitionPenalty, Scoring
from bloomduo.core.logs import get_logger
from bloomduo.core.serving import (
    NO_TLS,
    SERVER_OPTIONS,
    SHARD_PROTOCOL_VERSION,
    Health,
    TlsFiles,
    bind,
    enable_reflection,
    stop_event_on_signals,
)
from bloomduo.core.tensor_wire import TensorWireError, decode_tensor, write_tensor
from bloomduo.shard_worker.config import ShardOptions
from bloomduo.shard_worker.engine import ShardEngine
from bloomduo.shard_worker.step_plan import Chunk
from bloomduo.shard_worker.step_runner import (
    BadStep,
    GroupBroken,
    NotReady,
    Step,
    StepDone,
    StepRejected,
    StepRunner,
    StreamTaken,
    WorkerError,
)
from bloomduo.v1 import shard_pb2, shard_pb2_grpc

log = get_logger(__name__)
SERVICE_NAME = "bloomduo.v1.ShardService"
EXIT_GROUP_BROKEN = 3  # the supervisor (bloomduo up, docker restart policy) restarts the worker

# The one place a worker's failures become gRPC status codes.
STATUS_CODES: dict[type[WorkerError], grpc.StatusCode] = {
    NotReady: grpc.StatusCode.UNAVAILABLE,
    StreamTaken: grpc.StatusCode.FAILED_PRECONDITION,
    BadStep: grpc.StatusCode.INVALID_ARGUMENT,
    StepRejected: grpc.StatusCode.FAILED_PRECONDITION,
    GroupBroken: grpc.StatusCode.UNAVAILABLE,
}


def step_from_proto(request: shard_pb2.StepRequest) -> Step:
    try:
        hidden = decode_tensor(request.hidden_states)
    except TensorWireError as exc:
        raise BadStep(f"hidden_states: {exc}") from exc
    for chunk in request.sequences:
        # Refused here, before the step reaches any collective, like every malformed step.
        if len(chunk.next_token_ids) > chunk.num_tokens:
            raise BadStep(
                f"sequence {chunk.sequence_id}: {len(chunk.next_token_ids)} next tokens to score, "
                f"but its chunk has {chunk.num_tokens} rows"
            )
    return Step(
        step_id=request.step_id,
        hidden_states=hidden,
        chunks=[
            Chunk(c.sequence_id, c.start_position, c.num_tokens, c.prefix_sequence_id)
            for c in request.sequences
        ],
        free_ids=list(request.free_sequence_ids),
        full_logits=list(request.full_logits),
        scoring=[Scoring(list(c.next_token_ids), c.top_n) for c in request.sequences],
        penalties=[
            RepetitionPenalty(c.repetition_penalty, list(c.penalized_token_ids))
            if c.repetition_penalty not in (0.0, 1.0)
            else NO_PENALTY
            for c in request.sequences
        ],
        request_ids=list(request.request_ids),
    )


def response_of(done: StepDone) -> shard_pb2.StepResponse:
    output = done.output
    response = shard_pb2.StepResponse(
        step_id=done.step_id,
        best_logit=output.best_logit,
        best_token=output.best_token,
        logsumexp=output.logsumexp,
        scored_logsumexp=output.scored_logsumexp,
        next_token_logit=output.next_token_logit,
        top_logit=output.top_logit,
        top_token=output.top_token,
        compute_seconds=done.compute_seconds,
    )
    write_tensor(response.logits, output.logits)
    return response


class ShardServicer(shard_pb2_grpc.ShardServiceServicer):
    def __init__(self, options: ShardOptions, on_group_broken: Callable[[str], None]) -> None:
        self.options = options
        self.runner = StepRunner(on_group_broken, wedge_grace_s=options.wedge_grace_s)

    async def Info(self, request: shard_pb2.ShardInfoRequest, context: grpc.aio.ServicerContext):
        engine = self.runner.engine
        info = shard_pb2.ShardInfoResponse(
            protocol_version=SHARD_PROTOCOL_VERSION,
            rank=self.options.rank,
            world_size=self.options.world_size,
            ready=self.runner.ready,
        )
        if engine is not None:
            info.device = str(engine.device)
            info.dtype = name_of(engine.dtype)
            info.backend = engine.backend
            info.vocab_start = engine.vocab_start
            info.vocab_end = engine.vocab_end
            info.padded_vocab_size = engine.padded_vocab_size
            info.parameter_bytes = engine.parameter_bytes
            info.cached_sequences = engine.cache.num_sequences
            info.cached_tokens = engine.cache.num_tokens
            info.kv_cache_bytes = engine.cache.nbytes
            info.local_heads = engine.local_heads
            info.model = engine.model_name
            info.group_id = engine.group_id
            info.kernels = engine.kernels
        return info

    async def Step(
        self, request_iterator: AsyncIterator[shard_pb2.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.StepResponse]:
        try:
            async with self.runner.stream(request_iterator, context.peer()) as requests:
                async for request in requests:
                    yield response_of(await self.runner.run(step_from_proto(request)))
        except WorkerError as exc:
            await context.abort(STATUS_CODES[type(exc)], str(exc))


async def serve(options: ShardOptions, host: str, port: int, tls: TlsFiles = NO_TLS) -> None:
    one_arena()  # before gRPC's and the step thread's first allocations: the weights load on that thread
    time_pauses()
    structlog.contextvars.bind_contextvars(rank=options.rank)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    stop = stop_event_on_signals()
    broken: list[str] = []

    def group_broken(reason: str) -> None:
        log.error("shard_group_broken", reason=reason, action="exiting so the supervisor restarts the group")
        broken.append(reason)
        stop.set()

    servicer = ShardServicer(options, group_broken)
    shard_pb2_grpc.add_ShardServiceServicer_to_server(servicer, server)
    health = Health(server, [SERVICE_NAME])
    enable_reflection(server, [SERVICE_NAME])
    bound = bind(server, f"{host}:{port}", tls)
    await server.start()
    await health.set(False)
    log.info("shard_listening", address=f"{host}:{bound}")
    runner = servicer.runner
    load = asyncio.get_running_loop().run_in_executor(runner.executor, ShardEngine.load, options)
    done, _ = await asyncio.wait(
        {load, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
    )
    if load in done:
        runner.engine = load.result()
        freeze_loaded_heap()
        await health.set(True)
        log.info("shard_ready", address=f"{host}:{bound}")
        await stop.wait()
    log.info("shard_stopping")
    await health.shutting_down()
    await server.stop(grace=1 if broken else 5)
    runner.executor.shutdown(wait=False, cancel_futures=True)
    if broken:
        # The step thread may sit in a collective forever; don't wait for it at interpreter exit.
        os._exit(EXIT_GROUP_BROKEN)
