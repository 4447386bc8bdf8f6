"""Continuous batching: requests join and leave a running batch between model steps.

Every step carries one decode token for each running sequence plus the prompts of newly admitted
requests (within the batch-size and prefill-token budgets), so no request waits for another to finish.
How many new prompts start per step, and how long an idle engine lets a burst arrive, follow from what
a step costs on this machine (step_cost.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import tokenizers
import torch

from bloomduo.core import metrics
from bloomduo.core.logs import get_logger
from bloomduo.gateway.config import SchedulerSettings
from bloomduo.gateway.detokenizer import IncrementalDetokenizer
from bloomduo.gateway.embedding import Embedder
from bloomduo.gateway.sampling import Sampler, sample_batch
from bloomduo.gateway.shards import ShardPool, ShardUnavailable
from bloomduo.gateway.step_cost import StepCostModel, arrival_wait, prompts_to_start
from bloomduo.gateway.stopping import FinishReason, StoppingCriteria
from bloomduo.gateway.validation import GenerationRequest
from bloomduo.v1 import shard_pb2

log = get_logger(__name__)

# Up to this many rows the embedding lookup (tens of microseconds) runs on the event loop: handing it
# to the executor thread cost about 0.7 ms per decode step, all of it on the critical path.
INLINE_EMBED_TOKENS = 64


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True)
class GenerationResult:
    text: str
    generated_tokens: int
    finish_reason: FinishReason
    seed: int
    prompt_tokens: int
    tokens: list[GeneratedToken]


@dataclass(frozen=True)
class StreamEvent:
    token: GeneratedToken
    result: GenerationResult | None = None


class EngineUnavailable(RuntimeError):
    """The model could not run this request (a shard worker failed); the caller may retry."""


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    sequence_id: int
    sampler: Sampler
    stopping: StoppingCriteria
    detokenizer: IncrementalDetokenizer
    token_ids: list[int]
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[GeneratedToken] = field(default_factory=list)
    cached: int = 0
    prefix_from: int = 0  # a running sequence whose first `cached` tokens this one shares, until sent
    cancelled: bool = False
    waited_steps: int = 0  # steps run while this one was queued
    queued_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def pending(self) -> int:
        """Tokens the workers have not seen yet: the prompt (or its rest) first, then one per step."""
        return len(self.token_ids) - self.cached

    def next_chunk(self, max_tokens: int) -> tuple[shard_pb2.SequenceChunk, list[int]]:
        new_ids = self.token_ids[self.cached : self.cached + max_tokens]
        chunk = shard_pb2.SequenceChunk(
            sequence_id=self.sequence_id,
            start_position=self.cached,
            num_tokens=len(new_ids),
            prefix_sequence_id=self.prefix_from,
        )
        self.prefix_from = 0
        return chunk, new_ids


@dataclass
class StepTimings:
    """Where one step's time went, in seconds (logged per step and exported as metrics)."""

    embed: float = 0.0
    shards: float = 0.0  # wire + worker compute, as seen by the gateway
    worker_compute: float = 0.0  # slowest worker's own compute time, all-reduces included
    sample: float = 0.0


class Engine:
    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        embedder: Embedder,
        shards: ShardPool,
        settings: SchedulerSettings,
        eos_token_id: int | None,
        on_serving_change: Callable[[bool], Awaitable[None]] | None = None,
        log_text: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.shards = shards
        self.settings = settings
        self.eos_token_id = eos_token_id
        self.special_ids = set(tokenizer.get_vocab(with_added_tokens=True).values()) - set(
            tokenizer.get_vocab(with_added_tokens=False).values()
        )
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.to_free: list[int] = []
        self.sequence_ids = itertools.count(1)
        self.wakeup = asyncio.Event()
        # Embedding and sampling are torch work; keep them off the event loop that serves gRPC.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-step")
        self.task: asyncio.Task | None = None
        self.steps = 0
        self.step_cost = StepCostModel()
        # False while the shard group is lost and being re-formed; requests are then refused.
        self.serving = True
        self.on_serving_change = on_serving_change
        self.log_text = log_text

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Yield one event per generated token, the last with the result. Closing the iterator cancels."""
        sequence = _Sequence(
            request=request,
            sequence_id=next(self.sequence_ids),
            sampler=Sampler(request.sampling),
            stopping=StoppingCriteria(
                max_new_tokens=request.max_new_tokens,
                eos_token_id=self.eos_token_id,
                stop_sequences=request.stop,
                ignore_eos=request.ignore_eos,
            ),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_ids),
            token_ids=list(request.prompt_ids),
        )
        self.waiting.append(sequence)
        self.wakeup.set()
        try:
            while True:
                item = await sequence.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.result is not None:
                    return
        finally:
            # Disconnects and cancellations land here; the loop drops the sequence at its next step.
            sequence.cancelled = True
            self.wakeup.set()

    async def _run(self) -> None:
        while True:
            if not self.waiting and not self.running and not self.to_free:
                self.wakeup.clear()
                await self.wakeup.wait()
                await self._await_burst()
                continue
            try:
                await self._step()
            except ShardUnavailable as exc:
                await self._recover(exc)
            except Exception as exc:  # a bug must fail requests, not kill the loop that serves everybody
                log.exception("engine_step_failed")
                self.to_free.extend(s.sequence_id for s in self.running)
                self._fail(self.running, exc)
                self.running = []

    async def _await_burst(self) -> None:
        """Woken from idle: let the rest of a burst of requests arrive, so it shares the first step
        instead of waiting a whole step behind its first request (see step_cost.arrival_wait)."""
        quiet_s, max_s = arrival_wait(self.step_cost.estimate()) if self.settings.burst_wait else (0.0, 0.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_s
        while (left := deadline - loop.time()) > 0:
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout=min(quiet_s, left))
            except TimeoutError:
                return

    async def _recover(self, exc: ShardUnavailable) -> None:
        """Fail everything in flight at once, then wait for the workers to re-form their group."""
        self.serving = False
        log.error("shards_lost", reason=str(exc))
        self._fail([*self.running, *self.waiting], exc)
        self.running, self.waiting = [], deque()
        # Broken streams make every worker drop its caches: nothing is left to free.
        self.to_free.clear()
        await self.shards.reset_streams()
        if self.on_serving_change is not None:
            await self.on_serving_change(False)
        await self.shards.wait_ready(timeout_s=float("inf"))
        self.serving = True
        if self.on_serving_change is not None:
            await self.on_serving_change(True)
        log.info("shards_recovered")

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self.running if s.cancelled]:
            self.running.remove(sequence)
            self.to_free.append(sequence.sequence_id)
            log.info("request_cancelled", request_id=sequence.request.request_id)
            metrics.REQUESTS.labels("cancelled", "").inc()
        cancelled_waiting = sum(s.cancelled for s in self.waiting)
        if cancelled_waiting:
            metrics.REQUESTS.labels("cancelled", "").inc(cancelled_waiting)
            self.waiting = deque(s for s in self.waiting if not s.cancelled)

    def _schedule(self) -> list[tuple[_Sequence, int]]:
        """Pick this step's sequences and how many tokens each sends.

        Running decodes always go (arrivals never starve them); prompts share a token budget
        (max_batch_prefill_tokens), longer ones are cut into chunks across steps so a long prompt
        delays the running decodes by one bounded chunk at a time; new requests join first come
        first served while the batch has room, as many at once as minimises their summed time to
        first token under the step cost learned so far (step_cost.py), and at least every one that
        has waited max_waiting_steps steps; the rest start next step.
        With prefix sharing, a prompt that mostly repeats one starting in this very step waits one
        step and then copies it (see _share_prefix).
        """
        budget = self.settings.max_batch_prefill_tokens
        plan: list[tuple[_Sequence, int]] = []
        for sequence in self.running:
            if sequence.pending == 1:
                plan.append((sequence, 1))
        for sequence in self.running:
            if sequence.pending > 1 and budget > 0:
                take = min(sequence.pending, budget)
                plan.append((sequence, take))
                budget -= take
        starting: list[_Sequence] = []  # admitted now, computing their prompts from the first token
        admitted: list[tuple[_Sequence, int]] = []
        deferred: list[_Sequence] = []
        while (
            self.waiting and budget > 0 and len(self.running) + len(admitted) < self.settings.max_batch_size
        ):
            sequence = self.waiting.popleft()
            if self.settings.prefix_sharing and not self._share_prefix(sequence, starting):
                deferred.append(sequence)
                continue
            if sequence.cached == 0:
                starting.append(sequence)
            take = min(sequence.pending, budget)
            admitted.append((sequence, take))
            budget -= take
        start = self._prompts_starting_now(admitted, running_tokens=sum(take for _, take in plan))
        for sequence, _ in admitted[start:]:
            sequence.cached = sequence.prefix_from = 0  # looks for a prefix again when it starts
        later = [sequence for sequence, _ in admitted[start:]] + deferred
        self.waiting.extendleft(sorted(later, key=lambda s: s.sequence_id, reverse=True))
        for sequence in self.waiting:
            sequence.waited_steps += 1
        for sequence, take in admitted[:start]:
            self.running.append(sequence)
            metrics.QUEUE_TIME.observe(time.perf_counter() - sequence.queued_at)
            if sequence.prefix_from:
                metrics.PREFIX_TOKENS_SHARED.inc(sequence.cached)
                log.debug(
                    "prefix_shared",
                    request_id=sequence.request.request_id,
                    tokens=sequence.cached,
                    from_sequence_id=sequence.prefix_from,
                )
            plan.append((sequence, take))
        return plan

    def _prompts_starting_now(self, admitted: list[tuple[_Sequence, int]], running_tokens: int) -> int:
        """How many of the admitted prompts start in this step: the split with the least summed time to
        first token, stretched to include every prompt that has waited max_waiting_steps already."""
        start = prompts_to_start([take for _, take in admitted], running_tokens, self.step_cost.estimate())
        overdue = [
            index
            for index, (sequence, _) in enumerate(admitted)
            if sequence.waited_steps >= self.settings.max_waiting_steps
        ]
        return max(start, overdue[-1] + 1) if overdue else start

    def _share_prefix(self, sequence: _Sequence, starting: list[_Sequence]) -> bool:
        """Start a new sequence after the longest prefix of its prompt that a running one has cached;
        False (admit it next step) when a sequence `starting` in this step computes most of its prompt.

        The first chunk then tells the workers to copy those keys and values. Donors are sequences
        whose cache the workers hold before this step. The prompt's last token always runs: its logits
        give the first new token. Waiting one step for a prompt being computed right now costs about
        what computing it again in this step would, and spares the step that work.
        """
        prompt = sequence.token_ids
        cached = [s for s in self.running if s.cached and not s.prefix_from]
        donor, length = _longest_shared_prefix(prompt, cached, lambda s: s.cached)
        pending, pending_length = _longest_shared_prefix(prompt, starting, lambda s: len(s.token_ids))
        if pending is not None and pending_length > length and 2 * pending_length >= len(prompt):
            return False
        if donor is not None:
            sequence.cached, sequence.prefix_from = length, donor.sequence_id
        return True

    async def _step(self) -> None:
        self._drop_cancelled()
        plan = self._schedule()
        free_ids, self.to_free = self.to_free, []
        chunks: list[shard_pb2.SequenceChunk] = []
        input_ids: list[int] = []
        for sequence, take in plan:
            chunk, new_ids = sequence.next_chunk(take)
            chunks.append(chunk)
            input_ids.extend(new_ids)

        timings = StepTimings()
        loop = asyncio.get_running_loop()
        step_started = started = time.perf_counter()
        token_ids = torch.tensor(input_ids, dtype=torch.long)
        if len(input_ids) <= INLINE_EMBED_TOKENS:
            hidden = self.embedder(token_ids)
        else:
            hidden = await loop.run_in_executor(self.executor, self.embedder, token_ids)
        timings.embed = time.perf_counter() - started
        started = time.perf_counter()
        # Only the rows a sampler must see travel back in full; plain greedy rows (and prompts still
        # being prefilled) come back as each slice's best token and log-sum-exp.
        ready = [
            sequence.pending == chunk.num_tokens for (sequence, _), chunk in zip(plan, chunks, strict=True)
        ]
        full = [
            is_ready and not sequence.request.sampling.is_plain_greedy
            for (sequence, _), is_ready in zip(plan, ready, strict=True)
        ]
        result = await self.shards.step(
            hidden, chunks, free_ids, [sequence.request.request_id for sequence, _ in plan], full
        )
        timings.shards = time.perf_counter() - started
        timings.worker_compute = result.worker_seconds
        self.steps += 1
        for (sequence, _), chunk in zip(plan, chunks, strict=True):
            sequence.cached += chunk.num_tokens
        sampled = [sequence for (sequence, _), wants_row in zip(plan, full, strict=True) if wants_row]
        started = time.perf_counter()
        picks = iter(
            await loop.run_in_executor(
                self.executor,
                sample_batch,
                [sequence.sampler for sequence in sampled],
                result.logits,
                [sequence.token_ids for sequence in sampled],
            )
            if sampled
            else []
        )
        timings.sample = time.perf_counter() - started
        self.step_cost.observe(len(input_ids), time.perf_counter() - step_started)
        greedy = iter(result.greedy)
        # Summaries come in request order for every row not sent in full, partial prefills included.
        for (sequence, _), is_ready, wants_row in zip(plan, ready, full, strict=True):
            pick = next(picks) if wants_row else next(greedy)
            if is_ready:
                self._advance(sequence, *pick)
        self._record(timings, len(plan), len(input_ids))

    def _record(self, timings: StepTimings, sequences: int, tokens: int) -> None:
        for name in ("embed", "shards", "worker_compute", "sample"):
            metrics.STEP_PHASE.labels(name).observe(getattr(timings, name))
        metrics.STEP_BATCH.observe(sequences)
        cost = self.step_cost.estimate()
        if cost is not None:
            metrics.STEP_COST.labels("fixed").set(cost.fixed_s)
            metrics.STEP_COST.labels("per_token").set(cost.per_token_s)
        metrics.BATCH_SIZE.set(len(self.running))
        metrics.QUEUE_SIZE.set(len(self.waiting))
        log.debug(
            "step",
            step=self.steps,
            sequences=sequences,
            tokens=tokens,
            embed_s=round(timings.embed, 6),
            shards_s=round(timings.shards, 6),
            worker_compute_s=round(timings.worker_compute, 6),
            sample_s=round(timings.sample, 6),
        )

    def _advance(self, sequence: _Sequence, token_id: int, logprob: float) -> None:
        now = time.perf_counter()
        if sequence.first_token_at is None:
            sequence.first_token_at = now
        sequence.token_ids.append(token_id)
        text = sequence.detokenizer.push(token_id)
        finish = sequence.stopping(token_id, sequence.detokenizer.text)
        if finish is not None:
            text += sequence.detokenizer.flush()
        token = GeneratedToken(id=token_id, text=text, logprob=logprob, special=token_id in self.special_ids)
        sequence.tokens.append(token)
        if finish is None:
            sequence.events.put_nowait(StreamEvent(token))
            return
        self.running.remove(sequence)
        self.to_free.append(sequence.sequence_id)
        request = sequence.request
        generated_text = sequence.detokenizer.text
        result = GenerationResult(
            text=request.prompt + generated_text if request.return_full_text else generated_text,
            generated_tokens=len(sequence.tokens),
            finish_reason=finish,
            seed=request.sampling.seed,
            prompt_tokens=len(request.prompt_ids),
            tokens=sequence.tokens if request.details else [],
        )
        sequence.events.put_nowait(StreamEvent(token, result))
        ttft = sequence.first_token_at - sequence.queued_at
        duration = now - sequence.queued_at
        metrics.REQUESTS.labels("ok", finish.value).inc()
        metrics.TIME_TO_FIRST_TOKEN.observe(ttft)
        metrics.REQUEST_DURATION.observe(duration)
        metrics.GENERATED_TOKENS.observe(len(sequence.tokens))
        if len(sequence.tokens) > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.observe((duration - ttft) / (len(sequence.tokens) - 1))
        log.info(
            "request_finished",
            request_id=request.request_id,
            finish_reason=finish.value,
            prompt_tokens=len(request.prompt_ids),
            generated_tokens=len(sequence.tokens),
            time_to_first_token_s=round(ttft, 6),
            duration_s=round(duration, 6),
            **({"prompt": request.prompt, "text": generated_text} if self.log_text else {}),
        )

    def _fail(self, sequences: list[_Sequence], exc: BaseException) -> None:
        if not sequences:
            return
        log.error("requests_failed", reason=str(exc), requests=[s.request.request_id for s in sequences])
        error = EngineUnavailable(f"the model failed while serving this request: {exc}; retry it")
        metrics.REQUESTS.labels("unavailable", "").inc(len(sequences))
        for sequence in sequences:
            sequence.events.put_nowait(error)


def _longest_shared_prefix(
    prompt: list[int], candidates: list[_Sequence], known: Callable[[_Sequence], int]
) -> tuple[_Sequence | None, int]:
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
