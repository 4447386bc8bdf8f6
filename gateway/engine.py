"""Continuous batching: requests join and leave a running batch between model steps.

The engine runs the loop: it asks the scheduler (scheduler.py) for each step's chunks, embeds their
tokens, drives the shard workers through one step, samples, and turns each new token into a stream event
(detokenized, checked against the request's stopping criteria). What a step carries, and why, is the
scheduler's business.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import tokenizers
import torch

from bloomduo.core import metrics
from bloomduo.core.logprobs import NO_PENALTY, NO_SCORING, RepetitionPenalty, RowScore, Scoring
from bloomduo.core.logs import get_logger
from bloomduo.gateway.config import SchedulerSettings, StepDeadline
from bloomduo.gateway.detokenizer import IncrementalDetokenizer
from bloomduo.gateway.embedding import Embedder
from bloomduo.gateway.errors import Unavailable
from bloomduo.gateway.request import GenerationRequest
from bloomduo.gateway.sampling import Sampler, sample_batch
from bloomduo.gateway.scheduler import Scheduler
from bloomduo.gateway.sequence import Chunk, SequenceState
from bloomduo.gateway.shards import ShardPool, ShardsStalled, ShardUnavailable
from bloomduo.gateway.stopping import FinishReason, StoppingCriteria

log = get_logger(__name__)

# Up to this many rows the embedding lookup (tens of microseconds) runs on the event loop: handing it
# to the executor thread cost about 0.7 ms per decode step, all of it on the critical path.
INLINE_EMBED_TOKENS = 64
# Sampling runs while the workers wait for the step's tokens, so every core the gateway may use is idle
# then: the rows are sampled in parallel, one torch thread each (more would wake OpenMP teams).
SAMPLING_THREADS = min(8, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class TopToken:
    """One of the likeliest tokens at a position (top_n_tokens): log_softmax of the model's logits."""

    id: int
    text: str  # the token decoded on its own
    logprob: float
    special: bool


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    text: str
    logprob: float
    special: bool
    top_tokens: tuple[TopToken, ...] = ()


@dataclass(frozen=True)
class PromptToken:
    """A prompt token scored by the row before it (decoder_input_details); the first has no logprob."""

    id: int
    text: str  # what it adds to the prompt's text, as GeneratedToken.text
    logprob: float | None
    top_tokens: tuple[TopToken, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    text: str
    generated_tokens: int
    finish_reason: FinishReason
    seed: int
    prompt_tokens: int
    tokens: list[GeneratedToken]
    prefill: list[PromptToken] = field(default_factory=list)  # with decoder_input_details


@dataclass(frozen=True)
class StreamEvent:
    token: GeneratedToken
    result: GenerationResult | None = None
    # On the first event of a request with decoder_input_details: the scored prompt, for fronts that
    # stream it before the generated text (OpenAI's echo). The result carries it too.
    prefill: list[PromptToken] | None = None


class EngineUnavailable(Unavailable):
    """The model could not run this request (a shard worker failed); the caller may retry. Counted by the
    engine when it fails the request, so no front counts it again."""


@dataclass(eq=False, kw_only=True)
class _Generation(SequenceState):
    """A request's sequence, with what turns its tokens into events: sampling, stopping, text."""

    request: GenerationRequest
    sampler: Sampler
    stopping: StoppingCriteria
    detokenizer: IncrementalDetokenizer
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[GeneratedToken] = field(default_factory=list)
    prompt_scores: list[RowScore] = field(default_factory=list)  # rows scored so far, prompt token 1 on
    prefill: list[PromptToken] = field(default_factory=list)  # made from them with the first token
    first_token_at: float | None = None


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
        deadline: StepDeadline | None = None,
        on_stalled: Callable[[str], None] | None = None,
    ) -> None:
        """on_stalled(reason): the workers stalled (see `step_deadline`); the engine has failed every
        request, serves none from then on, and the caller must have the group replaced."""
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.shards = shards
        self.scheduler: Scheduler[_Generation] = Scheduler(settings)
        self.eos_token_id = eos_token_id
        self.special_ids = set(tokenizer.get_vocab(with_added_tokens=True).values()) - set(
            tokenizer.get_vocab(with_added_tokens=False).values()
        )
        self.sequence_ids = itertools.count(1)
        self.wakeup = asyncio.Event()
        # Embedding and sampling are torch work; keep them off the event loop that serves gRPC. Sampling has
        # threads of its own (SAMPLING_THREADS).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-step")
        self.sampling_pool = ThreadPoolExecutor(
            max_workers=SAMPLING_THREADS, thread_name_prefix="gateway-sample"
        )
        self.task: asyncio.Task | None = None
        self.steps = 0
        # False while the shard group is lost and being re-formed; requests are then refused.
        self.serving = True
        self.on_serving_change = on_serving_change
        self.log_text = log_text
        self.deadline = deadline or StepDeadline()
        self.on_stalled = on_stalled
        self.fresh_group = True  # no step ran on this group yet: its first gets the first-step allowance
        # (tokens, seconds) of the step with the most tokens but a group's first: how far the fitted cost
        # has been tried, and what a step may cost while there is no fit (too few steps, all of one size).
        self.largest_step: tuple[int, float] | None = None
        self.stalled: ShardsStalled | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.sampling_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> Sequence[SequenceState]:
        return self.scheduler.running

    @property
    def waiting(self) -> Sequence[SequenceState]:
        return self.scheduler.waiting

    @property
    def in_flight(self) -> int:
        return self.scheduler.in_flight

    @property
    def kept_caches(self) -> int:
        """Finished sequences the workers keep for a next prompt that starts alike (Scheduler.kept)."""
        return len(self.scheduler.kept)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Yield one event per generated token, the last with the result. Closing the iterator cancels."""
        sequence = _Generation(
            sequence_id=next(self.sequence_ids),
            request_id=request.request_id,
            token_ids=list(request.prompt_ids),
            request=request,
            sampler=Sampler(request.sampling),
            stopping=StoppingCriteria(
                max_new_tokens=request.max_new_tokens,
                eos_token_id=self.eos_token_id,
                stop_sequences=request.stop,
                ignore_eos=request.ignore_eos,
            ),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_ids),
            scores_prompt=request.decoder_input_details,
        )
        if self.stalled is None:
            self.scheduler.add(sequence)
            self.wakeup.set()
        else:  # admitted just before the stall: no step will ever run it
            self._fail([sequence], self.stalled)
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
            if not self.scheduler.has_work:
                self.wakeup.clear()
                await self.wakeup.wait()
                await self._await_burst()
                continue
            try:
                await self._step()
            except ShardsStalled as exc:
                # Hung workers stay alive, so nothing re-forms their group by itself: leave that to the
                # supervisor, which can kill them.
                self.stalled = exc
                await self._lose_group(exc)
                if self.on_stalled is not None:
                    self.on_stalled(str(exc))
                return
            except ShardUnavailable as exc:
                await self._recover(exc)
            except Exception as exc:  # a bug must fail requests, not kill the loop that serves everybody
                log.exception("engine_step_failed")
                self._fail(self.scheduler.drop_running(), exc)

    async def _await_burst(self) -> None:
        """Woken from idle: let the rest of a burst of requests arrive (Scheduler.arrival_wait)."""
        quiet_s, max_s = self.scheduler.arrival_wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_s
        while (left := deadline - loop.time()) > 0:
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout=min(quiet_s, left))
            except TimeoutError:
                return

    async def _lose_group(self, exc: ShardUnavailable) -> None:
        """Fail everything in flight at once and stop serving."""
        self.serving = False
        log.error("shards_lost", reason=str(exc))
        self._fail(self.scheduler.drop_all(), exc)
        self.shards.reset_streams()
        if self.on_serving_change is not None:
            await self.on_serving_change(False)

    async def _recover(self, exc: ShardUnavailable) -> None:
        """Lose the group, then wait for the workers to re-form it (their supervisor restarts them)."""
        await self._lose_group(exc)
        await self.shards.wait_ready(timeout_s=float("inf"))
        self.fresh_group = True
        self.serving = True
        if self.on_serving_change is not None:
            await self.on_serving_change(True)
        log.info("shards_recovered")

    def step_deadline(self, tokens: int) -> float | None:
        """Seconds a step of `tokens` rows may take before its workers count as stalled; None: the first-step
        allowance (the pool's default), for a fresh group or before any step was measured.

        What the step should cost comes from the fitted line (step_cost.py), or while there is none from the
        largest step seen. Past that step's size the line is extrapolated from smaller steps (decodes, say,
        before the first long prompt), so the step may also cost as much per token as the largest one did.
        """
        if self.fresh_group or self.largest_step is None:
            return None
        largest_tokens, largest_s = self.largest_step
        cost = self.scheduler.step_cost.estimate()
        expected = largest_s if cost is None else cost.fixed_s + cost.per_token_s * tokens
        if tokens > largest_tokens:
            expected = max(expected, largest_s * tokens / largest_tokens)
        return max(self.deadline.stall_min_s, self.deadline.stall_factor * expected)

    async def _step(self) -> None:
        plan = self.scheduler.schedule()
        free_ids = self.scheduler.take_freed()
        chunks = [chunk for _, chunk in plan]
        input_ids = [token for sequence, chunk in plan for token in sequence.token_ids[chunk.positions]]

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
        # Only the rows a sampler must see travel back in full; greedy rows (the workers apply their
        # repetition penalty) and prompts still being prefilled come back as each slice's best token and
        # log-sum-exp.
        ready = [sequence.pending == chunk.num_tokens for sequence, chunk in plan]
        full = [
            is_ready and sequence.request.sampling.do_sample
            for (sequence, _), is_ready in zip(plan, ready, strict=True)
        ]
        scoring = [
            _scoring(sequence, chunk, is_ready)
            for (sequence, chunk), is_ready in zip(plan, ready, strict=True)
        ]
        result = await self.shards.step(
            hidden,
            chunks,
            free_ids,
            [sequence.request_id for sequence, _ in plan],
            full,
            self.step_deadline(len(input_ids)),
            scoring,
            [_penalty(sequence, is_ready) for (sequence, _), is_ready in zip(plan, ready, strict=True)],
        )
        first_of_group, self.fresh_group = self.fresh_group, False
        timings.shards = time.perf_counter() - started
        timings.worker_compute = result.worker_seconds
        self.steps += 1
        self.scheduler.computed(plan)
        sampled = [sequence for (sequence, _), wants_row in zip(plan, full, strict=True) if wants_row]
        started = time.perf_counter()
        picks = iter(await self._sample(sampled, result.logits))
        timings.sample = time.perf_counter() - started
        step_s = time.perf_counter() - step_started
        self.scheduler.observe_step(len(input_ids), step_s)
        if input_ids and not first_of_group and len(input_ids) >= (self.largest_step or (0, 0.0))[0]:
            self.largest_step = (len(input_ids), step_s)
        greedy = iter(result.greedy)
        # Summaries come in request order for every row not sent in full, partial prefills included.
        for (sequence, _), is_ready, wants_row, asked, scores in zip(
            plan, ready, full, scoring, result.scores, strict=True
        ):
            pick = next(picks) if wants_row else next(greedy)
            sequence.prompt_scores += scores[: len(asked.next_token_ids)]
            if is_ready:
                # A ready chunk's last row, scored for its top-n, is the one the new token came from.
                self._advance(sequence, *pick, top=scores[-1].top if asked.top_n else [])
        self._record(timings, len(plan), len(input_ids))

    async def _sample(self, sampled: list[_Generation], logits: torch.Tensor) -> list[tuple[int, float]]:
        """Each sampled sequence's (token, logprob) from its logits row, in order; the rows are shared out
        among the sampling threads in contiguous parts."""
        loop = asyncio.get_running_loop()
        parts = min(SAMPLING_THREADS, len(sampled))
        bounds = [len(sampled) * part // parts for part in range(parts + 1)] if parts else []
        results = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self.sampling_pool,
                    sample_batch,
                    [sequence.sampler for sequence in sampled[start:end]],
                    logits[start:end],
                    [sequence.token_ids for sequence in sampled[start:end]],
                )
                for start, end in itertools.pairwise(bounds)
            )
        )
        return [pick for part in results for pick in part]

    def _record(self, timings: StepTimings, sequences: int, tokens: int) -> None:
        for name in ("embed", "shards", "worker_compute", "sample"):
            metrics.STEP_PHASE.labels(name).observe(getattr(timings, name))
        metrics.STEP_BATCH.observe(sequences)
        metrics.BATCH_SIZE.set(len(self.scheduler.running))
        metrics.QUEUE_SIZE.set(len(self.scheduler.waiting))
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

    def _top_tokens(self, top: list[tuple[int, float]]) -> tuple[TopToken, ...]:
        decode = self.tokenizer.decode
        return tuple(
            TopToken(
                token_id, decode([token_id], skip_special_tokens=False), logprob, token_id in self.special_ids
            )
            for token_id, logprob in top
        )

    def _prefill(self, sequence: _Generation) -> list[PromptToken]:
        """The prompt's tokens with the scores of the rows before them; their texts add up to its text."""
        prompt_ids = sequence.request.prompt_ids
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        texts = [detokenizer.push(token_id) for token_id in prompt_ids]
        texts[-1] += detokenizer.flush()
        first = PromptToken(prompt_ids[0], texts[0], None)
        return [first] + [
            PromptToken(token_id, text, score.logprob, self._top_tokens(score.top))
            for token_id, text, score in zip(prompt_ids[1:], texts[1:], sequence.prompt_scores, strict=True)
        ]

    def _advance(
        self, sequence: _Generation, token_id: int, logprob: float, top: list[tuple[int, float]]
    ) -> None:
        now = time.perf_counter()
        first = sequence.first_token_at is None
        if first:
            sequence.first_token_at = now
            if sequence.scores_prompt:
                sequence.prefill = self._prefill(sequence)
        sequence.token_ids.append(token_id)
        text = sequence.detokenizer.push(token_id)
        finish = sequence.stopping(token_id, sequence.detokenizer.text)
        if finish is not None:
            text += sequence.detokenizer.flush()
        token = GeneratedToken(
            id=token_id,
            text=text,
            logprob=logprob,
            special=token_id in self.special_ids,
            top_tokens=self._top_tokens(top),
        )
        sequence.tokens.append(token)
        prefill = sequence.prefill if first and sequence.scores_prompt else None
        if finish is None:
            _deliver(sequence, StreamEvent(token, prefill=prefill))
            return
        self.scheduler.finish(sequence)
        request = sequence.request
        generated_text = sequence.detokenizer.text
        result = GenerationResult(
            text=request.prompt + generated_text if request.return_full_text else generated_text,
            generated_tokens=len(sequence.tokens),
            finish_reason=finish,
            seed=request.sampling.seed,
            prompt_tokens=len(request.prompt_ids),
            tokens=sequence.tokens if request.details else [],
            prefill=sequence.prefill,
        )
        _deliver(sequence, StreamEvent(token, result, prefill))
        ttft = sequence.first_token_at - sequence.queued_at
        duration = now - sequence.queued_at
        metrics.REQUESTS.labels(metrics.Outcome.OK, finish.value).inc()
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

    def _fail(self, sequences: list[_Generation], exc: BaseException) -> None:
        if not sequences:
            return
        log.error("requests_failed", reason=str(exc), requests=[s.request.request_id for s in sequences])
        error = EngineUnavailable(f"the model failed while serving this request: {exc}; retry it")
        metrics.REQUESTS.labels(metrics.Outcome.UNAVAILABLE, "").inc(len(sequences))
        for sequence in sequences:
            _deliver(sequence, error)


def _deliver(sequence: _Generation, item: StreamEvent | BaseException) -> None:
    """Hand `item` to the sequence's stream one loop turn from now, not at once. The engine loop goes on to
    the next step without yielding, so the workers' writes of that step are queued before the streams'
    wake-ups and go out first, and delivering the tokens (protobuf or JSON, then writes to the clients)
    overlaps the workers' compute: 0.1-0.2 ms off a one-stream step's round trip, 0.6-0.9 ms off a
    16-stream one's (Xeon with AMX, docs/performance-record.md). Every item goes the same way, so each
    stream sees its items in order."""
    asyncio.get_running_loop().call_soon(sequence.events.put_nowait, item)


def _penalty(sequence: _Generation, ready: bool) -> RepetitionPenalty:
    """The repetition penalty the workers apply before picking a ready greedy sequence's token: over every
    token so far, prompt included, each once."""
    sampling = sequence.request.sampling
    if not ready or sampling.do_sample or sampling.repetition_penalty == 1.0:
        return NO_PENALTY
    return RepetitionPenalty(sampling.repetition_penalty, sorted(set(sequence.token_ids)))


def _scoring(sequence: _Generation, chunk: Chunk, ready: bool) -> Scoring:
    """The rows of this step's chunk to score: with decoder_input_details, each prompt row against the
    prompt token after it (a chunk's last row against the next chunk's first token; the prompt's last row
    predicts the first generated token, not a prompt token); with top_n_tokens, their top-n, and that of
    the row the new token comes from when the chunk is ready."""
    request = sequence.request
    next_token_ids: list[int] = []
    if request.decoder_input_details:
        end = min(chunk.start_position + chunk.num_tokens + 1, len(request.prompt_ids))
        next_token_ids = sequence.token_ids[chunk.start_position + 1 : end]
    top_n = request.top_n_tokens if ready or next_token_ids else 0
    return Scoring(next_token_ids, top_n) if next_token_ids or top_n else NO_SCORING
