"""gRPC face of a shard worker: translates StepRequest/StepResponse to ShardEngine.step."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog

from bloomduo.logs import get_logger
from bloomduo.serving import SERVER_OPTIONS, Health, bind, stop_event_on_signals
from bloomduo.tensor_wire import TensorWireError, decode_tensor, encode_tensor
from bloomduo.v1 import shard_pb2, shard_pb2_grpc
from shard_worker.engine import ShardEngine, ShardOptions
from shard_worker.model import Chunk

log = get_logger(__name__)
SERVICE_NAME = "bloomduo.v1.ShardService"


class ShardServicer(shard_pb2_grpc.ShardServiceServicer):
    def __init__(self, options: ShardOptions) -> None:
        self.options = options
        self.engine: ShardEngine | None = None
        # Collectives must run in the same order on every rank, so every step runs on this one thread.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-step")
        self.stream_open = False

    async def Info(self, request: shard_pb2.ShardInfoRequest, context: grpc.aio.ServicerContext):
        engine = self.engine
        info = shard_pb2.ShardInfoResponse(
            rank=self.options.rank, world_size=self.options.world_size, ready=engine is not None
        )
        if engine is not None:
            info.device = str(engine.device)
            info.dtype = str(engine.dtype).removeprefix("torch.")
            info.backend = engine.backend
            info.vocab_start = engine.vocab_start
            info.vocab_end = engine.vocab_end
            info.padded_vocab_size = engine.padded_vocab_size
            info.parameter_bytes = engine.parameter_bytes
            info.cached_sequences = engine.cache.num_sequences
            info.cached_tokens = engine.cache.num_tokens
            info.local_heads = engine.local_heads
            info.model = engine.model_name
        return info

    async def Step(
        self, request_iterator: AsyncIterator[shard_pb2.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.StepResponse]:
        engine = self.engine
        if engine is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "shard worker is still loading; retry when ready"
            )
        if self.stream_open:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "another gateway already holds this worker's step stream; one gateway drives a shard group",
            )
        self.stream_open = True
        loop = asyncio.get_running_loop()
        log.info("step_stream_opened", peer=context.peer())
        try:
            async for request in request_iterator:
                try:
                    hidden = decode_tensor(request.hidden_states)
                except TensorWireError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"hidden_states: {exc}")
                chunks = [Chunk(c.sequence_id, c.start_position, c.num_tokens) for c in request.sequences]
                started = time.perf_counter()
                try:
                    logits = await loop.run_in_executor(
                        self.executor, engine.step, hidden, chunks, list(request.free_sequence_ids)
                    )
                except (ValueError, KeyError) as exc:
                    # Every rank sees the same request and fails the same way, before any collective.
                    log.warning("step_rejected", step_id=request.step_id, error=str(exc))
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"step {request.step_id}: {exc}")
                elapsed = time.perf_counter() - started
                log.debug(
                    "step_done",
                    step_id=request.step_id,
                    sequences=len(chunks),
                    tokens=hidden.shape[0],
                    seconds=round(elapsed, 6),
                    request_ids=list(request.request_ids),
                )
                yield shard_pb2.StepResponse(
                    step_id=request.step_id,
                    logits=encode_tensor(logits),
                    vocab_start=engine.vocab_start,
                    vocab_end=engine.vocab_end,
                    compute_seconds=elapsed,
                )
        finally:
            self.stream_open = False
            # The caches belong to the gateway on the other end; a new stream starts from nothing.
            await loop.run_in_executor(self.executor, engine.reset)
            log.info("step_stream_closed", peer=context.peer())


async def serve(options: ShardOptions, host: str, port: int) -> None:
    structlog.contextvars.bind_contextvars(rank=options.rank)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer = ShardServicer(options)
    shard_pb2_grpc.add_ShardServiceServicer_to_server(servicer, server)
    health = Health(server, [SERVICE_NAME])
    bound = bind(server, f"{host}:{port}")
    await server.start()
    await health.set(False)
    log.info("shard_listening", address=f"{host}:{bound}")
    stop = stop_event_on_signals()
    load = asyncio.get_running_loop().run_in_executor(servicer.executor, ShardEngine.load, options)
    done, _ = await asyncio.wait(
        {load, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
    )
    if load in done:
        servicer.engine = load.result()
        await health.set(True)
        log.info("shard_ready", address=f"{host}:{bound}")
        await stop.wait()
    log.info("shard_stopping")
    await health.shutting_down()
    await server.stop(grace=5)
    servicer.executor.shutdown(wait=False, cancel_futures=True)
