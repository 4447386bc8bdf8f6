"""The gateway's scheduler on its own (token ids only: no model, no workers, no event loop): what each
step carries, the time-to-first-token split, prefix sharing and cancellation."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest

from bloomduo.core import metrics
from bloomduo.gateway.config import SchedulerSettings
from bloomduo.gateway.scheduler import Scheduler
from bloomduo.gateway.sequence import Chunk, SequenceState

SYSTEM = list(range(100, 130))  # a system prompt many requests start with


def _queue(settings: SchedulerSettings, prompts: list[list[int]]) -> Scheduler[SequenceState]:
    scheduler: Scheduler[SequenceState] = Scheduler(settings)
    for n, prompt in enumerate(prompts):
        scheduler.add(SequenceState(sequence_id=n + 1, request_id=f"r{n}", token_ids=list(prompt)))
    return scheduler


def _run_step(scheduler: Scheduler[SequenceState]) -> list[tuple[SequenceState, Chunk]]:
    """Schedule a step and let it run: the workers cache every chunk, and each sequence whose chunk
    reached its last token samples one (id 7)."""
    plan = scheduler.schedule()
    finishing = [sequence for sequence, chunk in plan if sequence.pending == chunk.num_tokens]
    scheduler.computed(plan)
    for sequence in finishing:
        sequence.token_ids.append(7)
    return plan


def _ids(sequences: Iterable[SequenceState]) -> list[str]:
    return [sequence.request_id for sequence in sequences]


def _plan_ids(plan: list[tuple[SequenceState, Chunk]]) -> list[str]:
    return _ids(sequence for sequence, _ in plan)


def _chunks(plan: list[tuple[SequenceState, Chunk]]) -> dict[str, Chunk]:
    return {sequence.request_id: chunk for sequence, chunk in plan}


def _distinct(count: int, length: int) -> list[list[int]]:
    return [[1000 * (n + 1) + k for k in range(length)] for n in range(count)]


def _cpu_like(scheduler: Scheduler) -> None:
    """Teach the scheduler a CPU's step cost: 77 ms per step plus 0.63 ms per token."""
    for tokens in [1, 32, 1, 16, 1, 32, 1, 480, 1, 1]:
        scheduler.observe_step(tokens, 0.077 + 0.00063 * tokens)


def test_identical_prompts_wait_one_step_then_copy_the_first() -> None:
    prompts = [SYSTEM, SYSTEM, _distinct(1, 12)[0], [*SYSTEM, 5, 6, 7]]
    scheduler = _queue(SchedulerSettings(), prompts)
    first = _run_step(scheduler)
    # Copies of the first prompt (and a longer one sharing most of it) wait; the other one goes now.
    assert _plan_ids(first) == ["r0", "r2"]
    assert [chunk.num_tokens for _, chunk in first] == [len(SYSTEM), 12]
    assert _ids(scheduler.waiting) == ["r1", "r3"]

    second = _chunks(scheduler.schedule())
    donor = first[0][0].sequence_id
    # only the prompt's last token runs; the rest is copied from the donor's cache
    assert second["r1"] == Chunk(2, len(SYSTEM) - 1, 1, prefix_sequence_id=donor)
    assert second["r3"] == Chunk(4, len(SYSTEM), 3, prefix_sequence_id=donor)
    assert (second["r0"].num_tokens, second["r2"].num_tokens) == (1, 1)  # the first two decode


def test_a_prefix_is_copied_from_the_running_sequence_sharing_most_of_it() -> None:
    scheduler = _queue(SchedulerSettings(), [SYSTEM])
    _run_step(scheduler)
    _run_step(scheduler)
    scheduler.add(SequenceState(sequence_id=2, request_id="r1", token_ids=[*SYSTEM[:20], 1, 2, 3]))
    scheduler.add(SequenceState(sequence_id=3, request_id="r2", token_ids=[*SYSTEM[:20], 1, 2, 4]))
    plan = _chunks(_run_step(scheduler))
    assert plan["r1"] == Chunk(2, 20, 3, prefix_sequence_id=1)
    # r1 shares more with r2 but the workers cache it only after this step: r2 copies from r0 too
    assert plan["r2"] == Chunk(3, 20, 3, prefix_sequence_id=1)
    scheduler.add(SequenceState(sequence_id=4, request_id="r3", token_ids=[*SYSTEM[:20], 1, 2, 3, 9]))
    plan = _chunks(scheduler.schedule())
    assert plan["r3"] == Chunk(4, 23, 1, prefix_sequence_id=2)  # r1's cache now holds the longest prefix
    assert [chunk.prefix_sequence_id for name, chunk in plan.items() if name != "r3"] == [0, 0, 0]


def test_without_prefix_sharing_every_prompt_runs_in_full() -> None:
    scheduler = _queue(SchedulerSettings(prefix_sharing=False), [SYSTEM, SYSTEM])
    plan = scheduler.schedule()
    assert [chunk for _, chunk in plan] == [Chunk(1, 0, len(SYSTEM)), Chunk(2, 0, len(SYSTEM))]
    assert not scheduler.waiting


def _finish(scheduler: Scheduler[SequenceState], request_id: str) -> SequenceState:
    sequence = next(s for s in scheduler.running if s.request_id == request_id)
    scheduler.finish(sequence)
    return sequence


def test_a_finished_sequence_is_kept_while_idle_and_a_next_turn_copies_it() -> None:
    scheduler = _queue(SchedulerSettings(), [SYSTEM])
    _run_step(scheduler)
    _run_step(scheduler)  # the prompt, then one decode: 31 tokens cached, the 32nd sampled
    first = _finish(scheduler, "r0")
    assert scheduler.take_freed() == [] and not scheduler.has_work  # kept, nothing to step
    turn = [*first.token_ids, 40, 41]
    scheduler.add(SequenceState(sequence_id=2, request_id="r1", token_ids=turn))
    plan = _chunks(_run_step(scheduler))
    assert plan["r1"] == Chunk(2, len(SYSTEM) + 1, 3, prefix_sequence_id=1)  # the reply's last token runs
    assert scheduler.take_freed() == []  # the donor stays for the step that copies it ...
    scheduler.schedule()
    assert scheduler.take_freed() == [1]  # ... and goes with the next, as r1 runs


def test_a_sequence_finishing_beside_running_ones_is_freed_at_once() -> None:
    scheduler = _queue(SchedulerSettings(), _distinct(2, 8))
    _run_step(scheduler)
    _finish(scheduler, "r0")
    assert scheduler.take_freed() == [1] and not scheduler.kept
    _finish(scheduler, "r1")  # the last one: kept
    assert scheduler.take_freed() == [] and list(scheduler.kept) == [2]


def test_kept_caches_beyond_prefix_cache_tokens_go_oldest_first() -> None:
    scheduler = _queue(SchedulerSettings(prefix_cache_tokens=20), _distinct(1, 12))
    _run_step(scheduler)
    first = _finish(scheduler, "r0")
    scheduler.add(SequenceState(sequence_id=2, request_id="r1", token_ids=[*first.token_ids[:12], 5]))
    assert _chunks(_run_step(scheduler))["r1"] == Chunk(2, 12, 1, prefix_sequence_id=1)
    _finish(scheduler, "r1")  # done with its first token: both are kept, 12 + 13 tokens, over 20
    assert list(scheduler.kept) == [2] and scheduler.has_work  # a step with nothing but the freeing
    assert scheduler.take_freed() == [1]
    too_long = SequenceState(sequence_id=9, request_id="r9", token_ids=_distinct(2, 30)[1])
    scheduler.add(too_long)
    _run_step(scheduler)
    scheduler.finish(too_long)
    assert scheduler.take_freed() == [2, 9] and not scheduler.kept


@pytest.mark.parametrize(
    "settings", [SchedulerSettings(prefix_cache_tokens=0), SchedulerSettings(prefix_sharing=False)]
)
def test_without_a_prefix_cache_a_finished_sequence_is_freed_at_once(settings: SchedulerSettings) -> None:
    scheduler = _queue(settings, [SYSTEM])
    _run_step(scheduler)
    _finish(scheduler, "r0")
    assert scheduler.take_freed() == [1] and not scheduler.kept


def test_a_kept_donor_takes_a_slot_of_the_batch() -> None:
    scheduler = _queue(SchedulerSettings(max_batch_size=2), [SYSTEM])
    _run_step(scheduler)
    first = _finish(scheduler, "r0")
    for n in (1, 2):
        scheduler.add(SequenceState(sequence_id=n + 1, request_id=f"r{n}", token_ids=[*first.token_ids, n]))
    # the workers hold the donor and r1 this step: r2 waits, and copies from r1's running cache next
    assert _plan_ids(_run_step(scheduler)) == ["r1"]
    plan = _chunks(scheduler.schedule())
    assert plan["r2"].prefix_sequence_id == 2 and scheduler.take_freed() == [1]


def test_a_batch_of_one_computes_a_next_turn_in_full() -> None:
    scheduler = _queue(SchedulerSettings(max_batch_size=1), [SYSTEM])
    _run_step(scheduler)
    first = _finish(scheduler, "r0")
    scheduler.add(SequenceState(sequence_id=2, request_id="r1", token_ids=[*first.token_ids, 5]))
    # the workers would hold two sequences to copy it, over the slots they were made for
    assert _chunks(scheduler.schedule())["r1"] == Chunk(2, 0, len(SYSTEM) + 2)
    assert scheduler.take_freed() == [1]


def test_a_lost_group_forgets_the_kept_caches() -> None:
    scheduler = _queue(SchedulerSettings(), [SYSTEM])
    _run_step(scheduler)
    _finish(scheduler, "r0")
    scheduler.add(SequenceState(sequence_id=2, request_id="r1", token_ids=[*SYSTEM, 5]))
    assert _ids(scheduler.drop_all()) == ["r1"]
    assert not scheduler.kept and scheduler.take_freed() == []
    scheduler.add(SequenceState(sequence_id=3, request_id="r2", token_ids=[*SYSTEM, 5]))
    assert _chunks(scheduler.schedule())["r2"] == Chunk(3, 0, len(SYSTEM) + 1)  # computed in full


# Prompts may wait for a later step of their own: the split with the least summed time to first token.
SPLIT = SchedulerSettings(prefix_sharing=False, max_waiting_steps=4)


def test_by_default_a_compute_bound_burst_starts_at_once() -> None:
    scheduler = _queue(SchedulerSettings(prefix_sharing=False), _distinct(12, 70))
    _cpu_like(scheduler)  # a split would start fewer than all of them (the tests below)
    first = _run_step(scheduler)
    assert _plan_ids(first) == [f"r{n}" for n in range(12)] and not scheduler.waiting
    assert [chunk.num_tokens for _, chunk in scheduler.schedule()] == [1] * 12  # then all decode together


def test_a_compute_bound_burst_starts_in_the_split_with_the_least_summed_wait() -> None:
    prompts = _distinct(12, 20)
    untaught = _queue(SPLIT, prompts)
    assert len(untaught.schedule()) == 12  # nothing learned yet: everything starts in one step

    scheduler = _queue(SPLIT, prompts)
    _cpu_like(scheduler)
    assert metrics.STEP_COST.labels("fixed")._value.get() == pytest.approx(0.077)
    assert metrics.STEP_COST.labels("per_token")._value.get() == pytest.approx(0.00063)
    first = _run_step(scheduler)
    started = len(first)
    assert 6 <= started < 12
    assert _plan_ids(first) == [f"r{n}" for n in range(started)]  # first come, first served
    assert _ids(scheduler.waiting) == [f"r{n}" for n in range(started, 12)]
    second = scheduler.schedule()  # the running ones decode; more of the queue starts
    assert [chunk.num_tokens for _, chunk in second[:started]] == [1] * started
    assert len(second) > started


def test_no_prompt_is_held_back_more_than_max_waiting_steps() -> None:
    prompts = _distinct(12, 70)  # long enough for the learned cost to split them

    def two_steps(settings: SchedulerSettings) -> tuple[int, int, Scheduler]:
        """Prompts started in the first and the second step."""
        scheduler = _queue(settings, prompts)
        _cpu_like(scheduler)
        first = _run_step(scheduler)
        assert scheduler.waiting and all(s.waited_steps == 1 for s in scheduler.waiting)
        return len(first), len(scheduler.schedule()) - len(first), scheduler

    started, then, scheduler = two_steps(SPLIT)
    assert started + then < 12  # the split holds some back twice ...
    assert all(s.waited_steps == 2 for s in scheduler.waiting)
    started, then, scheduler = two_steps(SchedulerSettings(prefix_sharing=False, max_waiting_steps=1))
    assert started + then == 12 and not scheduler.waiting  # ... unless they already waited a step


def test_a_prompt_sent_back_to_the_queue_forgets_its_shared_prefix() -> None:
    # tails long enough for the learned cost to split them, short enough to wait for the system prompt
    prompts = [SYSTEM] + [[*SYSTEM, *range(200 + n, 228 + n)] for n in range(10)]
    scheduler = _queue(SchedulerSettings(max_waiting_steps=4), prompts)
    assert _plan_ids(_run_step(scheduler)) == ["r0"]  # the first one starts alone; the rest copy it later
    _cpu_like(scheduler)
    plan = scheduler.schedule()
    assert 1 < len(plan) < len(prompts)  # the split starts some now, not all
    assert all(chunk.prefix_sequence_id == 1 for _, chunk in plan[1:])
    assert scheduler.waiting and all(s.cached == 0 and s.prefix_from == 0 for s in scheduler.waiting)


def test_long_prompts_are_chunked_within_the_prefill_budget_and_decodes_always_run() -> None:
    settings = SchedulerSettings(max_batch_prefill_tokens=16, prefix_sharing=False)
    scheduler = _queue(settings, _distinct(2, 4))
    _run_step(scheduler)  # two short prompts start and decode from now on
    long_prompt, late = _distinct(4, 40)[2:]
    scheduler.add(SequenceState(sequence_id=3, request_id="long", token_ids=long_prompt))
    scheduler.add(SequenceState(sequence_id=4, request_id="late", token_ids=late))
    steps = [
        [(s.request_id, c.start_position, c.num_tokens) for s, c in _run_step(scheduler)] for _ in range(4)
    ]
    assert steps == [
        [("r0", 4, 1), ("r1", 4, 1), ("long", 0, 16)],  # the budget is spent: "late" waits
        [("r0", 5, 1), ("r1", 5, 1), ("long", 16, 16)],
        [("r0", 6, 1), ("r1", 6, 1), ("long", 32, 8), ("late", 0, 8)],
        [("r0", 7, 1), ("r1", 7, 1), ("long", 40, 1), ("late", 8, 16)],
    ]


def test_the_batch_never_grows_past_max_batch_size() -> None:
    scheduler = _queue(SchedulerSettings(max_batch_size=3, prefix_sharing=False), _distinct(5, 4))
    assert _plan_ids(_run_step(scheduler)) == ["r0", "r1", "r2"]
    scheduler.finish(scheduler.running[1])
    assert scheduler.take_freed() == [2] and scheduler.take_freed() == []
    assert _plan_ids(scheduler.schedule()) == ["r0", "r2", "r3"]
    assert _ids(scheduler.waiting) == ["r4"]


def test_cancelled_sequences_leave_at_the_next_step_and_running_ones_free_their_cache() -> None:
    scheduler = _queue(SchedulerSettings(max_batch_size=2, prefix_sharing=False), _distinct(4, 4))
    _run_step(scheduler)
    cancelled = metrics.REQUESTS.labels(metrics.Outcome.CANCELLED, "")
    before = cancelled._value.get()
    scheduler.running[0].cancelled = True
    scheduler.waiting[1].cancelled = True
    assert _plan_ids(scheduler.schedule()) == ["r1", "r2"]
    assert scheduler.take_freed() == [1]
    assert not scheduler.waiting and scheduler.in_flight == 2
    assert cancelled._value.get() == before + 2


def test_lost_workers_drop_every_sequence_and_a_failed_step_drops_the_running_ones() -> None:
    scheduler = _queue(SchedulerSettings(max_batch_size=2, prefix_sharing=False), _distinct(5, 4))
    _run_step(scheduler)
    assert _ids(scheduler.drop_running()) == ["r0", "r1"]
    assert scheduler.take_freed() == [1, 2] and scheduler.has_work  # the others still wait
    _run_step(scheduler)
    scheduler.finish(scheduler.running[0])
    assert _ids(scheduler.drop_all()) == ["r3", "r4"]
    assert scheduler.take_freed() == [] and not scheduler.has_work  # the workers dropped their caches


@pytest.mark.parametrize("burst_wait", [True, False])
def test_an_idle_engine_waits_a_small_fraction_of_a_step_for_a_burst(burst_wait: bool) -> None:
    scheduler = _queue(SchedulerSettings(burst_wait=burst_wait), [])
    assert scheduler.arrival_wait() == (0.0, 0.0)  # nothing learned yet
    for tokens in itertools.islice(itertools.cycle([1, 100]), 10):
        scheduler.observe_step(tokens, 4.0 + 0.001 * tokens)
    quiet_s, max_s = scheduler.arrival_wait()
    if burst_wait:
        assert 0 < quiet_s < max_s < 0.3 * 4.0
    else:
        assert (quiet_s, max_s) == (0.0, 0.0)
