"""StepRunner on real ShardEngines: order, the one step thread, the fault triage, the wedge watch; and the
servicer's edge (protos to steps, failures to status codes), the latter on a real gRPC server on loopback.

Every engine here is real, on the tiny demo model:
- one rank (W=1) in this process, loaded by ShardEngine.load, for what an engine produces by itself:
  the order steps run in and their thread (seen by a forward hook on the real model), the KV caches'
  lifetime, the real KV cache's refusal of a chunk that does not continue its sequence;
- a real group of two ranks in two spawned processes (gloo plus the shared-memory all-reduce, as
  `bloomduo up` runs CPU workers), for the faults only a group has. Rank 0 serves its steps through a
  StepRunner; rank 1 is its peer and runs a step only when rank 0 hands it over, so rank 0's step really
  waits in the all-reduce until then; at the end the test kills rank 1 with SIGKILL.

tests/test_faults.py kills a worker of the whole stack and checks the client's UNAVAILABLE and that the
survivor exits and the pair heals; there the survivor may exit through the failed collective or through the
wedge watch, whichever comes first. The group tests below pin each of the two down on its own, and the
steps dropped behind a broken stream, which the stack tests cannot observe.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
import torch.distributed as dist

from bloomduo.apps.demo_model import PRESETS
from bloomduo.core.logprobs import NO_PENALTY, RepetitionPenalty, Scoring
from bloomduo.core.tensor_wire import decode_tensor, write_tensor
from bloomduo.shard_worker.config import ShardOptions
from bloomduo.shard_worker.distributed import shutdown_distributed
from bloomduo.shard_worker.engine import ShardEngine
from bloomduo.shard_worker.server import STATUS_CODES, ShardServicer, response_of, step_from_proto
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
from bloomduo.shard_worker.tensor_parallel import RowParallel
from bloomduo.v1 import shard_pb2, shard_pb2_grpc

HIDDEN = PRESETS["tiny"]["hidden_size"]
VOCAB = PRESETS["tiny"]["vocab_size"]
PAIR_TIMEOUT_S = 20.0  # the pair's collective timeout: bounds a step that (wrongly) waits for its peer
WEDGE_GRACE_S = 0.2  # a real step of the tiny model takes milliseconds; a wedged one never ends


# ----------------------------------------------------------------------------------------- helpers
def _step(step_id: int, *chunks: Chunk, full_logits: list[bool] | None = None, free_ids=()) -> Step:
    """A step over `chunks`. Its hidden states are random rows of unit scale, like the embedding
    LayerNorm's output the gateway sends, and the same for a step id on every rank."""
    rows = sum(chunk.num_tokens for chunk in chunks)
    generator = torch.Generator().manual_seed(step_id)
    return Step(
        step_id=step_id,
        hidden_states=torch.randn(rows, HIDDEN, generator=generator),
        chunks=list(chunks),
        free_ids=list(free_ids),
        full_logits=full_logits or [True] * len(chunks),
        request_ids=[f"r{step_id}"] * len(chunks),
    )


def _request(step: Step) -> shard_pb2.StepRequest:
    """What the gateway sends for `step`."""
    request = shard_pb2.StepRequest(
        step_id=step.step_id,
        sequences=[
            shard_pb2.SequenceChunk(
                sequence_id=c.sequence_id,
                start_position=c.start_position,
                num_tokens=c.num_tokens,
                prefix_sequence_id=c.prefix_sequence_id,
            )
            for c in step.chunks
        ],
        free_sequence_ids=step.free_ids,
        request_ids=step.request_ids,
        full_logits=step.full_logits,
    )
    write_tensor(request.hidden_states, step.hidden_states)
    return request


async def _incoming(steps: list, then: Exception | None = None, pause_s: float = 0.0) -> AsyncIterator:
    """A gateway sending `steps`, then raising `then` after `pause_s`, or (None) staying connected."""
    for step in steps:
        yield step
    await asyncio.sleep(pause_s)
    if then is not None:
        raise then
    await asyncio.Event().wait()


async def _fed(queue: asyncio.Queue) -> AsyncIterator:
    """A gateway sending whatever the test puts in `queue`, when it puts it."""
    while True:
        yield await queue.get()


async def _serve(
    runner: StepRunner, incoming: AsyncIterator, steps: int | None = None, cached: list | None = None
) -> list[StepDone]:
    """What the servicer does with one stream, less the protos: until `steps` are done or it ends.
    `cached` gets the tokens in the engine's KV cache after each step."""
    done: list[StepDone] = []
    async with runner.stream(incoming, "test") as requests:
        async for step in requests:
            done.append(await runner.run(step))
            if cached is not None:
                cached.append(runner.engine.cache.num_tokens)
            if len(done) == steps:
                break
    return done


async def _until(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not reached within {timeout_s} s")
        await asyncio.sleep(0.01)


def _new_runner(engine: ShardEngine | None, wedge_grace_s: float) -> tuple[StepRunner, list[str]]:
    broken: list[str] = []
    runner = StepRunner(broken.append, wedge_grace_s=wedge_grace_s)
    runner.engine = engine
    return runner, broken


# ------------------------------------------------------------------------------- one rank, here
@pytest.fixture(scope="module")
def loaded_engine(demo_model, tmp_path_factory) -> Iterator[ShardEngine]:
    """One real rank (W=1) of the tiny demo model, in a gloo group of its own in this process."""
    options = ShardOptions(
        model_dir=demo_model(),
        rank=0,
        world_size=1,
        dist_init=f"file://{tmp_path_factory.mktemp('rendezvous') / 'store'}",
        dist_timeout_s=60,
        kv_cache_slots=4,
    )
    # On a thread of its own, as `serve` loads on the step thread: load() turns on flush-denormal for the
    # thread it runs on, which must not carry over to the pytest thread the other tests run on.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as loader:
        engine = loader.submit(ShardEngine.load, options).result()
    try:
        yield engine
    finally:
        shutdown_distributed()
    assert not dist.is_initialized()


@pytest.fixture
def engine(loaded_engine: ShardEngine) -> Iterator[ShardEngine]:
    loaded_engine.reset()
    yield loaded_engine
    loaded_engine.reset()


@pytest.fixture
def make_runner() -> Iterator[Callable[..., tuple[StepRunner, list[str]]]]:
    """make(engine, wedge_grace_s=10) -> (a StepRunner over it, the reasons it reported the group broken)."""
    runners: list[StepRunner] = []

    def make(engine: ShardEngine | None, wedge_grace_s: float = 10.0) -> tuple[StepRunner, list[str]]:
        runner, broken = _new_runner(engine, wedge_grace_s)
        runners.append(runner)
        return runner, broken

    yield make
    for runner in runners:
        runner.executor.shutdown(wait=True)


def test_steps_run_in_order_on_the_one_step_thread_and_the_caches_go_with_the_stream(engine, make_runner):
    """Steps 3, 1, 2 continue one sequence in the order they arrive: run by step id, step 1 would not
    continue the KV cache and be refused. Forward hooks on the real model's first block and LM head see
    each step's thread, rows and logits."""
    runner, broken = make_runner(engine)
    calls: list[tuple[str, int]] = []
    head_outputs: list[torch.Tensor] = []

    def record(module, args, output):
        calls.append((threading.current_thread().name, args[0].shape[0]))

    steps = [_step(3, Chunk(0, 0, 3)), _step(1, Chunk(0, 3, 1)), _step(2, Chunk(0, 4, 2))]
    cached: list[int] = []
    hooks = [
        engine.model.h[0].register_forward_hook(record),
        engine.model.lm_head.register_forward_hook(lambda module, args, logits: head_outputs.append(logits)),
    ]
    try:
        done = asyncio.run(_serve(runner, _incoming(steps), steps=3, cached=cached))
    finally:
        for hook in hooks:
            hook.remove()
    assert [d.step_id for d in done] == [3, 1, 2] and [rows for _, rows in calls] == [3, 1, 2]
    assert len({name for name, _ in calls}) == 1 and calls[0][0].startswith("shard-step")
    for step_done, logits in zip(done, head_outputs, strict=True):
        assert step_done.output.logits.shape == (1, VOCAB)
        assert torch.equal(step_done.output.logits, logits)  # each step's own logits, not a neighbour's
        assert step_done.compute_seconds > 0
    assert cached == [3, 4, 6]  # the sequence's cache grew with each step while the stream was open
    assert engine.cache.num_sequences == 0 and engine.cache.num_tokens == 0  # and went with it
    assert not runner.stream_open and not broken


def test_a_loading_worker_is_not_ready(make_runner):
    runner, _ = make_runner(None)
    with pytest.raises(NotReady, match="still loading"):
        asyncio.run(_serve(runner, _incoming([_step(1, Chunk(0, 0, 1))])))
    assert not runner.stream_open


def test_one_stream_per_worker(engine, make_runner):
    runner, broken = make_runner(engine)

    async def scenario() -> list[StepDone]:
        first: asyncio.Queue = asyncio.Queue()
        async with runner.stream(_fed(first), "first") as requests:
            first.put_nowait(_step(1, Chunk(0, 0, 3)))
            await runner.run(await anext(requests))
            with pytest.raises(StreamTaken, match="one gateway drives a shard group"):
                await _serve(runner, _incoming([_step(2, Chunk(1, 0, 2))]))
            # The refused stream neither ran its step nor dropped the first one's cache, which goes on.
            assert (engine.cache.num_sequences, engine.cache.length(0)) == (1, 3)
            first.put_nowait(_step(3, Chunk(0, 3, 1)))
            assert (await runner.run(await anext(requests))).step_id == 3
        assert engine.cache.num_sequences == 0
        return await _serve(runner, _incoming([_step(4, Chunk(0, 0, 2))]), steps=1)  # free again

    assert [d.step_id for d in asyncio.run(scenario())] == [4]
    assert not broken


def test_the_caches_go_with_a_stream_cancelled_again_while_it_closes(engine, make_runner):
    """gRPC may cancel a vanished gateway's handler twice; the second cancel lands in the stream's own
    cleanup. The caches must go all the same: held, they kept the next gateway's stack from ever idling."""
    runner, broken = make_runner(engine)

    async def scenario() -> list[StepDone]:
        feed: asyncio.Queue = asyncio.Queue()

        async def handler() -> None:
            async with runner.stream(_fed(feed), "vanishing") as requests:
                feed.put_nowait(_step(1, Chunk(0, 0, 3)))
                await runner.run(await anext(requests))
                await asyncio.Event().wait()  # waiting for the next step, as a live handler does

        task = asyncio.ensure_future(handler())
        await _until(lambda: engine.cache.num_sequences == 1)
        step_thread_free = threading.Event()
        runner.executor.submit(step_thread_free.wait)  # the reset queues behind this, not yet run
        task.cancel()
        await asyncio.sleep(0.05)  # the handler now awaits the reset in its cleanup
        task.cancel()
        await asyncio.sleep(0.05)
        step_thread_free.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: engine.cache.num_sequences == 0, timeout_s=5)
        return await _serve(runner, _incoming([_step(2, Chunk(0, 0, 2))]), steps=1)  # free again

    assert [d.step_id for d in asyncio.run(scenario())] == [2]
    assert not runner.stream_open and not broken


def test_a_refused_step_leaves_the_group_alone(engine, make_runner):
    """The real KV cache refuses a chunk that does not continue its sequence, before the model runs a
    layer and so before any collective; the engine, its caches and the stream carry on. With one rank
    there is no collective to miss: test_a_refused_step_keeps_a_real_group_in_step runs it on two."""
    runner, broken = make_runner(engine)
    steps = [_step(4, Chunk(1, 0, 2)), _step(5, Chunk(0, 3, 2)), _step(6, Chunk(1, 2, 1))]

    async def scenario() -> StepDone:
        async with runner.stream(_incoming(steps), "test") as requests:
            await runner.run(await anext(requests))
            position = r"^step 5: sequence 0: chunk starts at position 3 but the KV cache holds 0"
            with pytest.raises(StepRejected, match=position):
                await runner.run(await anext(requests))
            assert (engine.cache.num_sequences, engine.cache.length(1)) == (1, 2)  # nothing changed
            return await runner.run(await anext(requests))

    assert asyncio.run(scenario()).step_id == 6
    assert not broken


def test_the_edge_translates_protos_and_refuses_a_bad_tensor(engine):
    step = _step(9, Chunk(4, 0, 2), Chunk(5, 0, 3), full_logits=[False, True], free_ids=[1, 2])
    request = _request(step)
    request.sequences[1].prefix_sequence_id = 7
    request.sequences[0].repetition_penalty = 1.3  # not a float32: it must arrive as the request gave it
    request.sequences[0].penalized_token_ids.extend([3, 9])
    translated = step_from_proto(request)
    assert translated.penalties == [RepetitionPenalty(1.3, [3, 9]), NO_PENALTY]
    assert (translated.step_id, translated.chunks, translated.free_ids, translated.full_logits) == (
        9,
        [Chunk(4, 0, 2), Chunk(5, 0, 3, 7)],
        [1, 2],
        [False, True],
    )
    assert torch.equal(translated.hidden_states, step.hidden_states)
    assert translated.request_ids == ["r9", "r9"]

    # What the real engine returns goes back as it is: one logits row, and the other's summary.
    output = engine.step(step.hidden_states, step.chunks, step.free_ids, step.full_logits)
    response = response_of(StepDone(step_id=9, output=output, compute_seconds=0.25))
    assert (response.step_id, response.compute_seconds) == (9, 0.25)
    assert torch.equal(decode_tensor(response.logits), output.logits) and output.logits.shape == (1, VOCAB)
    assert len(output.best_token) == 1 and 0 <= output.best_token[0] < VOCAB
    assert (list(response.best_token), list(response.best_logit), list(response.logsumexp)) == (
        output.best_token,
        output.best_logit,
        output.logsumexp,
    )
    assert "vocab_start" not in shard_pb2.StepResponse.DESCRIPTOR.fields_by_name  # in ShardInfoResponse only

    request.hidden_states.shape[:] = [4, HIDDEN]  # 4 rows declared, 5 sent
    with pytest.raises(BadStep, match=rf"hidden_states: tensor of shape \[4, {HIDDEN}\]"):
        step_from_proto(request)


def test_scored_rows_come_back_as_summaries_and_too_many_next_tokens_are_refused(engine):
    # The second chunk scores its first two rows against tokens 5 and 6, and its last row for its top-3.
    step = _step(10, Chunk(6, 0, 2), Chunk(7, 0, 3))
    request = _request(step)
    request.sequences[1].next_token_ids[:] = [5, 6]
    request.sequences[1].top_n = 3
    translated = step_from_proto(request)
    assert translated.scoring == [Scoring([], 0), Scoring([5, 6], 3)]
    output = engine.step(step.hidden_states, step.chunks, [], step.full_logits, translated.scoring)
    response = response_of(StepDone(step_id=10, output=output, compute_seconds=0.1))
    assert len(response.scored_logsumexp) == 3 and len(response.next_token_logit) == 2
    assert len(response.top_logit) == len(response.top_token) == 9
    # The last scored row is the chunk's last: its summaries are those of its logits row.
    last = output.logits[1].float()
    assert response.scored_logsumexp[2] == pytest.approx(float(torch.logsumexp(last, 0)), abs=1e-5)
    assert list(response.top_token[6:]) == last.topk(3).indices.tolist()
    assert list(response.top_logit[6:]) == pytest.approx(last.topk(3).values.tolist(), abs=1e-5)

    request.sequences[0].next_token_ids[:] = [1, 2, 3]  # a two-row chunk
    with pytest.raises(BadStep, match="sequence 6: 3 next tokens to score, but its chunk has 2 rows"):
        step_from_proto(request)


def test_the_cache_a_long_sequence_grew_goes_back_when_it_is_freed(engine):
    """A 520-token prompt takes the two slots in use to 656 positions; a 500-token one that comes as it
    goes takes them over; the empty step that frees that one gives back the initial four slots of 128,
    and the short sequence that lived through both copies decodes exactly as if they never happened."""

    def run(step: Step) -> torch.Tensor:
        return engine.step(step.hidden_states, step.chunks, list(step.free_ids), step.full_logits).logits

    short_prompt, short_token = _step(20, Chunk(1, 0, 24)), _step(21, Chunk(1, 24, 1))
    run(short_prompt)
    unchanged = run(short_token)
    engine.reset()
    initial_bytes = engine.cache.nbytes
    run(short_prompt)
    run(_step(22, Chunk(2, 0, 520)))
    assert (engine.cache.num_slots, engine.cache.capacity) == (2, 656) and engine.cache.nbytes > initial_bytes
    grown = engine.cache.keys
    run(_step(23, Chunk(3, 0, 500), free_ids=[2]))  # the next long prompt as the last one ends: kept as is
    assert engine.cache.keys is grown
    run(_step(24, free_ids=[3]))  # what the gateway sends once the long request ends and nothing waits
    assert engine.cache.nbytes == initial_bytes and engine.cache.length(1) == 24
    assert torch.equal(run(short_token), unchanged)


async def _held(requests: list[shard_pb2.StepRequest]) -> AsyncIterator[shard_pb2.StepRequest]:
    """A gateway's request stream: `requests`, then connected until the call ends."""
    for request in requests:
        yield request
    await asyncio.Event().wait()


async def _refusal(stub, request: shard_pb2.StepRequest) -> tuple[grpc.StatusCode, str]:
    """The status a Step stream that sends `request` ends with (the test fails if it does not end)."""
    call = stub.Step(_held([request]))
    try:
        await asyncio.wait_for(call.read(), timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()
    finally:
        call.cancel()
    pytest.fail(f"step {request.step_id} was answered, not refused")


async def _failures_over_grpc(servicer: ShardServicer, engine: ShardEngine) -> dict:
    server = grpc.aio.server()
    shard_pb2_grpc.add_ShardServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seen: dict = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = shard_pb2_grpc.ShardServiceStub(channel)

            async def cached() -> tuple[int, int]:
                info = await stub.Info(shard_pb2.ShardInfoRequest(), timeout=5)
                return info.cached_sequences, info.cached_tokens

            seen["loading"] = await _refusal(stub, _request(_step(1, Chunk(0, 0, 3))))
            servicer.runner.engine = engine  # what serve() does once ShardEngine.load returns

            held = stub.Step(_held([_request(_step(2, Chunk(0, 0, 3)))]))
            answer = await asyncio.wait_for(held.read(), timeout=10)
            seen["answer"] = (answer.step_id, tuple(decode_tensor(answer.logits).shape))
            seen["taken"] = await _refusal(stub, _request(_step(3, Chunk(1, 0, 1))))
            seen["cached while held"] = await cached()
            held.cancel()  # the gateway goes away: its caches go with its stream
            deadline = time.monotonic() + 10
            while await cached() != (0, 0) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            seen["cached after"] = await cached()

            bad = _request(_step(4, Chunk(0, 0, 2)))
            bad.hidden_states.shape[:] = [3, HIDDEN]  # 3 rows declared, 2 sent
            seen["bad tensor"] = await _refusal(stub, bad)
            seen["refused"] = await _refusal(stub, _request(_step(5, Chunk(0, 3, 1))))
    finally:
        await server.stop(None)
    return seen


def test_every_failure_reaches_the_gateway_as_its_one_status_code(engine, demo_model):
    """The real servicer on a real gRPC server, over the real engine. A broken group cannot be produced
    by one rank: the table gives it UNAVAILABLE, and the group tests below raise GroupBroken for real."""
    assert set(STATUS_CODES) == set(WorkerError.__subclasses__())
    assert STATUS_CODES[GroupBroken] == STATUS_CODES[NotReady] == grpc.StatusCode.UNAVAILABLE

    broken: list[str] = []
    options = ShardOptions(model_dir=demo_model(), rank=0, world_size=1, dist_init="file:///unused")
    servicer = ShardServicer(options, broken.append)
    try:
        seen = asyncio.run(_failures_over_grpc(servicer, engine))
    finally:
        servicer.runner.executor.shutdown(wait=True)
    codes = grpc.StatusCode
    assert seen["loading"] == (codes.UNAVAILABLE, "shard worker is still loading; retry when ready")
    assert seen["answer"] == (2, (1, VOCAB))
    code, details = seen["taken"]
    assert code == codes.FAILED_PRECONDITION and "one gateway drives a shard group" in details
    assert seen["cached while held"] == (1, 3) and seen["cached after"] == (0, 0)
    code, details = seen["bad tensor"]
    assert code == codes.INVALID_ARGUMENT
    assert details.startswith(f"hidden_states: tensor of shape [3, {HIDDEN}]")
    code, details = seen["refused"]
    assert code == codes.FAILED_PRECONDITION
    assert details.startswith("step 5: sequence 0: chunk starts at position 3 but the KV cache holds 0")
    assert not broken


# ------------------------------------------------------------------ a real group of two processes
def _pair_rank(rank: int, init_method: str, model_dir: str, out_dir: str, peer_steps, peer_idle, peer_dead):
    """One rank of the pair (spawned): rank 0 drives the scenarios, rank 1 follows as its peer."""
    torch.set_num_threads(1)
    try:
        options = ShardOptions(
            model_dir=Path(model_dir),
            rank=rank,
            world_size=2,
            dist_init=init_method,
            dist_timeout_s=PAIR_TIMEOUT_S,
        )
        engine = ShardEngine.load(options)
        if rank == 1:
            _follow(engine, peer_steps, peer_idle, Path(out_dir) / "rank1.json")
        else:
            results = asyncio.run(_drive(engine, peer_steps, peer_dead))
            (Path(out_dir) / "rank0.json").write_text(json.dumps(results))
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    # Rank 0's group is broken by now (its peer was killed): leave as a worker does, without tearing it
    # down. Its shared-memory segment was unlinked when both ranks had attached; exiting unmaps it.
    os._exit(0)


def _follow(engine: ShardEngine, peer_steps, peer_idle, out: Path) -> None:
    """Rank 1: run each step rank 0 hands over, when it hands it over, on its engine directly."""
    outcomes: list[str] = []
    while True:
        command, *args = peer_steps.get(timeout=120)
        if command == "step":
            step = _step(*args)
            try:
                engine.step(step.hidden_states, step.chunks, step.free_ids, step.full_logits)
                outcomes.append(f"ran {step.step_id}")
            except ValueError as exc:
                outcomes.append(f"refused {step.step_id}: {exc}")
        elif command == "reset":
            engine.reset()
        else:  # "idle": the test kills this process now
            out.write_text(json.dumps(outcomes))
            peer_idle.set()
            time.sleep(120)
            return


async def _drive(engine: ShardEngine, peer_steps, peer_dead) -> dict:
    """Rank 0: each scenario through a StepRunner of its own; returns what each saw."""
    results: dict = {}
    rows: list[int] = []  # rows of each model call on this rank
    engine.model.h[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    group = next(m.group for m in engine.model.modules() if isinstance(m, RowParallel))
    results["shared_memory"] = group.shm is not None

    def to_peer(step: Step) -> None:
        peer_steps.put(("step", step.step_id, *step.chunks))

    # A refused step, on both ranks; then a real step, whose all-reduces pair up only if the refused
    # one entered no collective on either rank.
    runner, broken = _new_runner(engine, PAIR_TIMEOUT_S)
    bad, good = _step(7, Chunk(0, 3, 2)), _step(8, Chunk(0, 0, 3))
    to_peer(bad)
    to_peer(good)
    error = None
    try:
        await _serve(runner, _incoming([bad]))
    except WorkerError as exc:
        error = f"{type(exc).__name__}: {exc}"
    done = await _serve(runner, _incoming([good]), steps=1)
    peer_steps.put(("reset",))
    results["refused"] = {"error": error, "then": [d.step_id for d in done], "broken": broken}

    # Steps 1 and 2 arrive, then the gateway goes away while step 1 waits in its all-reduce for rank 1.
    runner, broken = _new_runner(engine, PAIR_TIMEOUT_S)
    rows.clear()
    first, second = _step(1, Chunk(0, 0, 3)), _step(2, Chunk(0, 3, 1))
    serving = asyncio.ensure_future(_serve(runner, _incoming([first, second], ConnectionError("gone"))))
    await _until(lambda: runner.settling is not None)
    waiting = runner.running_step is not None and not runner.running_step.done()
    to_peer(first)  # and never step 2: started, it would wait in its all-reduce for good
    done = await asyncio.wait_for(serving, timeout=2 * PAIR_TIMEOUT_S)
    peer_steps.put(("reset",))
    results["queued"] = {
        "waiting": waiting,
        "done": [d.step_id for d in done],
        "rows": list(rows),
        "broken": broken,
    }

    # A step waits in its all-reduce for a peer that does not get it, and its stream closes.
    runner, broken = _new_runner(engine, WEDGE_GRACE_S)
    stuck = _step(3, Chunk(0, 0, 3))
    serving = asyncio.ensure_future(_serve(runner, _incoming([stuck], ConnectionError("gone"), 0.02)))
    started = time.monotonic()
    await _until(lambda: runner.left_behind)
    # A next gateway must not be told this worker is ready, nor get its stream: its steps would queue
    # behind the stuck one until the group breaks under them.
    ready_while_stuck = runner.ready
    try:
        await _serve(runner, _incoming([_step(4, Chunk(1, 0, 2))]))
        next_stream = "opened"
    except WorkerError as exc:
        next_stream = f"{type(exc).__name__}: {exc}"
    await _until(lambda: broken)
    waited_s = time.monotonic() - started
    still_running = not runner.running_step.done()
    to_peer(stuck)  # the all-reduce returns at last
    done = await asyncio.wait_for(serving, timeout=2 * PAIR_TIMEOUT_S)
    peer_steps.put(("reset",))
    results["wedged"] = {
        "broken": list(broken),
        "waited_s": waited_s,
        "still_running": still_running,
        "done": [d.step_id for d in done],
        "ready_while_stuck": ready_while_stuck,
        "next_stream": next_stream,
        "ready_after": runner.ready,
    }

    # The peer is killed (by the test); the next step's all-reduce fails.
    peer_steps.put(("idle",))
    if not peer_dead.wait(timeout=60):
        raise TimeoutError("the test did not kill rank 1")
    runner, broken = _new_runner(engine, PAIR_TIMEOUT_S)
    started = time.monotonic()
    error = None
    try:
        await _serve(runner, _incoming([_step(5, Chunk(0, 0, 3))]))
    except WorkerError as exc:
        error = f"{type(exc).__name__}: {exc}"
    results["peer_died"] = {"error": error, "broken": broken, "seconds": time.monotonic() - started}
    return results


@pytest.fixture(scope="module")
def pair(demo_model, tmp_path_factory) -> dict:
    """Run the scenarios on a real group of two spawned ranks; what rank 0 saw, rank 1's outcomes, and
    the pid the killed rank 1 had."""
    out = tmp_path_factory.mktemp("pair")
    context = multiprocessing.get_context("spawn")
    peer_steps, peer_idle, peer_dead = context.Queue(), context.Event(), context.Event()
    args = (f"file://{out / 'rendezvous'}", str(demo_model()), str(out), peer_steps, peer_idle, peer_dead)
    ranks = [context.Process(target=_pair_rank, args=(rank, *args), name=f"rank{rank}") for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        deadline = time.monotonic() + 180
        while not peer_idle.wait(timeout=0.2):
            assert [p.exitcode for p in ranks] == [None, None], "a rank of the pair exited early"
            assert time.monotonic() < deadline, "the pair did not get through its scenarios"
        peer_pid = ranks[1].pid
        os.kill(peer_pid, signal.SIGKILL)
        ranks[1].join(timeout=10)
        peer_dead.set()
        ranks[0].join(timeout=60)
        assert ranks[0].exitcode == 0, f"rank 0 ended with {ranks[0].exitcode}"
        return {
            "rank0": json.loads((out / "rank0.json").read_text()),
            "rank1": json.loads((out / "rank1.json").read_text()),
            "peer_pid": peer_pid,
        }
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
        peer_steps.close()
        peer_steps.join_thread()


def test_a_refused_step_keeps_a_real_group_in_step(pair):
    refused = pair["rank0"]["refused"]
    assert refused["error"].startswith("StepRejected: step 7: sequence 0: chunk starts at position 3")
    assert pair["rank1"][0].startswith("refused 7: sequence 0: chunk starts at position 3")
    # The next step's all-reduces paired up on both ranks: neither entered a collective for step 7.
    assert refused["then"] == [8] and pair["rank1"][1] == "ran 8"
    assert refused["broken"] == []


def test_steps_queued_behind_a_broken_stream_are_dropped(pair):
    queued = pair["rank0"]["queued"]
    assert queued["waiting"]  # the break was seen while step 1 waited in its all-reduce
    assert queued["done"] == [1] and queued["rows"] == [3]  # step 2 never reached the model
    assert queued["broken"] == []  # step 1 came back within the grace: the group is fine
    assert pair["rank1"][2:3] == ["ran 1"]


def test_a_step_outliving_its_stream_by_the_grace_breaks_the_group(pair):
    wedged = pair["rank0"]["wedged"]
    assert wedged["broken"] == [f"a step is stuck in a collective {WEDGE_GRACE_S} s after its stream closed"]
    assert wedged["still_running"] and wedged["waited_s"] >= WEDGE_GRACE_S
    assert wedged["done"] == [3] and pair["rank1"][3:] == ["ran 3"]  # it returned once the peer ran it
    assert not wedged["ready_while_stuck"] and wedged["ready_after"]
    assert wedged["next_stream"].startswith("NotReady: the last gateway's step is still running here")


def test_a_failed_collective_breaks_the_group(pair):
    died = pair["rank0"]["peer_died"]
    assert died["error"].startswith("GroupBroken: shard group broken: ")
    (reason,) = died["broken"]
    assert reason.startswith("step 5 failed: ")
    assert died["error"].removeprefix("GroupBroken: shard group broken: ") == reason.removeprefix(
        "step 5 failed: "
    )
    if pair["rank0"]["shared_memory"]:  # how `bloomduo up` runs CPU ranks; else gloo reports the loss
        assert f"rank 1 (pid {pair['peer_pid']}) exited" in reason
    # Noticed from the peer's death, long before the collective timeout would have ended the wait.
    assert died["seconds"] < PAIR_TIMEOUT_S / 4
