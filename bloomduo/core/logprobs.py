"""The one formula for a greedy pick and its log-probability: the row's largest logit, minus the
log-sum-exp of the row.

Workers summarize their slices of the vocabulary (`summarize`) so that only three numbers per row cross
the wire; the gateway joins the slices (`join_slices`) or, for a whole row it already holds,
summarizes that. Both sides compute it the same way, so W = 1..4 agree to float32 rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowSummary(NamedTuple):
    best_logit: torch.Tensor  # float32 [rows]
    best_index: torch.Tensor  # int64 [rows], column of the best logit (the lowest on ties, like argmax)
    logsumexp: torch.Tensor  # float32 [rows]


def summarize(rows: torch.Tensor) -> RowSummary:
    """Best logit, its column and the log-sum-exp of each row of `rows` [n, columns], in any dtype."""
    best, index = rows.max(dim=-1)  # exact in any dtype, so no float32 copy of the rows for it
    best = best.float()
    # One float32 copy, shifted by the max in place: one pass fewer than torch.logsumexp.
    shifted = rows.to(torch.float32, copy=True).sub_(best[:, None])
    return RowSummary(best, index, shifted.exp_().sum(dim=-1).log_().add_(best))


def greedy_pick(row: torch.Tensor) -> tuple[int, float]:
    """(argmax, its log-softmax) of one row of scores."""
    best, index, logsumexp = summarize(row[None])
    return int(index[0]), float(best[0] - logsumexp[0])


def join_slices(
    best_logits: torch.Tensor, best_tokens: torch.Tensor, logsumexps: torch.Tensor
) -> list[tuple[int, float]]:
    """(token, logprob) of each row over the whole vocabulary, from each slice's summary.

    Arguments are [slices, rows], slices in vocabulary order: ties go to the first slice, i.e. the lowest
    token id, as argmax over the whole row would.
    """
    winner = best_logits.argmax(dim=0)
    logprob = best_logits.max(dim=0).values - torch.logsumexp(logsumexps, dim=0)
    chosen = best_tokens.gather(0, winner[None]).squeeze(0)
    return list(zip(chosen.tolist(), logprob.tolist(), strict=True))
