"""A shard worker's steps in order, without gRPC: one stream at a time, each step on the one step thread.

The servicer (server.py) only translates: protos to `Step`s at the edge, `StepDone`s back, and each
`WorkerError` to its one gRPC status code. What a failure means for the process group is decided here:
a step the engine refuses (ValueError, KeyError) was refused by every rank alike before any collective,
so the group is fine; any other failure happened in a collective, and the group can never be used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from bloomduo.core import metrics
from bloomduo.core.logprobs import RepetitionPenalty, Scoring
from bloomduo.core.logs import get_logger
from bloomduo.shard_worker.engine import ShardEngine, StepOutput
from bloomduo.shard_worker.step_plan import Chunk

log = get_logger(__name__)
Request = TypeVar("Request")


class WorkerError(Exception):
    """Why a step stream ends early; server.py maps each kind to one gRPC status code."""


class NotReady(WorkerError):
    """The weights are still loading, or the last gateway's step is still running."""


class StreamTaken(WorkerError):
    """Another gateway holds the step stream: one gateway drives a shard group."""


class BadStep(WorkerError):
    """A step request that cannot be read, e.g. an undecodable tensor."""


class StepRejected(WorkerError):
    """The engine refused a step before any collective, as every rank did: the group is still usable."""


class GroupBroken(WorkerError):
    """A collective failed: a peer died or timed out, and the process group must be re-formed."""


@dataclass(frozen=True)
class Step:
    step_id: int
    hidden_states: torch.Tensor  # [total_tokens, hidden], the chunks' rows in order
    chunks: list[Chunk]
    free_ids: list[int]  # sequences whose caches go before the step runs
    full_logits: list[bool]  # per chunk: its logits row, or only its best token and log-sum-exp
    request_ids: list[str]  # for the logs
    scoring: list[Scoring] = field(default_factory=list)  # per chunk, rows to score; empty: none
    penalties: list[RepetitionPenalty] = field(default_factory=list)  # per chunk, before a greedy pick


@dataclass(frozen=True)
class StepDone:
    step_id: int
    output: StepOutput
    compute_seconds: float


class StepRunner:
    """Runs one gateway's steps on the engine, strictly in arrival order, on a single thread.

    `on_group_broken(reason)` is called when the process group cannot be used any more; the caller
    exits so that the supervisor restarts every rank into a fresh group.
    """

    def __init__(self, on_group_broken: Callable[[str], None], *, wedge_grace_s: float) -> None:
        self.on_group_broken = on_group_broken
        self.wedge_grace_s = wedge_grace_s  # how long a step may outlive its closed stream
        self.engine: ShardEngine | None = None  # set once loaded
        # Collectives must run in the same order on every rank, so every step runs on this one thread.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-step")
        self.running_step: asyncio.Future | None = None
        self.settling: asyncio.Future | None = None
        self.stream_open = False
        self.receiving = False  # the open stream's gateway is still there (its requests can arrive)

    @property
    def left_behind(self) -> bool:
        """A step of a closed stream is still running (its wedge watch decides whether the group lives)."""
        return not self.receiving and self.running_step is not None and not self.running_step.done()

    @property
    def ready(self) -> bool:
        """Whether a gateway may drive this worker now: loaded, and no step left behind by the last one."""
        return self.engine is not None and not self.left_behind

    def ready_engine(self) -> ShardEngine:
        if self.engine is None:
            raise NotReady("shard worker is still loading; retry when ready")
        return self.engine

    @contextlib.asynccontextmanager
    async def stream(
        self, incoming: AsyncIterator[Request], peer: str
    ) -> AsyncIterator[AsyncIterator[Request]]:
        """Open this worker's one step stream over `incoming` and give its requests, in order.

        When `incoming` breaks, requests not handed out yet are dropped; when the stream closes, every
        KV cache is dropped (they belong to the gateway on the other end).
        """
        engine = self.ready_engine()
        if self.left_behind:
            # A new gateway's steps would queue behind it, and the group may be about to break.
            raise NotReady(
                "the last gateway's step is still running here, perhaps waiting in a collective for a peer "
                "that never got it; retry once it ends or the group is re-formed"
            )
        if self.stream_open:
            raise StreamTaken(
                "another gateway already holds this worker's step stream; one gateway drives a shard group"
            )
        self.stream_open = self.receiving = True
        loop = asyncio.get_running_loop()
        log.info("step_stream_opened", peer=peer)
        # Reading in its own task keeps a receive pending at all times, so a gateway that vanishes
        # mid-step is noticed even while a step runs (gRPC notices only on I/O).
        requests: asyncio.Queue = asyncio.Queue()
        reader = asyncio.ensure_future(self._read(incoming, requests))
        try:
            yield self._in_order(requests)
        finally:
            reader.cancel()
            self.stream_open = False
            # gRPC may cancel a vanished gateway's handler more than once, and a second cancel would
            # interrupt this await: the reset is queued first and shielded, so it runs (before any step
            # of a next stream, on the one step thread) however often the handler is cancelled.
            try:
                reset = loop.run_in_executor(self.executor, engine.reset)
            except RuntimeError:  # the worker is stopping and its step thread is gone, caches with it
                log.info("step_stream_closed", peer=peer, reset="skipped: the worker is stopping")
            else:
                reset.add_done_callback(lambda _: log.info("step_stream_closed", peer=peer))
                await asyncio.shield(reset)

    async def run(self, step: Step) -> StepDone:
        """Run one step on the step thread; raises StepRejected or GroupBroken."""
        engine = self.ready_engine()
        started = time.perf_counter()
        self.running_step = asyncio.get_running_loop().run_in_executor(
            self.executor,
            engine.step,
            step.hidden_states,
            step.chunks,
            step.free_ids,
            step.full_logits,
            step.scoring,
            step.penalties,
        )
        try:
            # Shielded: a stream that goes away must not cancel the future the wedge watch observes.
            output = await asyncio.shield(self.running_step)
        except (ValueError, KeyError) as exc:
            log.warning("step_rejected", step_id=step.step_id, error=str(exc))
            raise StepRejected(f"step {step.step_id}: {exc}") from exc
        except Exception as exc:
            self.on_group_broken(f"step {step.step_id} failed: {exc}")
            raise GroupBroken(f"shard group broken: {exc}") from exc
        elapsed = time.perf_counter() - started
        tokens = step.hidden_states.shape[0]
        metrics.WORKER_STEP.observe(elapsed)
        metrics.WORKER_STEP_TOKENS.observe(tokens)
        metrics.WORKER_CACHED_SEQUENCES.set(engine.cache.num_sequences)
        metrics.WORKER_CACHED_TOKENS.set(engine.cache.num_tokens)
        log.debug(
            "step_done",
            step_id=step.step_id,
            sequences=len(step.chunks),
            tokens=tokens,
            seconds=round(elapsed, 6),
            request_ids=step.request_ids,
        )
        return StepDone(step_id=step.step_id, output=output, compute_seconds=elapsed)

    @staticmethod
    async def _in_order(requests: asyncio.Queue) -> AsyncIterator:
        while (request := await requests.get()) is not None:
            yield request

    async def _read(self, incoming: AsyncIterator, requests: asyncio.Queue) -> None:
        try:
            async for request in incoming:
                requests.put_nowait(request)
        except Exception as exc:  # the gateway went away; the stream is over either way
            log.info("step_stream_broken", error=str(exc))
        finally:
            self.receiving = False
            # Steps not started yet are dropped: with their gateway gone, a peer may never get them,
            # and starting one would wait in a collective forever.
            while not requests.empty():
                requests.get_nowait()
            requests.put_nowait(None)
            # Its own task: the stream cancels this reader when it closes, which must not stop the watch.
            self.settling = asyncio.ensure_future(self._settle_running_step())

    async def _settle_running_step(self) -> None:
        """A stream that closes mid-step may leave this rank waiting in a collective for a peer that
        never got the step; after a grace period the group is wedged and must be re-formed."""
        step = self.running_step
        if step is None or step.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(step), timeout=self.wedge_grace_s)
        except TimeoutError:
            self.on_group_broken(
                f"a step is stuck in a collective {self.wedge_grace_s} s after its stream closed"
            )
        except Exception:  # its failure was reported where it was awaited
            pass
