"""The engine's loop over stand-in workers: streaming, freeing caches, letting a burst arrive, and failing
in-flight requests when the workers are lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
import torch
from tokenizers import Tokenizer

from bloomduo.gateway.config import SchedulerSettings
from bloomduo.gateway.engine import Engine, EngineUnavailable, StreamEvent
from bloomduo.gateway.request import GenerationRequest
from bloomduo.gateway.sampling import SamplingParams
from bloomduo.gateway.sequence import Chunk
from bloomduo.gateway.shards import ShardUnavailable, StepResult
from bloomduo.gateway.stopping import FinishReason

HIDDEN = 8


@pytest.fixture
def tokenizer(demo_model) -> Tokenizer:
    return Tokenizer.from_file(str(demo_model() / "tokenizer.json"))


class FakeWorkers:
    """Stands in for the ShardPool: records each step and answers every row with the same greedy token."""

    def __init__(self, token_id: int, vocab_size: int, fail_steps: Sequence[int] = ()) -> None:
        self.token_id = token_id
        self.vocab_size = vocab_size
        self.fail_steps = set(fail_steps)  # 1-based steps that raise ShardUnavailable
        self.steps: list[tuple[list[Chunk], list[int]]] = []
        self.first_step_at: float | None = None
        self.streams_reset = 0

    async def step(
        self,
        hidden_states: torch.Tensor,
        chunks: Sequence[Chunk],
        free_ids: Sequence[int],
        request_ids: Sequence[str] = (),
        full_logits: Sequence[bool] = (),
    ) -> StepResult:
        assert hidden_states.shape == (sum(chunk.num_tokens for chunk in chunks), HIDDEN)
        self.first_step_at = self.first_step_at or time.perf_counter()
        self.steps.append((list(chunks), list(free_ids)))
        if len(self.steps) in self.fail_steps:
            raise ShardUnavailable("worker 1 went away")
        full = sum(full_logits)
        return StepResult(
            logits=torch.zeros(full, self.vocab_size),
            greedy=[(self.token_id, -0.25)] * (len(chunks) - full),
            worker_seconds=0.0,
        )

    def reset_streams(self) -> None:
        self.streams_reset += 1

    async def wait_ready(self, timeout_s: float) -> list:
        return []


def _embed(token_ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(token_ids), HIDDEN)


def _request(tokenizer: Tokenizer, request_id: str, prompt: str, max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        prompt_ids=tokenizer.encode(prompt).ids,
        sampling=SamplingParams(),
        max_new_tokens=max_new_tokens,
        details=True,
    )


async def _collect(engine: Engine, request: GenerationRequest) -> list[StreamEvent]:
    return [event async for event in engine.generate(request)]


def _engine(tokenizer: Tokenizer, workers: FakeWorkers, settings: SchedulerSettings, **kwargs) -> Engine:
    return Engine(tokenizer, _embed, workers, settings, eos_token_id=2, **kwargs)


def test_a_request_streams_one_event_per_token_and_its_cache_is_freed_after(tokenizer) -> None:
    token_id = tokenizer.encode(" world").ids[0]
    workers = FakeWorkers(token_id, tokenizer.get_vocab_size())
    request = _request(tokenizer, "r0", "Hello", max_new_tokens=3)

    async def scenario() -> list[StreamEvent]:
        engine = _engine(tokenizer, workers, SchedulerSettings())
        engine.start()
        try:
            events = await _collect(engine, request)
            while len(workers.steps) < 4:  # the step after the last token only frees its cache
                await asyncio.sleep(0.001)
            assert engine.in_flight == 0
            return events
        finally:
            await engine.stop()

    events = asyncio.run(scenario())
    assert [event.token.id for event in events] == [token_id] * 3
    result = events[-1].result
    assert result is not None and [event.result for event in events[:-1]] == [None, None]
    assert (result.finish_reason, result.generated_tokens) == (FinishReason.LENGTH, 3)
    assert result.text == tokenizer.decode([token_id] * 3)
    prompt = len(request.prompt_ids)
    assert workers.steps == [
        ([Chunk(1, 0, prompt)], []),
        ([Chunk(1, prompt, 1)], []),
        ([Chunk(1, prompt + 1, 1)], []),
        ([], [1]),
    ]


@pytest.mark.parametrize("burst_wait", [True, False])
def test_an_idle_engine_lets_a_burst_arrive_before_its_first_step(tokenizer, burst_wait: bool) -> None:
    workers = FakeWorkers(tokenizer.encode(" world").ids[0], tokenizer.get_vocab_size())

    async def scenario() -> float:
        engine = _engine(tokenizer, workers, SchedulerSettings(burst_wait=burst_wait, prefix_sharing=False))
        for tokens in [1, 100] * 5:  # 4 s steps: waits of 160 ms of quiet, 1 s at most
            engine.scheduler.observe_step(tokens, 4.0 + 0.001 * tokens)
        engine.start()
        requests = []
        try:
            started = time.perf_counter()
            for n in range(5):
                request = _request(tokenizer, f"r{n}", "Hello there", max_new_tokens=2)
                requests.append(asyncio.ensure_future(_collect(engine, request)))
                await asyncio.sleep(0.01)
            await asyncio.gather(*requests)
            return workers.first_step_at - started
        finally:
            await engine.stop()

    waited = asyncio.run(scenario())
    first_step = workers.steps[0][0]
    if burst_wait:
        # arrivals 10 ms apart (a slow machine may stretch them to 150 ms) end after 40 ms; then 160 ms
        # of quiet
        assert len(first_step) == 5 and 0.04 + 0.16 <= waited < 1.0 + 0.2
    else:
        assert len(first_step) == 1 and waited < 0.01


def test_lost_workers_fail_the_requests_in_flight_and_the_engine_serves_again(tokenizer) -> None:
    workers = FakeWorkers(tokenizer.encode(" world").ids[0], tokenizer.get_vocab_size(), fail_steps=[2])
    changes: list[bool] = []

    async def on_serving_change(serving: bool) -> None:
        changes.append(serving)

    async def scenario() -> list[StreamEvent]:
        engine = _engine(tokenizer, workers, SchedulerSettings(), on_serving_change=on_serving_change)
        engine.start()
        try:
            with pytest.raises(EngineUnavailable, match="worker 1 went away"):
                await _collect(engine, _request(tokenizer, "r0", "Hello", max_new_tokens=3))
            return await _collect(engine, _request(tokenizer, "r1", "Hello", max_new_tokens=2))
        finally:
            await engine.stop()

    events = asyncio.run(scenario())
    assert events[-1].result is not None and events[-1].result.generated_tokens == 2
    assert workers.streams_reset == 1 and changes == [False, True]
    # the workers dropped every cache with their streams: r0's is never freed, r1 starts afresh
    assert workers.steps[2] == ([Chunk(2, 0, len(tokenizer.encode("Hello").ids))], [])
