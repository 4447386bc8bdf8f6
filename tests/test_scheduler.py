"""The gateway's scheduler on its own (no workers, no gRPC): what one step takes, and prefix sharing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from tokenizers import Tokenizer

from gateway.engine import Engine
from gateway.validation import Limits, validate


@pytest.fixture
def tokenizer(demo_model) -> Tokenizer:
    return Tokenizer.from_file(str(demo_model() / "tokenizer.json"))


def _with_requests(limits: Limits, tokenizer: Tokenizer, prompts: list[str], check: Callable[[Engine], None]):
    """Queue one greedy request per prompt as the servicer does (the engine loop is not running), run
    `check` on the engine, then close the requests."""

    async def scenario() -> None:
        engine = Engine(tokenizer, None, None, limits, eos_token_id=2)
        streams = [
            engine.generate(validate(f"r{n}", prompt, {"max_new_tokens": 8}, tokenizer, limits))
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

    _with_requests(Limits(), tokenizer, [system, system, "Something else entirely", system + " why?"], check)


def test_without_prefix_sharing_every_prompt_runs_in_full(tokenizer) -> None:
    def check(engine: Engine) -> None:
        plan = engine._schedule()
        assert [take for _, take in plan] == [len(engine.running[0].token_ids)] * 2
        assert not engine.waiting and all(s.prefix_from == 0 for s in engine.running)

    _with_requests(Limits(prefix_sharing=False), tokenizer, ["The same words", "The same words"], check)
