"""gRPC face of a shard worker: translates StepRequest/StepResponse to ShardEngine.step."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog

from bloomduo.core import metrics
from bloomduo.core.dtypes import name_of
from bloomduo.core.logs import get_logger
from bloomduo.core.serving import (
    NO_TLS,
    SERVER_OPTIONS,
    Health,
    TlsFiles,
    bind,
    enable_reflection,
    stop_event_on_signals,
)
from bloomduo.core.tensor_wire import TensorWireError, decode_tensor, encode_tensor
from bloomduo.shard_worker.config import ShardOptions
from bloomduo.shard_worker.engine import ShardEngine
from bloomduo.shard_worker.model import Chunk
from bloomduo.v1 import shard_pb2, shard_pb2_grpc

log = get_logger(__name__)
SERVICE_NAME = "bloomduo.v1.ShardService"
EXIT_GROUP_BROKEN = 3  # the supervisor (bloomduo up, docker restart policy) restarts the worker


class ShardServicer(shard_pb2_grpc.ShardServiceServicer):
    def __init__(self, options: ShardOptions, on_group_broken: Callable[[str], None]) -> None:
        self.options = options
        self.on_group_broken = on_group_broken
        self.engine: ShardEngine | None = None
        self.running_step: asyncio.Future | None = None
        self.settling: asyncio.Future | None = None
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
        if self.running_step is not None and not self.running_step.done():
            # The last stream's step is still running although that stream is gone: it waits in a
            # collective. Its own watch should have caught it; watching again costs nothing.
            self.settling = asyncio.ensure_future(self._settle_running_step())
        # Reading in its own task keeps a receive pending at all times, so a gateway that vanishes
        # mid-step is noticed even while this handler waits on the step (gRPC notices only on I/O).
        requests: asyncio.Queue[shard_pb2.StepRequest | None] = asyncio.Queue()
        reader = asyncio.ensure_future(self._read_requests(request_iterator, requests))
        try:
            while (request := await requests.get()) is not None:
                try:
                    hidden = decode_tensor(request.hidden_states)
                except TensorWireError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"hidden_states: {exc}")
                chunks = [
                    Chunk(c.sequence_id, c.start_position, c.num_tokens, c.prefix_sequence_id)
                    for c in request.sequences
                ]
                started = time.perf_counter()
                self.running_step = loop.run_in_executor(
                    self.executor,
                    engine.step,
                    hidden,
                    chunks,
                    list(request.free_sequence_ids),
                    list(request.full_logits),
                )
                try:
                    output = await asyncio.shield(self.running_step)
                except (ValueError, KeyError) as exc:
                    # Every rank sees the same request and fails the same way, before any collective.
                    log.warning("step_rejected", step_id=request.step_id, error=str(exc))
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"step {request.step_id}: {exc}")
                except Exception as exc:
                    # A collective failed: a peer died or timed out. This process group cannot be used
                    # again; exit so the supervisor restarts the pair into a fresh group.
                    self.on_group_broken(f"step {request.step_id} failed: {exc}")
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"shard group broken: {exc}")
                elapsed = time.perf_counter() - started
                metrics.WORKER_STEP.observe(elapsed)
                metrics.WORKER_STEP_TOKENS.observe(hidden.shape[0])
                metrics.WORKER_CACHED_SEQUENCES.set(engine.cache.num_sequences)
                metrics.WORKER_CACHED_TOKENS.set(engine.cache.num_tokens)
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
                    logits=encode_tensor(output.logits),
                    best_logit=output.best_logit,
                    best_token=output.best_token,
                    logsumexp=output.logsumexp,
                    vocab_start=engine.vocab_start,
                    vocab_end=engine.vocab_end,
                    compute_seconds=elapsed,
                )
        finally:
            reader.cancel()
            self.stream_open = False
            # The caches belong to the gateway on the other end; a new stream starts from nothing.
            await loop.run_in_executor(self.executor, engine.reset)
            log.info("step_stream_closed", peer=context.peer())

    async def _read_requests(
        self, request_iterator: AsyncIterator[shard_pb2.StepRequest], requests: asyncio.Queue
    ) -> None:
        try:
            async for request in request_iterator:
                requests.put_nowait(request)
        except Exception as exc:  # the gateway went away; the stream is over either way
            log.info("step_stream_broken", error=str(exc))
        finally:
            # Steps not started yet are dropped: with their gateway gone, a peer may never get them,
            # and starting one would wait in a collective forever.
            while not requests.empty():
                requests.get_nowait()
            requests.put_nowait(None)
            # Its own task: the handler cancels this reader when it ends, which must not stop the watch.
            self.settling = asyncio.ensure_future(self._settle_running_step())

    async def _settle_running_step(self) -> None:
        """A stream that closes mid-step may leave this rank waiting in a collective for a peer that
        never got the step; after a grace period the group is wedged and must be re-formed."""
        step = self.running_step
        if step is None or step.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(step), timeout=self.options.wedge_grace_s)
        except TimeoutError:
            self.on_group_broken(
                f"a step is stuck in a collective {self.options.wedge_grace_s} s after its stream closed"
            )
        except Exception:  # its failure was reported where it was awaited
            pass


async def serve(options: ShardOptions, host: str, port: int, tls: TlsFiles = NO_TLS) -> None:
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
    await server.stop(grace=1 if broken else 5)
    servicer.executor.shutdown(wait=False, cancel_futures=True)
    if broken:
        # The step thread may sit in a collective forever; don't wait for it at interpreter exit.
        os._exit(EXIT_GROUP_BROKEN)
