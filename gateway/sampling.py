"""Choosing each request's next token from the logits of its last position.

The stages and their semantics are those of transformers' logits processors, in the order
text-generation-inference applies them: repetition penalty, then (only when sampling) temperature,
top-k, top-p and typical-p, then a seeded multinomial draw; greedy decoding takes the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bloomduo.core.logprobs import RepetitionPenalty, greedy_pick


@dataclass(frozen=True)
class SamplingParams:
    """Neutral values (1.0, or 0 for top_k) switch a stage off.

    Trusted as they come: the request validator (request.py) has kept every value within its bounds.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0


class Sampler:
    """The token chooser of one request.

    It owns its random generator, so a seed gives the same tokens whatever else is in the batch.
    Filtering stages shrink the set of candidate tokens as they go, so after top-k the later
    stages and the draw work on k values rather than on the whole vocabulary.
    """

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, previous_token_ids: torch.Tensor) -> tuple[int, float]:
        """Next token and its log-probability under the distribution it was chosen from.

        logits: float32 [vocab] of the last position; previous_token_ids: int64, prompt and
        generated tokens so far.
        """
        token_ids, scores = self.candidates(logits, previous_token_ids)
        if self.params.do_sample:
            logprobs = torch.log_softmax(scores, dim=-1)
            index = self._draw(logprobs.exp())
            logprob = logprobs[index]
        else:
            index, logprob = greedy_pick(scores)
        token_id = index if token_ids is None else int(token_ids[index])
        return token_id, float(logprob)

    def _draw(self, probs: torch.Tensor) -> int:
        """An index drawn with probability probs[i] / probs.sum(): one uniform number against the float64
        running sum. torch.multinomial took 6.5 ms over BLOOM's 250880 tokens on one core, this ~0.6."""
        cumulative = probs.cumsum(dim=0, dtype=torch.float64)
        point = torch.rand((), generator=self.generator, dtype=torch.float64) * cumulative[-1]
        # The first running sum past the point: a token of probability 0 never owns a point.
        return min(int(torch.searchsorted(cumulative, point, right=True)), probs.numel() - 1)

    def candidates(
        self, logits: torch.Tensor, previous_token_ids: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(token ids, their processed scores): the tokens the filters leave, and what transformers'
        processors and warpers make of their logits. Token ids None means the whole vocabulary, in order.
        """
        params = self.params
        scores = logits
        if params.repetition_penalty != 1.0 and previous_token_ids.numel():
            scores = RepetitionPenalty(params.repetition_penalty).apply(logits, previous_token_ids)
        if not params.do_sample:
            return None, scores

        token_ids: torch.Tensor | None = None
        if params.temperature != 1.0:
            scores = scores / params.temperature
        if 0 < params.top_k < scores.numel():
            # Everything that ties with the k-th value stays, as in TopKLogitsWarper.
            kth_value = torch.topk(scores, params.top_k).values[-1]
            token_ids, scores = _select(token_ids, scores, torch.nonzero(scores >= kth_value).squeeze(1))
        if params.top_p < 1.0:
            token_ids, scores = _select(token_ids, scores, _top_p_indices(scores, params.top_p))
        if params.typical_p < 1.0:
            token_ids, scores = _select(token_ids, scores, _typical_indices(scores, params.typical_p))
        return token_ids, scores


def _select(
    token_ids: torch.Tensor | None, scores: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return (index if token_ids is None else token_ids[index]), scores[index]


def _top_p_indices(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Indices TopPLogitsWarper keeps: the likeliest tokens, up to the one where their mass reaches top_p."""
    return _mass_prefix(scores, scores.softmax(dim=-1), top_p, largest=True)


def _typical_indices(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Indices TypicalLogitsWarper keeps: tokens whose surprise is closest to the entropy, up to `mass`."""
    logprobs = torch.log_softmax(scores, dim=-1)
    probs = logprobs.exp()
    entropy = -(logprobs * probs).nansum()
    distance = (-logprobs - entropy).abs()
    kept = _mass_prefix(distance, probs, mass, largest=False)
    # Tokens as close to the entropy as the last one kept stay too, as in TypicalLogitsWarper.
    return torch.nonzero(distance <= distance[kept[-1]]).squeeze(1)


# Candidates examined first by _mass_prefix; most nuclei are far smaller.
_FIRST_PREFIX = 256
# The digits, most significant first, of a key's 32-bit order code that _mass_prefix_by_digits counts by.
_DIGITS = ((20, 12), (8, 12), (0, 8))  # (shift, bits)


def _mass_prefix(keys: torch.Tensor, probs: torch.Tensor, mass: float, *, largest: bool) -> torch.Tensor:
    """Indices of the tokens in key order up to and including the first at which probs add up to `mass`;
    the last index is that boundary token (typical-p reads it).

    transformers sorts the whole vocabulary for this (25 ms for 250880 entries on one CPU core); a top-k
    of a few hundred (0.6 ms) usually holds the answer. A flat distribution's nucleus holds a large part
    of the vocabulary: then the mass is counted by digits of the keys instead (_mass_prefix_by_digits).
    """
    # A float32 softmax over 250880 entries can be off by 2e-5 in total mass, enough to move the
    # boundary of a large nucleus; comparing with the float64 sum of the same values removes that.
    target = mass * probs.sum(dtype=torch.float64)
    size = min(_FIRST_PREFIX, keys.numel())
    order = torch.topk(keys, size, largest=largest).indices
    cumulative = probs[order].cumsum(dim=-1, dtype=torch.float64)
    if cumulative[-1] >= target or size == keys.numel():
        return order[: min(int((cumulative < target).sum()) + 1, size)]
    return _mass_prefix_by_digits(keys, probs, target, largest=largest)


def _order_codes(keys: torch.Tensor, *, largest: bool) -> torch.Tensor:
    """int32 codes whose bits, read unsigned, sort as the float32 keys do in the prefix's order."""
    bits = (keys + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0, equal keys get equal bits
    # IEEE floats sort as sign-magnitude integers: flipping a negative one's magnitude gives two's
    # complement order; flipping the sign bit then gives unsigned order.
    codes = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (~codes if largest else codes) ^ -(2**31)


def _mass_prefix_by_digits(
    keys: torch.Tensor, probs: torch.Tensor, target: torch.Tensor, *, largest: bool
) -> torch.Tensor:
    """_mass_prefix's answer in at most three counting passes, whatever the vocabulary's length or the
    spread of its keys (~3 ms at 250880 entries, where growing top-ks and the sort they end in took 38).

    Each key has a 32-bit code in prefix order. The mass of each value of its top 12 bits gives the value
    where the running sum reaches `target`; its tokens are counted again by the next 12 bits, then the last
    8, until few tokens are left or only one key (a random checkpoint ties ~249880 logits at 0). Sorting
    those gives the boundary token; the answer is every key before it, then the tokens of its key up to it
    in vocabulary order, as a stable sort has them. No later stage depends on the order of candidates.
    """
    codes = _order_codes(keys, largest=largest)
    mass = probs.double()
    pool = None  # the whole vocabulary, then the tokens of the boundary's digits so far
    pool_codes = codes
    before = torch.zeros((), dtype=torch.float64)
    for shift, width in _DIGITS:
        if pool is not None and (pool.numel() <= _FIRST_PREFIX or bool(pool_codes.min() == pool_codes.max())):
            break
        digits = (pool_codes >> shift) & ((1 << width) - 1)
        running = before + torch.bincount(
            digits, weights=mass if pool is None else mass[pool], minlength=1 << width
        ).cumsum(dim=0)
        edge = min(int(torch.searchsorted(running, target)), (1 << width) - 1)
        before = running[edge - 1] if edge else before
        in_edge = torch.nonzero(digits == edge).squeeze(1)
        pool, pool_codes = (in_edge if pool is None else pool[in_edge]), pool_codes[in_edge]
    one_key = bool(pool_codes.min() == pool_codes.max())
    if not one_key:  # few tokens; one key's are in vocabulary order already
        # They share the top digit, sign bit included: signed order is the unsigned one.
        pool = pool[torch.sort(pool_codes, stable=True).indices]
    cumulative = before + mass[pool].cumsum(dim=-1)
    boundary = min(int((cumulative < target).sum()), pool.numel() - 1)
    key = keys[pool[boundary]]
    # Every token of the boundary's key is in the pool (equal keys, equal codes), in vocabulary order.
    tied = pool[: boundary + 1] if one_key else pool[: boundary + 1][keys[pool[: boundary + 1]] == key]
    better = torch.nonzero(keys > key if largest else keys < key).squeeze(1)
    return torch.cat([better, tied])


def sample_batch(
    samplers: Sequence[Sampler], logits: torch.Tensor, previous: Sequence[Sequence[int]]
) -> list[tuple[int, float]]:
    """(token id, logprob) for each row of logits [batch, vocab], row i chosen by samplers[i].

    Greedy rows never come here: the workers pick those from their vocabulary slices.
    """
    return [
        sampler(row, _previous_ids(sampler, ids))
        for sampler, row, ids in zip(samplers, logits, previous, strict=True)
    ]


_NO_TOKENS = torch.empty(0, dtype=torch.long)


def _previous_ids(sampler: Sampler, ids: Sequence[int]) -> torch.Tensor:
    # Only the repetition penalty reads them: a 2000-token list takes 0.2 ms to convert, under the GIL.
    return torch.tensor(ids, dtype=torch.long) if sampler.params.repetition_penalty != 1.0 else _NO_TOKENS
