"""How one step's flat rows map onto sequences, and the attention biases they need.

A step's input is one chunk per sequence (Chunk), its tokens' rows concatenated in that order.
`plan_step` groups the chunks once per step by how they can attend together and builds each group's
ALiBi + causal bias; every layer then reuses the plan (the biases depend on positions and heads only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bloomduo.shard_worker.kv_cache import KVCache


@dataclass(frozen=True)
class Chunk:
    """Rows of hidden_states holding tokens start_position .. start_position+num_tokens-1 of a sequence.

    prefix_sequence_id (non-zero) starts a new sequence whose first start_position tokens are those of
    that cached sequence: the KV cache copies them (see KVCache.prepare).
    """

    sequence_id: int
    start_position: int
    num_tokens: int
    prefix_sequence_id: int = 0


@dataclass(frozen=True)
class PromptGroup:
    """Whole prompts of one length (chunks from position 0): they attend only to themselves, all under
    the same causal ALiBi bias, so one batched call serves them all."""

    rows: torch.Tensor | slice  # their rows of hidden_states, prompt after prompt (a slice when adjacent)
    slots: torch.Tensor | slice  # their cache slots (a slice when consecutive)
    length: int  # tokens per prompt
    bias: torch.Tensor  # [heads, length, length] ALiBi + causal
    slot_ids: torch.Tensor  # the slots as an int64 array, for the native attention kernel


@dataclass(frozen=True)
class StepPlan:
    """How one step's rows map onto sequences, and their attention biases; built once per step and
    shared by every layer (the biases depend on positions and heads only).

    Chunks of one token (every decode, and one-token prompts) attend together in one batched call
    over the cache's first `num_slots` slots; whole prompts of equal length attend together in one
    call per length; other chunks (a long prompt's later chunks, prompts after a shared prefix)
    attend one by one.
    """

    single_rows: torch.Tensor | None  # rows of hidden_states that are one-token chunks (None: all rows)
    single_slots: torch.Tensor  # their cache slots
    single_positions: torch.Tensor  # their positions (= keys already cached)
    num_slots: int  # slots covered by the batched call
    kv_length: int  # keys per slot it reads
    # [num_slots, heads, 1, kv_length]: ALiBi where a slot's token may look, dtype-min elsewhere
    single_bias: torch.Tensor | None
    slots_match_rows: bool  # single i sits in slot i (the usual decode batch): no scatter or gather
    prompts: list[PromptGroup]
    # other chunks, their rows and their [heads, num_tokens, kv_length] ALiBi + causal bias
    multi: list[tuple[Chunk, slice, torch.Tensor]]

    @property
    def decode_only(self) -> bool:
        return not (self.prompts or self.multi)

    @property
    def prompts_only(self) -> bool:
        """Every row belongs to one group of whole prompts, in order (a step of equal-length prompts)."""
        return self.single_bias is None and not self.multi and len(self.prompts) == 1


def alibi_bias(slopes: torch.Tensor, kv_length: int, dtype: torch.dtype) -> torch.Tensor:
    """[heads, 1, kv_length]: slope[h] * key_position, as HF builds it (the query's own offset is a
    per-row constant, which softmax ignores)."""
    key_positions = torch.arange(kv_length, device=slopes.device)
    return (slopes[:, None, None] * key_positions).to(dtype)


def causal_alibi_bias(slopes: torch.Tensor, start: int, kv_length: int, dtype: torch.dtype) -> torch.Tensor:
    """[heads, kv_length - start, kv_length]: ALiBi for queries at positions start.., p seeing keys 0..p."""
    device = slopes.device
    query_positions = torch.arange(start, kv_length, device=device)
    future = torch.arange(kv_length, device=device)[None, :] > query_positions[:, None]
    return alibi_bias(slopes, kv_length, dtype).masked_fill(future, torch.finfo(dtype).min)


def one_query_bias(
    slopes: torch.Tensor, limits: torch.Tensor, kv_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """[slots, heads, 1, kv_length]: ALiBi where slot s's one query sees keys 0..limits[s] (-1: none),
    dtype-min elsewhere."""
    visible = torch.arange(kv_length, device=limits.device)[None, :] <= limits[:, None]  # [slots, kv_length]
    alibi = alibi_bias(slopes, kv_length, dtype)
    return torch.where(visible[:, None, None, :], alibi, torch.finfo(dtype).min)


def plan_step(chunks: list[Chunk], cache: KVCache, slopes: torch.Tensor, dtype: torch.dtype) -> StepPlan:
    """The plan of one step over `chunks`, whose sequences `cache` has prepared (they all have slots),
    with biases in `dtype` from this module's heads' ALiBi `slopes`."""
    device = slopes.device
    singles: list[tuple[int, int, int]] = []
    whole_prompts: dict[int, list[tuple[int, int]]] = {}  # length -> (first row, slot) of each prompt
    multi: list[tuple[Chunk, slice, torch.Tensor]] = []
    offset = 0
    for chunk in chunks:
        if chunk.num_tokens == 1:
            singles.append((offset, cache.slot(chunk.sequence_id), chunk.start_position))
        elif chunk.start_position == 0:
            whole_prompts.setdefault(chunk.num_tokens, []).append((offset, cache.slot(chunk.sequence_id)))
        else:
            rows = slice(offset, offset + chunk.num_tokens)
            end = chunk.start_position + chunk.num_tokens
            multi.append((chunk, rows, causal_alibi_bias(slopes, chunk.start_position, end, dtype)))
        offset += chunk.num_tokens
    prompts = [
        PromptGroup(
            rows=_indices([first for first, _ in members], length, device),
            slots=_indices([slot for _, slot in members], 1, device),
            length=length,
            bias=causal_alibi_bias(slopes, 0, length, dtype),
            slot_ids=torch.tensor([slot for _, slot in members], dtype=torch.long, device=device),
        )
        for length, members in whole_prompts.items()
    ]
    # contiguous: the native attention kernel reads slots and positions as plain arrays, every layer
    rows, slots, positions = (
        torch.tensor(singles, dtype=torch.long, device=device).view(-1, 3).t().contiguous()
    )
    bias = None
    num_slots = kv_length = 0
    if singles:
        num_slots = max(slot for _, slot, _ in singles) + 1
        kv_length = max(position for _, _, position in singles) + 1
        # Each slot sees keys 0..its position; slots outside this batch see nothing (their rows are dropped).
        limit = torch.full((num_slots,), -1, dtype=torch.long, device=device)
        limit[slots] = positions
        bias = one_query_bias(slopes, limit, kv_length, dtype)
    all_rows = not (prompts or multi)  # a decode-only step: the singles are every row, in order
    slots_match_rows = num_slots == len(singles) and all(slot == i for i, (_, slot, _) in enumerate(singles))
    return StepPlan(
        single_rows=None if all_rows else rows,
        single_slots=slots,
        single_positions=positions,
        num_slots=num_slots,
        kv_length=kv_length,
        single_bias=bias,
        slots_match_rows=slots_match_rows,
        prompts=prompts,
        multi=multi,
    )


def _indices(firsts: list[int], length: int, device: torch.device) -> torch.Tensor | slice:
    """Runs of `length` indices from each of `firsts`, in order: a slice when the runs follow one another
    (a step of prompts alone, the usual prefill; consecutive cache slots), which indexes without a copy."""
    if firsts == list(range(firsts[0], firsts[0] + length * len(firsts), length)):
        return slice(firsts[0], firsts[0] + length * len(firsts))
    return (torch.tensor(firsts, device=device)[:, None] + torch.arange(length, device=device)).view(-1)
