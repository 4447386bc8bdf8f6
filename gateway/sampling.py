"""Choosing each request's next token from the logits of its last position.

The stages and their semantics are those of transformers' logits processors, in the order
text-generation-inference applies them: repetition penalty, then (only when sampling) temperature,
top-k, top-p and typical-p, then a seeded multinomial draw; greedy decoding takes the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bloomduo.core.logprobs import greedy_pick


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

    @property
    def is_plain_greedy(self) -> bool:
        """The argmax of the raw logits: the workers pick it from their slices, no row crosses the wire."""
        return not self.do_sample and self.repetition_penalty == 1.0


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
            index = int(torch.multinomial(logprobs.exp(), 1, generator=self.generator))
            logprob = logprobs[index]
        else:
            index, logprob = greedy_pick(scores)
        token_id = index if token_ids is None else int(token_ids[index])
        return token_id, float(logprob)

    def candidates(
        self, logits: torch.Tensor, previous_token_ids: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(token ids, their processed scores): the tokens the filters leave, and what transformers'
        processors and warpers make of their logits. Token ids None means the whole vocabulary, in order.
        """
        params = self.params
        scores = logits
        if params.repetition_penalty != 1.0 and previous_token_ids.numel():
            # Repeated ids read the original logits, so a token is penalised once however often it occurs.
            seen = logits[previous_token_ids]
            penalised = torch.where(
                seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty
            )
            scores = logits.index_put((previous_token_ids,), penalised)
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


def _mass_prefix(keys: torch.Tensor, probs: torch.Tensor, mass: float, *, largest: bool) -> torch.Tensor:
    """Indices of the tokens in key order up to and including the first at which probs add up to `mass`.

    All of them if the mass is never reached. transformers sorts the whole vocabulary for this (about
    16 ms for 250880 entries on one CPU core); a top-k of a few hundred (0.6 ms) usually holds the
    answer, and it grows until it does.
    """
    # A float32 softmax over 250880 entries can be off by 2e-5 in total mass, enough to move the
    # boundary of a large nucleus; normalising by the float64 sum of the same values removes that.
    total = probs.sum(dtype=torch.float64)
    size = min(_FIRST_PREFIX, keys.numel())
    while True:
        order = torch.topk(keys, size, largest=largest).indices
        cumulative = probs[order].cumsum(dim=-1, dtype=torch.float64) / total
        if cumulative[-1] >= mass or size == keys.numel():
            return order[: min(int((cumulative < mass).sum()) + 1, size)]
        # Past a quarter of the vocabulary a top-k costs about as much as sorting all of it.
        size = 8 * size if 8 * size <= keys.numel() // 4 else keys.numel()


def sample_batch(
    samplers: Sequence[Sampler], logits: torch.Tensor, previous: Sequence[Sequence[int]]
) -> list[tuple[int, float]]:
    """(token id, logprob) for each row of logits [batch, vocab], row i chosen by samplers[i].

    Plain greedy rows never come here: the workers pick those from their vocabulary slices.
    """
    return [
        sampler(row, torch.tensor(ids, dtype=torch.long))
        for sampler, row, ids in zip(samplers, logits, previous, strict=True)
    ]
