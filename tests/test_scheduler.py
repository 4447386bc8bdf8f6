"""The gateway's scheduler on its own (no workers, no gRPC): what one step takes, and prefix sharing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from tokenizers import Tokenizer

from bloomduo.core import metrics
from bloomduo.gateway.config import RequestLimits, SchedulerSettings
from bloomduo.gateway.engine import Engine, StepTimings
from bloomduo.gateway.validation import validate


@pytest.fixture
def tokenizer(demo_model) -> Tokenizer:
    return Tokenizer.from_file(str(demo_model() / "tokenizer.json"))


def _with_requests(
    settings: SchedulerSettings, tokenizer: Tokenizer, prompts: list[str], check: Callable[[Engine], None]
):
    """Queue one greedy request per prompt as the servicer does (the engine loop is not running), run
    `check` on the engine, then close the requests."""

    async def scenario() -> None:
        engine = Engine(tokenizer, None, None, settings, eos_token_id=2)
        streams = [
            engine.generate(validate(f"r{n}", prompt, {"max_new_tokens": 8}, tokenizer, RequestLimits()))
            for n, prompt in enumerate(prompts)
        ]
        waiting: list[Awaitable] = [asyncio.ensure_future(anext(stream)) for stream in streams]
        await asyncio.sleep(0)  # each request is queued and waits for its first token
        try:
            check(engine)
        finally:
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            for stream in streams:
                await stream.aclose()

    asyncio.run(scenario())


def _step_done(plan) -> None:
    """What a finished step leaves: the workers hold every chunk's tokens."""
    for sequence, take in plan:
        sequence.cached += take


def test_identical_prompts_wait_one_step_then_copy_the_first(tokenizer) -> None:
    system = "You are a helpful assistant who answers in one short sentence. Question:"

    def check(engine: Engine) -> None:
        prompt_ids = engine.waiting[0].token_ids
        first = engine._schedule()
        # Copies of the first prompt (and a longer one sharing most of it) wait; the other one goes now.
        assert [s.request.request_id for s, _ in first] == ["r0", "r2"]
        assert [s.request.request_id for s in engine.waiting] == ["r1", "r3"]
        _step_done(first)

        second = {s.request.request_id: (s, take) for s, take in engine._schedule()}
        donor = first[0][0].sequence_id
        copy, take = second["r1"]
        assert (copy.cached, take) == (len(prompt_ids) - 1, 1)  # only the prompt's last token runs
        chunk, _ = copy.next_chunk(take)
        assert (chunk.prefix_sequence_id, chunk.start_position) == (donor, len(prompt_ids) - 1)
        longer, _ = second["r3"]
        assert longer.cached >= len(prompt_ids) - 1 and longer.prefix_from == donor

    _with_requests(
        SchedulerSettings(), tokenizer, [system, system, "Something else entirely", system + " why?"], check
    )


def test_without_prefix_sharing_every_prompt_runs_in_full(tokenizer) -> None:
    def check(engine: Engine) -> None:
        plan = engine._schedule()
        assert [take for _, take in plan] == [len(engine.running[0].token_ids)] * 2
        assert not engine.waiting and all(s.prefix_from == 0 for s in engine.running)

    _with_requests(
        SchedulerSettings(prefix_sharing=False), tokenizer, ["The same words", "The same words"], check
    )


def _cpu_like(engine: Engine) -> None:
    """Teach the engine a CPU's step cost: 77 ms per step plus 0.63 ms per token."""
    for tokens in [1, 32, 1, 16, 1, 32, 1, 480, 1, 1]:
        engine.step_cost.observe(tokens, 0.077 + 0.00063 * tokens)


def test_a_compute_bound_burst_starts_in_the_split_with_the_least_summed_wait(tokenizer) -> None:
    prompts = [f"Request number {n} asks about something else, at some length" for n in range(12)]

    def check(engine: Engine) -> None:
        plan = engine._schedule()  # nothing learned yet: everything starts in one step
        assert len(plan) == 12
        _step_done(plan)

    _with_requests(SchedulerSettings(prefix_sharing=False), tokenizer, prompts, check)

    def check_learned(engine: Engine) -> None:
        _cpu_like(engine)
        engine._record(StepTimings(), sequences=1, tokens=1)  # exports the fitted cost
        assert metrics.STEP_COST.labels("fixed")._value.get() == pytest.approx(0.077)
        assert metrics.STEP_COST.labels("per_token")._value.get() == pytest.approx(0.00063)
        plan = engine._schedule()
        started = [s.request.request_id for s, _ in plan]
        assert 6 <= len(started) < 12
        assert started == [f"r{n}" for n in range(len(started))]  # first come, first served
        assert [s.request.request_id for s in engine.waiting] == [f"r{n}" for n in range(len(started), 12)]
        _step_done(plan)
        for sequence, _ in plan:
            sequence.token_ids.append(5)  # each sampled its first token
        second = engine._schedule()  # the running ones decode; more of the queue starts
        assert [take for _, take in second[: len(started)]] == [1] * len(started)
        assert len(second) > len(started)

    _with_requests(SchedulerSettings(prefix_sharing=False), tokenizer, prompts, check_learned)


def test_a_prompt_sent_back_to_the_queue_forgets_its_shared_prefix(tokenizer) -> None:
    system = "You are a helpful assistant who answers in one short sentence. Question:"
    prompts = [system] + [f"{system} item {n}" for n in range(10)]

    def check(engine: Engine) -> None:
        _step_done(engine._schedule())  # the first one starts alone; the rest copy it next step
        _cpu_like(engine)
        for sequence in engine.waiting:
            sequence.token_ids += list(range(100, 160))  # long tails, so not all start at once
        plan = engine._schedule()
        assert 1 < len(plan) < len(prompts)
        assert all(s.prefix_from == engine.running[0].sequence_id for s, _ in plan[1:])
        assert engine.waiting and all(s.cached == 0 and s.prefix_from == 0 for s in engine.waiting)

    _with_requests(SchedulerSettings(), tokenizer, prompts, check)


def test_an_idle_engine_lets_a_burst_arrive_before_its_first_step(tokenizer) -> None:
    async def scenario(burst_wait: bool) -> tuple[int, float]:
        settings = SchedulerSettings(burst_wait=burst_wait)
        engine = Engine(tokenizer, None, None, settings, eos_token_id=2)
        for tokens in [1, 100] * 5:  # 4 s steps: waits of 160 ms of quiet, 1 s at most
            engine.step_cost.observe(tokens, 4.0 + 0.001 * tokens)
        streams = []

        async def arrive() -> None:
            for n in range(5):
                request = validate(f"r{n}", "Hello there", {"max_new_tokens": 2}, tokenizer, RequestLimits())
                streams.append(engine.generate(request))
                waiting.append(asyncio.ensure_future(anext(streams[-1])))
                await asyncio.sleep(0.01)

        waiting: list[asyncio.Future] = []
        arrivals = asyncio.ensure_future(arrive())
        while not engine.waiting:  # the first request wakes the idle engine
            await asyncio.sleep(0)
        started = time.perf_counter()
        await engine._await_burst()
        waited = time.perf_counter() - started
        queued = len(engine.waiting)
        await arrivals
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        return queued, waited

    queued, waited = asyncio.run(scenario(burst_wait=True))
    # arrivals 10 ms apart (a slow machine may stretch them to 150 ms) end after 40 ms; then 160 ms of quiet
    assert queued == 5 and 0.04 + 0.16 <= waited < 1.0 + 0.2
    queued, waited = asyncio.run(scenario(burst_wait=False))
    assert queued == 1 and waited < 0.01


def test_no_prompt_is_held_back_more_than_max_waiting_steps(tokenizer) -> None:
    prompts = [f"Request number {n} asks about something else, at some length" for n in range(12)]

    def two_steps(engine: Engine) -> tuple[int, int]:
        """Prompts started in the first and the second step, for prompts long enough to be split."""
        _cpu_like(engine)
        for sequence in engine.waiting:
            sequence.token_ids += list(range(100, 150))
        first = engine._schedule()
        assert all(s.waited_steps == 1 for s in engine.waiting)
        _step_done(first)
        for sequence, _ in first:
            sequence.token_ids.append(5)
        return len(first), len(engine._schedule()) - len(first)

    def check(engine: Engine) -> None:
        started, then = two_steps(engine)
        assert started + then < 12  # the split holds some back twice ...

    _with_requests(SchedulerSettings(prefix_sharing=False), tokenizer, prompts, check)

    def check_bounded(engine: Engine) -> None:
        started, then = two_steps(engine)
        assert started + then == 12 and not engine.waiting  # ... unless they already waited a step

    _with_requests(
        SchedulerSettings(prefix_sharing=False, max_waiting_steps=1), tokenizer, prompts, check_bounded
    )
