"""The one formula for a greedy pick and its log-probability: the row's largest logit, minus the
log-sum-exp of the row.

Workers summarize their slices of the vocabulary (`summarize`) so that only three numbers per row cross
the wire; the gateway joins the slices (`join_slices`) or, for a whole row it already holds,
summarizes that. Both sides compute it the same way, so W = 1..4 agree to float32 rounding.

Scoring (prompt log-probabilities, top-n alternatives) follows the same split: log_softmax(z)[t] =
z[t] - log(sum(exp(z))), and the sum over the vocabulary is the sum of the slices' sums, so each worker
sends, per scored row, its slice's log-sum-exp, the logit of the row's next token if the slice holds it,
and its slice's top-n (`score_slice`); the gateway adds the sums in log space and merges the top-n
(`join_scores`). No vocabulary row crosses the wire.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import NamedTuple

import torch


class RowSummary(NamedTuple):
    best_logit: torch.Tensor  # float32 [rows]
    best_index: torch.Tensor  # int64 [rows], column of the best logit (the lowest on ties, like argmax)
    logsumexp: torch.Tensor  # float32 [rows]


# On a CPU, rows summarize a few at a time, so the float32 copy stays within this many bytes: a step's rows
# whole (16 rows of a bloom-7b1 slice at W = 2, 8 MB) were most of what a CPU worker's heap grew by while
# serving. Elsewhere all at once: a GPU has the room, and 16 blocks of 1 row were ~80 launches a step.
SUMMARY_BLOCK_BYTES = 1 << 20


def summarize(rows: torch.Tensor) -> RowSummary:
    """Best logit, its column and the log-sum-exp of each row of `rows` [n, columns], in any dtype."""
    best, index = rows.max(dim=-1)  # exact in any dtype, so no float32 copy of the rows for it
    best = best.float()
    logsumexp = torch.empty_like(best)
    step = max(1, SUMMARY_BLOCK_BYTES // (4 * rows.shape[-1]) if rows.device.type == "cpu" else len(rows))
    for start in range(0, rows.shape[0], step):
        block = slice(start, start + step)
        # One float32 copy, shifted by the max in place: one pass fewer than torch.logsumexp.
        shifted = rows[block].to(torch.float32, copy=True).sub_(best[block, None])
        torch.log(shifted.exp_().sum(dim=-1), out=logsumexp[block])
    return RowSummary(best, index, logsumexp.add_(best))


def greedy_pick(row: torch.Tensor) -> tuple[int, float]:
    """(argmax, its log-softmax) of one row of scores."""
    best, index, logsumexp = summarize(row[None])
    return int(index[0]), float(best[0] - logsumexp[0])


def join_slices(
    best_logits: Sequence[Sequence[float]],
    best_tokens: Sequence[Sequence[int]],
    logsumexps: Sequence[Sequence[float]],
) -> list[tuple[int, float]]:
    """(token, logprob) of each row over the whole vocabulary, from each slice's summary.

    Arguments are [slices][rows], slices in vocabulary order: ties go to the first slice, i.e. the lowest
    token id, as argmax over the whole row would. Plain Python on the wire's numbers, summed in float64 and
    rounded to float32 as every other logprob is (one slice: exactly torch's float32 difference): as torch
    ops, a decode step's few rows cost the gateway 0.5-0.7 ms a step, between a GPU's steps (py-spy, H200 and
    a 2-core EPYC alike), against microseconds here.
    """
    per_row = (zip(*per_slice, strict=True) for per_slice in (best_logits, best_tokens, logsumexps))
    joined = []
    for row_best, row_tokens, row_sums in zip(*per_row, strict=True):
        winner = max(range(len(row_best)), key=row_best.__getitem__)  # the first of equal maxima
        top = max(row_sums)
        total = top + math.log(math.fsum(math.exp(value - top) for value in row_sums))
        joined.append((row_tokens[winner], _float32(row_best[winner] - _float32(total))))
    return joined


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


class RepetitionPenalty(NamedTuple):
    """transformers' RepetitionPenaltyLogitsProcessor for one row: the logits of token_ids divided by
    `penalty` where positive, multiplied by it where negative. The gateway's sampler applies it to whole
    rows; for greedy sequences the workers apply it to their slices before they pick."""

    penalty: float = 1.0
    token_ids: Sequence[int] = ()

    def apply(self, row: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """A new row with the penalty applied at token_ids (columns of `row`; repeats allowed: a token is
        penalised once however often it occurs, as every repeat reads the original logit)."""
        seen = row[token_ids]
        penalised = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return row.index_put((token_ids,), penalised)


NO_PENALTY = RepetitionPenalty()


class Scoring(NamedTuple):
    """What one chunk asks to be scored: its row j against next_token_ids[j] (the token that follows
    it), and the top_n best tokens of each scored row; its last row is scored for its top-n alone when
    top_n is set and that row has no next token here (it predicts the token being generated)."""

    next_token_ids: Sequence[int] = ()
    top_n: int = 0

    def rows(self, num_tokens: int) -> list[int]:
        """The scored rows, as offsets into a chunk of num_tokens rows, in order."""
        rows = list(range(len(self.next_token_ids)))
        if self.top_n and len(rows) < num_tokens:
            rows.append(num_tokens - 1)
        return rows


NO_SCORING = Scoring()


class SliceScores(NamedTuple):
    """One slice's scores of some rows: float32 log-sum-exp [rows]; the next token's logit [rows],
    -inf where the slice does not hold it; the best `k` logits [rows, k], best first, and their columns."""

    logsumexp: torch.Tensor
    next_logit: torch.Tensor
    top_logit: torch.Tensor
    top_index: torch.Tensor


def score_slice(rows: torch.Tensor, next_columns: torch.Tensor, k: int) -> SliceScores:
    """Scores of rows [n, columns] of a slice's logits (any dtype); next_columns [n]: each row's next
    token as a column of this slice, -1 where it has none or the slice does not hold it."""
    held = next_columns >= 0
    next_logit = rows.gather(1, next_columns.clamp(min=0)[:, None])[:, 0].float()
    top = rows.topk(min(k, rows.shape[1]), dim=1)
    return SliceScores(
        summarize(rows).logsumexp,  # the greedy path's formula, so both give a row the same log-sum-exp
        next_logit.masked_fill(~held, float("-inf")),
        top.values.float(),
        top.indices,
    )


class RowScore(NamedTuple):
    """A scored row over the whole vocabulary: log_softmax of its next token (None: a row scored for
    its top-n only), and its top-n (token id, log_softmax), best first."""

    logprob: float | None
    top: list[tuple[int, float]]


def join_scores(
    logsumexps: torch.Tensor,
    next_logits: torch.Tensor,
    top_logits: torch.Tensor,
    top_tokens: torch.Tensor,
    rows: Sequence[tuple[bool, int]],
) -> list[RowScore]:
    """Each scored row's RowScore from every slice's scores, slices in vocabulary order.

    rows: (has a next token, top_n) of each scored row, in order. Arguments are [slices, ...]:
    logsumexps per row; next_logits per row that has a next token (-inf where a slice lacks it, so the
    one slice that holds it gives the max); top_logits and top_tokens flat, each row's top_n in turn.
    Ties in the merged top-n go to the lower slice, i.e. the lower token id.
    """
    if not rows:
        return []
    logsumexp = torch.logsumexp(logsumexps, dim=0)
    has_next = torch.tensor([has for has, _ in rows], dtype=torch.bool)
    logprobs = iter((next_logits.max(dim=0).values - logsumexp[has_next]).tolist())
    counts = torch.tensor([n for _, n in rows])
    width = int(counts.max())
    slices = top_logits.shape[0]
    taken = torch.arange(width)[None, :] < counts[:, None]  # [rows, width]: which entries are real
    candidates = top_logits.new_full((slices, len(rows), width), float("-inf"))
    candidates[:, taken] = top_logits
    tokens = torch.zeros((slices, len(rows), width), dtype=torch.long)
    tokens[:, taken] = top_tokens.long()
    candidates = candidates.transpose(0, 1).reshape(len(rows), slices * width)
    tokens = tokens.transpose(0, 1).reshape(len(rows), slices * width)
    best, order = candidates.sort(dim=1, descending=True, stable=True)
    best = (best[:, :width] - logsumexp[:, None]).tolist()
    chosen = tokens.gather(1, order[:, :width]).tolist()
    return [
        RowScore(next(logprobs) if has else None, list(zip(ids[:n], values[:n], strict=True)))
        for (has, n), ids, values in zip(rows, chosen, best, strict=True)
    ]
