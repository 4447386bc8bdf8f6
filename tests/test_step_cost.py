"""The learned step cost and the two choices it drives: how many waiting prompts start in a step, and
how long an idle gateway lets a burst arrive."""

from __future__ import annotations

import itertools

import pytest

from bloomduo.gateway.step_cost import StepCost, StepCostModel, arrival_wait, prompts_to_start


def test_the_fit_recovers_a_linear_step_cost_and_follows_changes() -> None:
    model = StepCostModel(min_steps=4)
    assert model.estimate() is None
    for tokens in [1, 32, 1, 1, 480, 16, 16, 1]:
        model.observe(tokens, 0.075 + 0.0006 * tokens)
    cost = model.estimate()
    assert cost is not None
    assert cost.fixed_s == pytest.approx(0.075) and cost.per_token_s == pytest.approx(0.0006)
    model.observe(0, 5.0)  # a step that only frees caches computes nothing: ignored
    assert model.estimate() == cost
    for tokens in itertools.islice(itertools.cycle([1, 64, 8]), 600):  # the machine got twice as slow
        model.observe(tokens, 2 * (0.075 + 0.0006 * tokens))
    assert model.estimate().fixed_s == pytest.approx(0.150, rel=0.01)


def test_no_estimate_from_too_few_steps_one_size_or_a_falling_line() -> None:
    few = StepCostModel(min_steps=8)
    for tokens in range(1, 8):
        few.observe(tokens, 0.1 + 0.001 * tokens)
    assert few.estimate() is None
    same_size = StepCostModel(min_steps=2)
    for _ in range(10):
        same_size.observe(16, 0.1)
    assert same_size.estimate() is None
    falling = StepCostModel(min_steps=2)
    for tokens in range(1, 10):
        falling.observe(tokens, 1.0 - 0.01 * tokens)
    assert falling.estimate() is None


def _summed_wait(sizes: list[int], prompt_tokens: list[int], running: int, cost: StepCost) -> float:
    """Summed time to the end of each prompt's step when the queue starts in steps of `sizes`."""
    total = clock = 0.0
    started = 0
    for size in sizes:
        tokens = running + started + sum(prompt_tokens[started : started + size])
        clock += cost.fixed_s + cost.per_token_s * tokens
        total += clock * size
        started += size
    return total


def _compositions(count: int):
    for cuts in itertools.product([False, True], repeat=count - 1):
        sizes, size = [], 1
        for cut in cuts:
            if cut:
                sizes.append(size)
                size = 1
            else:
                size += 1
        yield [*sizes, size]


@pytest.mark.parametrize(
    ("prompt_tokens", "running", "cost"),
    [
        ([32] * 10, 0, StepCost(0.077, 0.00063)),  # CPU: prefill compute dominates
        ([32] * 10, 6, StepCost(0.077, 0.00063)),
        ([5, 200, 17, 64, 3, 90, 40, 8, 1, 300], 3, StepCost(0.05, 0.001)),
        ([32] * 10, 0, StepCost(0.015, 0.00002)),  # GPU-like: one step for all
    ],
)
def test_the_first_step_is_that_of_the_best_split(prompt_tokens, running, cost) -> None:
    best = min(_compositions(len(prompt_tokens)), key=lambda s: _summed_wait(s, prompt_tokens, running, cost))
    start = prompts_to_start(prompt_tokens, running, cost)
    # the planner's first step begins a split as good as the exhaustive optimum
    rest = prompt_tokens[start:]
    tail = min(
        _compositions(len(rest)) if rest else [[]],
        key=lambda s: _summed_wait(s, rest, running + start, cost),
    )
    planned = _summed_wait([start, *tail], prompt_tokens, running, cost)
    assert planned == pytest.approx(_summed_wait(best, prompt_tokens, running, cost), rel=1e-9)


def test_compute_bound_bursts_are_split_and_memory_bound_ones_are_not() -> None:
    cpu, gpu = StepCost(0.077, 0.00063), StepCost(0.015, 0.00002)
    burst = [32] * 16
    assert 8 <= prompts_to_start(burst, 0, cpu) < 16
    assert prompts_to_start(burst, 0, gpu) == 16
    assert prompts_to_start(burst, 0, None) == 16  # nothing learned yet: today's one step
    assert prompts_to_start([1000] * 4, 0, cpu) == 1  # long prompts go one by one
    assert prompts_to_start([], 5, cpu) == 0


def test_arrival_wait_is_a_small_fraction_of_a_step() -> None:
    assert arrival_wait(None) == (0.0, 0.0)
    quiet, longest = arrival_wait(StepCost(0.08, 0.0006))
    assert 0 < quiet < longest <= 0.25 * 0.08
