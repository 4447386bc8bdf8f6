"""The queue and what each step carries: plain bookkeeping over token counts (no model, no asyncio).

Every step carries one decode token for each running sequence plus the prompts of newly admitted
requests (within the batch-size and prefill-token budgets), so no request waits for another to finish.
How many new prompts start per step, and how long an idle engine lets a burst arrive, follow from what
a step costs on this machine (step_cost.py), which the scheduler learns from the steps it is told of.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from bloomduo.core import metrics
from bloomduo.core.logs import get_logger
from bloomduo.gateway.config import SchedulerSettings
from bloomduo.gateway.sequence import Chunk, SequenceState
from bloomduo.gateway.step_cost import StepCostModel, arrival_wait, prompts_to_start

log = get_logger(__name__)

S = TypeVar("S", bound=SequenceState)


class _Tokens(Protocol):
    @property
    def token_ids(self) -> list[int]: ...


T = TypeVar("T", bound=_Tokens)


@dataclass(frozen=True)
class KeptCache:
    """A finished sequence whose keys and values the workers keep, for a later prompt that starts alike."""

    sequence_id: int
    token_ids: list[int]  # the tokens its cache holds: the prompt and every generated token fed back

    @property
    def cached(self) -> int:
        return len(self.token_ids)


class Scheduler(Generic[S]):
    """Sequences waiting and running, the caches to free, and the plan of each step.

    A step's life: `schedule()` picks its chunks, `take_freed()` the caches to drop before it; once the
    workers ran it, `computed(plan)` and `observe_step(...)`; a sequence that is done goes by `finish`.
    """

    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.step_cost = StepCostModel()
        self.waiting: deque[S] = deque()
        self.running: list[S] = []
        self._to_free: list[int] = []
        self.kept: OrderedDict[int, KeptCache] = OrderedDict()  # least recently used first

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def has_work(self) -> bool:
        """Something to step: a sequence, or only caches to free."""
        return bool(self.waiting or self.running or self._to_free)

    def add(self, sequence: S) -> None:
        self.waiting.append(sequence)

    def finish(self, sequence: S) -> None:
        """A running sequence is done. Its cache is freed with the next step, or kept for a later prompt
        that starts the same way while nothing runs (see _keep_caches)."""
        self.running.remove(sequence)
        kept = KeptCache(sequence.sequence_id, sequence.token_ids[: sequence.cached])
        if self.settings.prefix_sharing and 0 < kept.cached <= self.settings.prefix_cache_tokens:
            self.kept[kept.sequence_id] = kept
            self._keep_caches()
        else:
            self._to_free.append(sequence.sequence_id)

    def take_freed(self) -> list[int]:
        """The sequence ids whose caches the next step drops (each handed out once)."""
        free_ids, self._to_free = self._to_free, []
        return free_ids

    def drop_running(self) -> list[S]:
        """Forget every running sequence (their caches are freed next step) and return them."""
        dropped, self.running = self.running, []
        self._to_free.extend(sequence.sequence_id for sequence in dropped)
        return dropped

    def drop_all(self) -> list[S]:
        """Forget every sequence, running and waiting, and return them: the workers lost their caches
        (broken streams make every worker drop them), so nothing is left to free."""
        dropped = [*self.running, *self.waiting]
        self.running, self.waiting = [], deque()
        self._to_free.clear()
        self.kept.clear()
        return dropped

    def observe_step(self, tokens: int, seconds: float) -> None:
        """A step of `tokens` rows took `seconds`, from embedding to sampled tokens."""
        self.step_cost.observe(tokens, seconds)
        cost = self.step_cost.estimate()
        if cost is not None:
            metrics.STEP_COST.labels("fixed").set(cost.fixed_s)
            metrics.STEP_COST.labels("per_token").set(cost.per_token_s)

    def arrival_wait(self) -> tuple[float, float]:
        """(quiet_s, max_s) an idle engine woken by a request waits for the rest of a burst, so it shares
        the first step instead of waiting a whole step behind its first request (step_cost.arrival_wait).
        """
        return arrival_wait(self.step_cost.estimate()) if self.settings.burst_wait else (0.0, 0.0)

    def computed(self, plan: list[tuple[S, Chunk]]) -> None:
        """The workers ran this plan: each sequence's cache holds its chunk."""
        for sequence, chunk in plan:
            sequence.cached += chunk.num_tokens

    def schedule(self) -> list[tuple[S, Chunk]]:
        """Drop cancelled sequences, then pick this step's sequences and the chunk each sends.

        Running decodes always go (arrivals never starve them); prompts share a token budget
        (max_batch_prefill_tokens), longer ones are cut into chunks across steps so a long prompt
        delays the running decodes by one bounded chunk at a time; new requests join first come
        first served while the batch has room, as many at once as minimises their summed time to
        first token under the step cost learned so far (step_cost.py), and at least every one that
        has waited max_waiting_steps steps (0, the default: every one); the rest start next step.
        With prefix sharing, a prompt that mostly repeats one starting in this very step waits one
        step and then copies it (see _share_prefix).
        """
        self._drop_cancelled()
        budget = self.settings.max_batch_prefill_tokens
        plan = [(sequence, sequence.next_chunk(1)) for sequence in self.running if sequence.pending == 1]
        for sequence in self.running:
            if sequence.pending > 1 and budget > 0:
                chunk = sequence.next_chunk(budget)
                plan.append((sequence, chunk))
                budget -= chunk.num_tokens
        taken: list[S] = []  # off the queue, in its order
        starting: list[S] = []  # admitted now, computing their prompts from the first token
        admitted: list[tuple[S, int]] = []
        while self.waiting and budget > 0 and (held := self._held(admitted)) < self.settings.max_batch_size:
            sequence = self.waiting.popleft()
            taken.append(sequence)
            room_for_kept = held + 2 <= self.settings.max_batch_size  # it and its donor
            if self.settings.prefix_sharing and not self._share_prefix(sequence, starting, room_for_kept):
                continue
            if sequence.cached == 0:
                starting.append(sequence)
            take = min(sequence.pending, budget)
            admitted.append((sequence, take))
            budget -= take
        start = self._prompts_starting_now(admitted, running_tokens=sum(c.num_tokens for _, c in plan))
        for sequence, _ in admitted[start:]:
            sequence.cached = sequence.prefix_from = 0  # looks for a prefix again when it starts
        started = [sequence for sequence, _ in admitted[:start]]
        self.waiting.extendleft(reversed([sequence for sequence in taken if sequence not in started]))
        for sequence in self.waiting:
            sequence.waited_steps += 1
        for sequence, take in admitted[:start]:
            self.running.append(sequence)
            metrics.QUEUE_TIME.observe(time.perf_counter() - sequence.queued_at)
            if sequence.prefix_from:
                metrics.PREFIX_TOKENS_SHARED.inc(sequence.cached)
                log.debug(
                    "prefix_shared",
                    request_id=sequence.request_id,
                    tokens=sequence.cached,
                    from_sequence_id=sequence.prefix_from,
                )
            plan.append((sequence, sequence.next_chunk(take)))
        self._keep_caches(donors=[chunk.prefix_sequence_id for _, chunk in plan])
        return plan

    def _held(self, admitted: Sequence[tuple[S, int]]) -> int:
        """Sequences the workers would hold after this step: the running, the admitted, and the kept caches
        those copy from (the others are freed before the step)."""
        donors = {sequence.prefix_from for sequence, _ in admitted} & self.kept.keys()
        return len(self.running) + len(admitted) + len(donors)

    def _keep_caches(self, donors: Sequence[int] = ()) -> None:
        """Free the kept caches that must go, least recently used first: every one once a sequence runs (but
        a `donors` one, which this step copies from and which goes with the next), and past
        prefix_cache_tokens the oldest.

        Kept only while nothing runs, they take no memory the batch they ran in did not (the workers' caches
        may stay at its size until the next request): the workers lay every slot out at the longest
        sequence's capacity (kv_cache.py), so one long kept sequence beside a running batch could multiply
        the cache (a paged cache would not).
        """
        tokens = sum(kept.cached for kept in self.kept.values())
        for sequence_id, kept in list(self.kept.items()):
            if sequence_id in donors:
                continue
            if self.running or tokens > self.settings.prefix_cache_tokens:
                del self.kept[sequence_id]
                self._to_free.append(sequence_id)
                tokens -= kept.cached

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self.running if s.cancelled]:
            self.running.remove(sequence)
            self._to_free.append(sequence.sequence_id)
            log.info("request_cancelled", request_id=sequence.request_id)
            metrics.REQUESTS.labels(metrics.Outcome.CANCELLED, "").inc()
        cancelled_waiting = sum(s.cancelled for s in self.waiting)
        if cancelled_waiting:
            metrics.REQUESTS.labels(metrics.Outcome.CANCELLED, "").inc(cancelled_waiting)
            self.waiting = deque(s for s in self.waiting if not s.cancelled)

    def _prompts_starting_now(self, admitted: list[tuple[S, int]], running_tokens: int) -> int:
        """How many of the admitted prompts start in this step: the split with the least summed time to
        first token, stretched to include every prompt that has waited max_waiting_steps already."""
        overdue = [
            index
            for index, (sequence, _) in enumerate(admitted)
            if sequence.waited_steps >= self.settings.max_waiting_steps
        ]
        must_start = overdue[-1] + 1 if overdue else 0
        if must_start == len(admitted):  # every one starts (max_waiting_steps 0): no split to weigh
            return must_start
        start = prompts_to_start([take for _, take in admitted], running_tokens, self.step_cost.estimate())
        return max(start, must_start)

    def _share_prefix(self, sequence: S, starting: list[S], room_for_kept: bool) -> bool:
        """Start a new sequence after the longest prefix of its prompt that a running one has cached (or a
        kept one, where the batch has room for both); False (admit it next step) when a sequence `starting`
        in this step computes most of its prompt.

        The first chunk then tells the workers to copy those keys and values. Donors are sequences
        whose cache the workers hold before this step. The prompt's last token always runs: its logits
        give the first new token. Waiting one step for a prompt being computed right now costs about
        what computing it again in this step would, and spares the step that work. A sequence that
        scores its prompt shares nothing: a copied prefix's rows are never computed, so never scored.
        """
        if sequence.scores_prompt:
            return True
        prompt = sequence.token_ids
        cached = [s for s in self.running if s.cached and not s.prefix_from]
        kept = list(self.kept.values()) if room_for_kept else []  # the batch holds it only with its donor
        donor, length = _longest_shared_prefix(prompt, [*cached, *kept], lambda s: s.cached)
        pending, pending_length = _longest_shared_prefix(prompt, starting, lambda s: len(s.token_ids))
        if pending is not None and pending_length > length and 2 * pending_length >= len(prompt):
            return False
        if donor is not None:
            sequence.cached, sequence.prefix_from = length, donor.sequence_id
            if donor.sequence_id in self.kept:
                self.kept.move_to_end(donor.sequence_id)
        return True


def _longest_shared_prefix(
    prompt: list[int], candidates: Sequence[T], known: Callable[[T], int]
) -> tuple[T | None, int]:
    """The candidate sharing the longest prefix with `prompt` among its first known(candidate) tokens
    (never the prompt's last token), and that length; (None, 0) when none shares any."""
    best, best_length = None, 0
    for candidate in candidates:
        limit = min(len(prompt) - 1, known(candidate))
        length = _shared_length(prompt[:limit], candidate.token_ids[:limit])
        if length > best_length:
            best, best_length = candidate, length
    return best, best_length


def _shared_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two id lists of the same length have in common."""
    if a == b:  # the usual case worth sharing (one system prompt, one benchmark prompt), compared in C
        return len(a)
    return next(index for index, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
