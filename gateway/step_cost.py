"""What a step costs, learned from the steps served, and the two scheduling choices it drives.

A step's wall time is close to `fixed + per_token * tokens`: `fixed` is one pass over every weight (all
of a decode step on memory-bound hardware), `per_token` the compute each row adds (most of a CPU
prefill; small on a GPU until its compute saturates). The fit is a least-squares line over recent
steps, so it follows the machine it runs on and its load.

- `prompts_to_start`: starting every waiting prompt in one step makes each wait for all of their
  compute; spreading them over steps pays `fixed` again per step. The split minimising the prompts'
  summed time to first token is a small dynamic programme (batching identical jobs with a set-up
  cost, as in Coffman et al. 1990, with first-come-first-served order kept).
- `arrival_wait`: a burst's first request would otherwise start a step alone and leave the rest of
  the burst waiting a whole step; waiting a small fraction of `fixed` for arrivals to pause lets the
  burst share that step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepCost:
    fixed_s: float  # seconds of a step with no tokens: reading the weights, the wire, the gateway
    per_token_s: float  # seconds each token of the step adds


class StepCostModel:
    """Exponentially weighted least squares of step seconds against step tokens."""

    def __init__(self, *, forgetting: float = 0.99, min_steps: int = 8) -> None:
        self.forgetting = forgetting  # weight kept by older steps per new one: ~100 steps remembered
        self.min_steps = min_steps
        self.steps = 0
        self._weight = self._tokens = self._seconds = self._tokens_sq = self._cross = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0:
            return  # steps that only free caches say nothing about compute
        keep = self.forgetting
        self.steps += 1
        self._weight = keep * self._weight + 1.0
        self._tokens = keep * self._tokens + tokens
        self._seconds = keep * self._seconds + seconds
        self._tokens_sq = keep * self._tokens_sq + tokens * tokens
        self._cross = keep * self._cross + tokens * seconds

    def estimate(self) -> StepCost | None:
        """The fitted line, or None until enough steps of different sizes give a positive one."""
        if self.steps < self.min_steps:
            return None
        spread = self._weight * self._tokens_sq - self._tokens**2
        if spread <= 1e-9 * self._weight * self._tokens_sq:  # every step had the same size
            return None
        per_token = (self._weight * self._cross - self._tokens * self._seconds) / spread
        fixed = (self._seconds - per_token * self._tokens) / self._weight
        if per_token <= 0 or fixed <= 0:
            return None
        return StepCost(fixed, per_token)


def prompts_to_start(prompt_tokens: Sequence[int], running_tokens: int, cost: StepCost | None) -> int:
    """How many of the waiting prompts (token counts, in arrival order) to start in the next step.

    Minimises the summed time until each prompt's step ends, over every split of the queue into
    consecutive steps. Each step also carries `running_tokens` (the decodes and chunks already
    running) and one decode token per prompt started before it. Ties go to the larger first step.
    Without a cost estimate, everything starts now.
    """
    count = len(prompt_tokens)
    if cost is None or count <= 1:
        return count
    # best[i]: least summed wait of prompts i.. when they start at a step boundary; first[i]: its step
    best = [0.0] * (count + 1)
    first = [count] * (count + 1)
    for start in range(count - 1, -1, -1):
        tokens = running_tokens + start  # prompts started before decode in this step
        best[start] = float("inf")
        for end in range(start + 1, count + 1):
            tokens += prompt_tokens[end - 1]
            # this step delays every prompt not yet started, its own included
            total = (cost.fixed_s + cost.per_token_s * tokens) * (count - start) + best[end]
            if total <= best[start] * (1 + 1e-9):
                best[start], first[start] = total, end
    return first[0]


def arrival_wait(cost: StepCost | None) -> tuple[float, float]:
    """(quiet_s, max_s): an idle engine woken by a request starts once no other has arrived for quiet_s,
    or max_s after the first. Both are small fractions of a step (nothing before the cost is known).
    """
    if cost is None:
        return 0.0, 0.0
    return 0.04 * cost.fixed_s, 0.25 * cost.fixed_s
