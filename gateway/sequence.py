"""One sequence as the scheduler and the shard workers see it: its tokens and how many of them the
workers hold in their KV caches; and the chunk of it that one step carries (plain data: shards.py alone
turns chunks into wire messages)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Chunk:
    """Tokens [start_position, start_position + num_tokens) of one sequence, computed in one step.

    start_position equals the tokens the workers already cache for it. prefix_sequence_id, non-zero on
    a sequence's first chunk only: its first start_position tokens are those of that cached sequence,
    whose keys and values the workers copy instead of computing them again (prefix sharing).
    """

    sequence_id: int
    start_position: int
    num_tokens: int
    prefix_sequence_id: int = 0

    @property
    def positions(self) -> slice:
        return slice(self.start_position, self.start_position + self.num_tokens)


@dataclass(eq=False, kw_only=True)
class SequenceState:
    sequence_id: int
    request_id: str
    token_ids: list[int]  # the prompt, then each generated token
    cached: int = 0  # leading tokens in the workers' caches (or planned to be, once shared)
    prefix_from: int = 0  # a running sequence whose first `cached` tokens this one shares, until sent
    # Its prompt's rows are scored (prompt logprobs), so it computes every one: it copies no shared prefix.
    scores_prompt: bool = False
    cancelled: bool = False
    waited_steps: int = 0  # steps run while this one was queued
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def pending(self) -> int:
        """Tokens the workers have not seen yet: the prompt (or its rest) first, then one per step."""
        return len(self.token_ids) - self.cached

    def next_chunk(self, max_tokens: int) -> Chunk:
        """The next at most max_tokens pending tokens; a shared prefix is announced once, with the first."""
        chunk = Chunk(self.sequence_id, self.cached, min(max_tokens, self.pending), self.prefix_from)
        self.prefix_from = 0
        return chunk
