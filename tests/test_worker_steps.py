"""StepRunner without gRPC: order, the one step thread, the fault triage, the wedge watch; and the
servicer's edge (protos to steps, failures to status codes)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
import pytest
import torch

from bloomduo.shard_worker.engine import StepOutput
from bloomduo.shard_worker.server import STATUS_CODES, response_of, step_from_proto
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
from bloomduo.v1 import shard_pb2


class FakeEngine:
    """Doubles each step's hidden states; `fail` is raised by every step, `gate` holds each step."""

    def __init__(self, fail: Exception | None = None, gate: threading.Event | None = None) -> None:
        self.fail, self.gate = fail, gate
        self.cache = SimpleNamespace(num_sequences=0, num_tokens=0)
        self.started: list[float] = []
        self.threads: set[str] = set()
        self.resets = 0

    def step(self, hidden: torch.Tensor, chunks, free_ids, full_logits) -> StepOutput:
        self.started.append(hidden[0, 0].item())
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(timeout=10)
        if self.fail is not None:
            raise self.fail
        return StepOutput(hidden * 2)

    def reset(self) -> None:
        self.resets += 1


def _step(step_id: int) -> Step:
    return Step(
        step_id=step_id,
        hidden_states=torch.full((1, 4), float(step_id)),
        chunks=[Chunk(step_id, 0, 1)],
        free_ids=[],
        full_logits=[True],
        request_ids=[f"r{step_id}"],
    )


async def _incoming(steps: list[Step], then: Exception | None = None, pause_s: float = 0.0) -> AsyncIterator:
    """A gateway sending `steps`, then raising `then` after `pause_s`, or (None) staying connected."""
    for step in steps:
        yield step
    await asyncio.sleep(pause_s)
    if then is not None:
        raise then
    await asyncio.Event().wait()


def _runner(engine: FakeEngine | None, wedge_grace_s: float = 10.0) -> tuple[StepRunner, list[str]]:
    broken: list[str] = []
    runner = StepRunner(broken.append, wedge_grace_s=wedge_grace_s)
    runner.engine = engine
    return runner, broken


async def _serve(runner: StepRunner, incoming: AsyncIterator, steps: int | None = None) -> list[StepDone]:
    """What the servicer does with one stream, less the protos: until `steps` are done or it ends."""
    done: list[StepDone] = []
    async with runner.stream(incoming, "test") as requests:
        async for step in requests:
            done.append(await runner.run(step))
            if len(done) == steps:
                break
    return done


def test_steps_run_in_order_on_the_one_step_thread_and_the_caches_go_with_the_stream():
    engine = FakeEngine()
    runner, broken = _runner(engine)
    done = asyncio.run(_serve(runner, _incoming([_step(i) for i in (3, 1, 2)]), steps=3))
    assert [d.step_id for d in done] == [3, 1, 2] and engine.started == [3.0, 1.0, 2.0]
    assert all(torch.equal(d.output.logits, 2 * _step(d.step_id).hidden_states) for d in done)
    assert all(d.compute_seconds >= 0 for d in done)
    assert len(engine.threads) == 1 and next(iter(engine.threads)).startswith("shard-step")
    assert engine.resets == 1 and not runner.stream_open and not broken


def test_a_loading_worker_is_not_ready():
    runner, _ = _runner(None)
    with pytest.raises(NotReady, match="still loading"):
        asyncio.run(_serve(runner, _incoming([_step(1)])))
    assert not runner.stream_open


def test_one_stream_per_worker():
    async def scenario(runner: StepRunner) -> None:
        async with runner.stream(_incoming([]), "first"):
            with pytest.raises(StreamTaken, match="one gateway drives a shard group"):
                await _serve(runner, _incoming([_step(1)]))
        assert [d.step_id for d in await _serve(runner, _incoming([_step(2)]), steps=1)] == [2]  # free again

    engine = FakeEngine()
    runner, _ = _runner(engine)
    asyncio.run(scenario(runner))
    assert engine.resets == 2  # the refused stream did not touch the first one's caches


def test_a_refused_step_leaves_the_group_alone():
    engine = FakeEngine(fail=ValueError("chunk starts at position 3"))
    runner, broken = _runner(engine)
    with pytest.raises(StepRejected, match="step 5: chunk starts at position 3"):
        asyncio.run(_serve(runner, _incoming([_step(5)])))
    assert not broken and engine.resets == 1


def test_a_failed_collective_breaks_the_group():
    engine = FakeEngine(fail=RuntimeError("peer rank 1 exited"))
    runner, broken = _runner(engine)
    with pytest.raises(GroupBroken, match="shard group broken: peer rank 1 exited"):
        asyncio.run(_serve(runner, _incoming([_step(5)])))
    assert broken == ["step 5 failed: peer rank 1 exited"] and engine.resets == 1


def test_steps_queued_behind_a_broken_stream_are_dropped():
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    runner, broken = _runner(engine)

    async def scenario() -> list[StepDone]:
        serving = asyncio.ensure_future(_serve(runner, _incoming([_step(1), _step(2)], ConnectionError())))
        while runner.settling is None:  # the reader saw the break while step 1 runs
            await asyncio.sleep(0.01)
        gate.set()
        return await serving

    assert [d.step_id for d in asyncio.run(scenario())] == [1]
    assert engine.started == [1.0] and not broken


def test_a_step_outliving_its_stream_by_the_grace_breaks_the_group():
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    runner, broken = _runner(engine, wedge_grace_s=0.05)

    async def scenario() -> None:
        serving = asyncio.ensure_future(_serve(runner, _incoming([_step(1)], ConnectionError(), 0.02)))
        for _ in range(500):
            if broken:
                break
            await asyncio.sleep(0.01)
        gate.set()  # the collective returns at last
        await serving

    asyncio.run(scenario())
    assert broken == ["a step is stuck in a collective 0.05 s after its stream closed"]


def test_every_failure_has_one_status_code():
    assert set(STATUS_CODES) == set(WorkerError.__subclasses__())
    assert STATUS_CODES[StepRejected] == STATUS_CODES[StreamTaken] == grpc.StatusCode.FAILED_PRECONDITION
    assert STATUS_CODES[GroupBroken] == STATUS_CODES[NotReady] == grpc.StatusCode.UNAVAILABLE
    assert STATUS_CODES[BadStep] == grpc.StatusCode.INVALID_ARGUMENT


def test_the_edge_translates_protos_and_refuses_a_bad_tensor():
    from bloomduo.core.tensor_wire import decode_tensor, encode_tensor

    hidden = torch.arange(8.0).view(2, 4)
    request = shard_pb2.StepRequest(
        step_id=9,
        hidden_states=encode_tensor(hidden),
        sequences=[
            shard_pb2.SequenceChunk(sequence_id=4, start_position=0, num_tokens=2, prefix_sequence_id=0)
        ],
        free_sequence_ids=[1, 2],
        request_ids=["a"],
        full_logits=[False],
    )
    step = step_from_proto(request)
    assert (step.step_id, step.chunks, step.free_ids, step.full_logits) == (
        9,
        [Chunk(4, 0, 2)],
        [1, 2],
        [False],
    )
    assert torch.equal(step.hidden_states, hidden) and step.request_ids == ["a"]

    request.hidden_states.shape[:] = [3, 4]  # 12 elements declared, 8 sent
    with pytest.raises(BadStep, match="hidden_states"):
        step_from_proto(request)

    output = StepOutput(hidden[:0], best_logit=[1.5], best_token=[7], logsumexp=[2.5])
    response = response_of(StepDone(step_id=9, output=output, compute_seconds=0.25))
    assert (response.step_id, list(response.best_token), response.compute_seconds) == (9, [7], 0.25)
    assert decode_tensor(response.logits).shape == (0, 4)
    assert "vocab_start" not in shard_pb2.StepResponse.DESCRIPTOR.fields_by_name  # in ShardInfoResponse only
