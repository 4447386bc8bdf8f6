"""The engine's loop over a real shard worker process (W=1) through a real ShardPool: streaming token by
token, freeing the worker's cache, letting a burst arrive, and failing in-flight requests when the worker
is lost, then serving again once a fresh one answers on the same port."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Iterator

import grpc
import pytest
import torch

from bloomduo.core import metrics
from bloomduo.gateway.config import SchedulerSettings
from bloomduo.gateway.engine import Engine, EngineUnavailable, StreamEvent
from bloomduo.gateway.request import GenerationRequest
from bloomduo.gateway.sampling import SamplingParams
from bloomduo.gateway.shards import ShardPool
from bloomduo.gateway.stopping import FinishReason
from bloomduo.v1 import shard_pb2, shard_pb2_grpc
from tests._shard_workers import ShardWorkers
from tests.conftest import TinyModel
from tests.reference import hf_greedy, hf_model

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def worker(model: TinyModel) -> Iterator[ShardWorkers]:
    """One float32 worker (W=1) for the whole module; the last test kills it and starts a fresh one."""
    with ShardWorkers(model.model_dir, ["float32"]) as workers:
        yield workers


def _request(model: TinyModel, request_id: str, prompt: str, max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        prompt_ids=model.tokenizer.encode(prompt).ids,
        sampling=SamplingParams(),
        max_new_tokens=max_new_tokens,
        ignore_eos=True,
        details=True,
    )


def _engine(model: TinyModel, pool: ShardPool, settings: SchedulerSettings, **kwargs) -> Engine:
    return Engine(
        model.tokenizer,
        model.embedder,
        pool,
        settings,
        eos_token_id=model.checkpoint.config.eos_token_id,
        **kwargs,
    )


async def _collect(engine: Engine, request: GenerationRequest) -> list[StreamEvent]:
    return [event async for event in engine.generate(request)]


async def _until(predicate, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, f"not reached within {timeout_s} s"
        await asyncio.sleep(0.01)


async def _idle(pool: ShardPool, engine: Engine | None = None, steps: int = 0, held: int = 0) -> bool:
    """The worker holds `held` sequences (and the engine has had `steps` steps come back: the worker frees
    caches as a step starts, before its answer reaches the engine)."""
    cached = [info.cached_sequences for info in await pool.load()]
    return cached == [held] and (engine is None or engine.steps >= steps)


def _assert_greedy(model: TinyModel, request: GenerationRequest, events: list[StreamEvent]) -> None:
    """The tokens are transformers' greedy ones; logprobs within a few float32 roundings of its logits'
    scale (the worker sums in another order)."""
    expected_ids, expected_logprobs = hf_greedy(model.model_dir, request.prompt_ids, request.max_new_tokens)
    assert [event.token.id for event in events] == expected_ids
    with torch.inference_mode():
        ids = torch.tensor([request.prompt_ids + expected_ids])
        scale = hf_model(model.model_dir)(ids).logits.abs().max().item()
    for event, expected in zip(events, expected_logprobs, strict=True):
        assert abs(event.token.logprob - expected) <= 16 * EPS32 * scale


def test_a_request_streams_one_event_per_token_and_its_cache_is_freed_after(model, worker) -> None:
    request = _request(model, "r0", "Hello", max_new_tokens=3)

    async def scenario() -> tuple[list[StreamEvent], list[int], list[int], int]:
        pool = ShardPool(worker.targets, model.checkpoint.config.vocab_size, step_timeout_s=30.0)
        engine = _engine(model, pool, SchedulerSettings(prefix_cache_tokens=0))
        await pool.wait_ready(timeout_s=30.0)
        engine.start()
        try:
            events, steps_at_event, cached_while_streaming = [], [], []
            with grpc.insecure_channel(worker.targets[0]) as channel:
                info = shard_pb2_grpc.ShardServiceStub(channel).Info
                async for event in engine.generate(request):
                    # Read before anything awaits: the engine's next step cannot have come back yet.
                    steps_at_event.append(engine.steps)
                    events.append(event)
                    if event.result is None:
                        # A blocking call holds the loop the engine runs on: no step that could free the
                        # cache is sent while the worker is asked.
                        cached_while_streaming.append(
                            info(shard_pb2.ShardInfoRequest(), timeout=10).cached_sequences
                        )
            await _until(lambda: _idle(pool, engine, steps=4), timeout_s=10.0)
            assert engine.in_flight == 0
            return events, steps_at_event, cached_while_streaming, engine.steps
        finally:
            await engine.stop()
            await pool.close()

    events, steps_at_event, cached_while_streaming, steps = asyncio.run(scenario())
    # One event per step, each as its step came back; the worker held the sequence until the last token,
    # then one more step (with no token) freed it.
    assert steps_at_event == [1, 2, 3]
    assert cached_while_streaming == [1, 1]
    assert steps == 3 + 1
    _assert_greedy(model, request, events)
    result = events[-1].result
    assert result is not None and [event.result for event in events[:-1]] == [None, None]
    assert (result.finish_reason, result.generated_tokens) == (FinishReason.LENGTH, 3)
    assert result.tokens == [event.token for event in events]
    assert result.text == model.tokenizer.decode([event.token.id for event in events])


def test_the_next_step_goes_to_the_workers_before_the_last_token_reaches_its_stream(model, worker) -> None:
    """Delivering a token (a protobuf or JSON write to the client) waits until the next step's request is on
    its way to the workers, so it runs while they compute instead of before they start."""
    request = _request(model, "r-order", "Hello", max_new_tokens=4)

    async def scenario() -> list[tuple[str, int]]:
        pool = ShardPool(worker.targets, model.checkpoint.config.vocab_size, step_timeout_s=30.0)
        engine = _engine(model, pool, SchedulerSettings())
        await pool.wait_ready(timeout_s=30.0)
        order: list[tuple[str, int]] = []
        connection = pool.connections[0]
        send = connection.step

        async def recorded_send(step_request: shard_pb2.StepRequest) -> shard_pb2.StepResponse:
            order.append(("sent", step_request.step_id))
            return await send(step_request)

        connection.step = recorded_send
        engine.start()
        try:
            async for event in engine.generate(request):
                order.append(("token", event.token.id))
        finally:
            await engine.stop()
            await pool.close()
        return order

    order = asyncio.run(scenario())
    sent = [step_id for what, step_id in order if what == "sent"]
    # Token k came back with the k-th step; each but the last is delivered after step k + 1 was sent.
    delivered_after = [
        [step_id for what, step_id in order[:index] if what == "sent"][-1]
        for index, (what, _) in enumerate(order)
        if what == "token"
    ]
    assert len(delivered_after) == request.max_new_tokens
    assert delivered_after[:-1] == sent[1 : request.max_new_tokens], order


# A learned step cost of 20 s (a large model on a slow machine): an idle engine then waits for 0.8 s of
# quiet after the latest arrival, 5 s at most (step_cost.arrival_wait), however slow this machine is.
LEARNED_STEP_S = 20.0
QUIET_S, MAX_WAIT_S = 0.04 * LEARNED_STEP_S, 0.25 * LEARNED_STEP_S
BURST = 5


@pytest.mark.parametrize("burst_wait", [True, False])
def test_an_idle_engine_lets_a_burst_arrive_before_its_first_step(model, worker, burst_wait: bool) -> None:
    async def scenario() -> tuple[list[int], float, float, dict[int, list[int]]]:
        pool = ShardPool(worker.targets, model.checkpoint.config.vocab_size, step_timeout_s=30.0)
        engine = _engine(model, pool, SchedulerSettings(burst_wait=burst_wait, prefix_sharing=False))
        for tokens in [1, 100] * 5:
            engine.scheduler.observe_step(tokens, LEARNED_STEP_S + 0.001 * tokens)
        # The cost is a least-squares fit: exact up to a few float64 roundings.
        expected_wait = (QUIET_S, MAX_WAIT_S) if burst_wait else (0.0, 0.0)
        assert engine.scheduler.arrival_wait() == pytest.approx(expected_wait, rel=8 * sys.float_info.epsilon)
        await pool.wait_ready(timeout_s=30.0)
        engine.start()
        loop = asyncio.get_running_loop()
        first_token_at: list[float] = []
        steps_at_event: dict[int, list[int]] = {n: [] for n in range(BURST)}

        async def generate(n: int) -> None:
            async for _ in engine.generate(_request(model, f"r{n}", "Hello there", max_new_tokens=2)):
                steps_at_event[n].append(engine.steps)  # the step this token came from
                first_token_at.append(loop.time())

        requests, queued_at_arrival = [], []
        try:
            for n in range(BURST):
                queued_at_arrival.append(len(engine.waiting))
                requests.append(asyncio.ensure_future(generate(n)))
                last_arrival = loop.time()
                await asyncio.sleep(0.01)
            await asyncio.gather(*requests)
            await _until(lambda: _idle(pool), timeout_s=10.0)
            return queued_at_arrival, last_arrival, min(first_token_at), steps_at_event
        finally:
            for request in requests:
                request.cancel()
            await engine.stop()
            await pool.close()

    queued_at_arrival, last_arrival, first_token, steps_at_event = asyncio.run(scenario())
    if burst_wait:
        # Each arrival found every earlier request still queued; the first step went only after the quiet
        # period, and carried all five: each got its tokens from steps 1 and 2.
        assert queued_at_arrival == list(range(BURST))
        assert first_token >= last_arrival + QUIET_S * (1 - 8 * sys.float_info.epsilon)
        assert first_token < last_arrival + MAX_WAIT_S  # it went once the burst was quiet, not at the cap
        assert steps_at_event == {n: [1, 2] for n in range(BURST)}
    else:
        # The first request left the queue for a step of its own before the second one arrived.
        assert queued_at_arrival[:2] == [0, 0]
        assert steps_at_event[0] == [1, 2]
        assert all(steps[0] > 1 for n, steps in steps_at_event.items() if n > 0)


def test_a_finished_request_keeps_its_cache_while_idle_for_a_next_turn_to_copy(model, worker) -> None:
    first = _request(model, "r0", "Hello", max_new_tokens=3)

    async def scenario() -> tuple[list[StreamEvent], GenerationRequest, float]:
        pool = ShardPool(worker.targets, model.checkpoint.config.vocab_size, step_timeout_s=30.0)
        engine = _engine(model, pool, SchedulerSettings())
        await pool.wait_ready(timeout_s=30.0)
        engine.start()
        try:
            replies = await _collect(engine, first)
            # No step frees it: the worker keeps the finished sequence while nothing runs.
            await _until(lambda: _idle(pool, engine, steps=3, held=1), timeout_s=10.0)
            assert engine.steps == 3
            shared = metrics.PREFIX_TOKENS_SHARED._value.get()
            # The next turn: the conversation so far, then more.
            turn = [
                *first.prompt_ids,
                *(event.token.id for event in replies),
                *model.tokenizer.encode(" and").ids,
            ]
            second = dataclasses.replace(first, request_id="r1", prompt_ids=turn, max_new_tokens=4)
            answer = await _collect(engine, second)
            copied = metrics.PREFIX_TOKENS_SHARED._value.get() - shared
            # r0 went with the step after r1 started (kept only while nothing runs); r1 is kept now.
            await _until(lambda: _idle(pool, held=1), timeout_s=10.0)
            return answer, second, copied
        finally:
            await engine.stop()
            await pool.close()

    answer, second, copied = asyncio.run(scenario())
    # r0's cache held its prompt and the replies fed back (all but the last, never fed)
    assert copied == len(first.prompt_ids) + first.max_new_tokens - 1
    _assert_greedy(model, second, answer)  # what computing the whole prompt gives


def test_a_lost_worker_fails_the_requests_in_flight_and_the_engine_serves_again(model, worker) -> None:
    changes: list[bool] = []

    async def on_serving_change(serving: bool) -> None:
        changes.append(serving)

    async def scenario() -> tuple[list[StreamEvent], list[StreamEvent]]:
        pool = ShardPool(worker.targets, model.checkpoint.config.vocab_size, step_timeout_s=30.0)
        engine = _engine(model, pool, SchedulerSettings(), on_serving_change=on_serving_change)
        await pool.wait_ready(timeout_s=30.0)
        engine.start()
        try:
            before = await _collect(engine, _request(model, "r0", "Hello", max_new_tokens=8))
            streams = [
                engine.generate(_request(model, f"r{n}", "A long story", max_new_tokens=1000)) for n in (1, 2)
            ]
            for stream in streams:
                await anext(stream)
            assert engine.in_flight == 2
            worker.kill()
            for stream in streams:  # every request in flight fails, at once
                with pytest.raises(EngineUnavailable, match=f"shard worker {worker.targets[0]}"):
                    async for _ in stream:
                        pass
            await _until(lambda: _changed(changes, [False]), timeout_s=10.0)
            assert not engine.serving
            await asyncio.to_thread(worker.start)  # a fresh process on the same port
            await _until(lambda: _changed(changes, [False, True]), timeout_s=60.0)
            assert engine.serving and engine.in_flight == 0
            # r0's kept cache went with the old worker: r3, its prompt again, computes it in full.
            after = await _collect(engine, _request(model, "r3", "Hello", max_new_tokens=8))
            # The fresh worker holds only what this engine gave it: r3's cache, kept for a next turn.
            await _until(lambda: _idle(pool, held=1), timeout_s=10.0)
            return before, after
        finally:
            await engine.stop()
            await pool.close()

    before, after = asyncio.run(scenario())
    assert [event.token.id for event in after] == [event.token.id for event in before]
    assert after[-1].result is not None and after[-1].result.generated_tokens == 8
    assert changes == [False, True]


async def _changed(changes: list[bool], expected: list[bool]) -> bool:
    return changes == expected
