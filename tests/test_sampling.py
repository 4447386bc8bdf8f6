"""The sampler against transformers' processors and warpers, and its seeding and filtering guarantees."""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from bloomduo.gateway.sampling import Sampler, SamplingParams, sample_batch

VOCAB = 1000
EPS32 = torch.finfo(torch.float32).eps


def processed_scores(params: SamplingParams, logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """The sampler's candidates over the whole vocabulary, -inf where a filter removed the token: what
    transformers' processors and warpers return."""
    token_ids, scores = Sampler(params).candidates(logits, previous)
    if token_ids is None:
        return scores
    full = torch.full_like(logits, float("-inf"))
    full[token_ids] = scores
    return full


def logprob_tolerance(scores: torch.Tensor) -> float:
    """How far two float32 log-softmaxes of the same finite scores may differ: a few ulps of the
    log-sum-exp they subtract, and the rounding of its sum, which grows with the log of the terms summed."""
    finite = scores[torch.isfinite(scores)]
    return 4 * EPS32 * (abs(float(torch.logsumexp(finite, -1))) + math.log2(finite.numel()))


def reference_scores(params: SamplingParams, logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """What transformers' generate() applies for these parameters, in its order."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.do_sample:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        if params.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(params.typical_p))
    return processors(previous.unsqueeze(0), logits.unsqueeze(0).clone())[0]


def random_case(seed: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=generator) * scale
    # Repeated ids on purpose: a token is penalised once however often it occurs.
    previous = torch.randint(0, VOCAB, (60,), generator=generator)
    return logits, previous


def assert_same_scores(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs))
    kept = torch.isfinite(theirs)
    # The same float32 operations on both sides; a few ulps of the largest score allow for another order.
    torch.testing.assert_close(
        ours[kept], theirs[kept], rtol=0, atol=4 * EPS32 * float(theirs[kept].abs().max())
    )


COMBOS = list(
    itertools.product(
        [1.0, 0.7, 1.6],  # temperature
        [0, 1, 7, 120, VOCAB + 5],  # top_k
        [1.0, 0.95, 0.6, 0.05],  # top_p
        [1.0, 0.9, 0.3],  # typical_p
        [1.0, 1.3, 0.8],  # repetition_penalty
    )
)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_sampling_scores_equal_transformers(scale: float) -> None:
    for case, (temperature, top_k, top_p, typical_p, penalty) in enumerate(COMBOS):
        params = SamplingParams(
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            typical_p=typical_p,
            repetition_penalty=penalty,
        )
        logits, previous = random_case(case, scale)
        ours = processed_scores(params, logits, previous)
        assert_same_scores(ours, reference_scores(params, logits, previous))


@pytest.mark.parametrize("penalty", [1.0, 1.2, 0.5])
def test_greedy_scores_equal_transformers(penalty: float) -> None:
    # Warpers belong to sampling: greedy ignores them, as generate() does.
    params = SamplingParams(repetition_penalty=penalty, temperature=0.3, top_k=3, top_p=0.5)
    for case in range(20):
        logits, previous = random_case(case, 3.0)
        ours = processed_scores(params, logits, previous)
        assert torch.equal(ours, reference_scores(params, logits, previous))


def test_top_k_keeps_ties_with_the_kth_value() -> None:
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.5])
    params = SamplingParams(do_sample=True, top_k=2)
    ours = processed_scores(params, logits, torch.tensor([], dtype=torch.long))
    assert_same_scores(ours, reference_scores(params, logits, torch.tensor([], dtype=torch.long)))
    assert torch.isfinite(ours).sum() == 4


def test_top_p_removes_tokens_whose_mass_equals_the_threshold() -> None:
    # Four equal probabilities of exactly 0.25: the cumulative mass hits 1 - top_p exactly.
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    params = SamplingParams(do_sample=True, top_p=0.5)
    ours = processed_scores(params, logits, torch.tensor([], dtype=torch.long))
    theirs = reference_scores(params, logits, torch.tensor([], dtype=torch.long))
    # Which of the tied tokens stay is up to the sort; how many is not.
    assert torch.isfinite(ours).sum() == torch.isfinite(theirs).sum() == 2


BLOOM_VOCAB = 250880


# Cases where transformers' TypicalLogitsWarper keeps a few tokens more or fewer than exact arithmetic.
# Scale 1: a nucleus of most of the vocabulary (163690 tokens at top-p 0.9), counted by digits of the keys.
@pytest.mark.parametrize(("seed", "scale"), [(4, 3.0), (0, 4.0), (6, 2.0), (1, 1.0)])
def test_nucleus_boundary_is_exact_at_bloom_vocabulary_size(seed: int, scale: float) -> None:
    # Over 250880 entries a float32 softmax is off by up to 2e-5 in total mass, which moves the
    # boundary of a large nucleus; the sampler's boundary must be the one of float64 arithmetic.
    logits = torch.randn(BLOOM_VOCAB, generator=torch.Generator().manual_seed(seed)) * scale
    none = torch.tensor([], dtype=torch.long)
    probs = torch.softmax(logits.double(), -1)

    top_p = 0.9
    descending = torch.sort(probs, descending=True).values
    expected = int((descending.cumsum(0) < top_p).sum()) + 1
    kept = torch.isfinite(processed_scores(SamplingParams(do_sample=True, top_p=top_p), logits, none))
    assert int(kept.sum()) == expected

    typical_p = 0.95
    logprobs = torch.log_softmax(logits, -1)
    distance = (-logprobs + (logprobs * logprobs.exp()).sum()).abs()
    by_distance = torch.sort(distance)
    last = int((probs[by_distance.indices].cumsum(0) < typical_p).sum())
    expected_kept = distance <= by_distance.values[last]
    kept = torch.isfinite(processed_scores(SamplingParams(do_sample=True, typical_p=typical_p), logits, none))
    assert torch.equal(kept, expected_kept)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_a_large_nucleus_with_masked_tokens_matches_transformers(top_p: float) -> None:
    """A flat distribution with tokens masked to -inf (as a logit bias does), whose distance from the first
    key is infinite: counting by digits still gives transformers' set."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(BLOOM_VOCAB, generator=generator)
    logits[torch.randperm(BLOOM_VOCAB, generator=generator)[:50000]] = float("-inf")
    params = SamplingParams(do_sample=True, top_p=top_p)
    none = torch.tensor([], dtype=torch.long)
    ours = torch.isfinite(processed_scores(params, logits, none))
    theirs = torch.isfinite(reference_scores(params, logits, none))
    assert int(ours.sum()) > 256  # past the first top-k: counted by digits
    # float32 (transformers) against float64 sums: at most a token or two apart at the boundary
    assert int((ours != theirs).sum()) <= 2


def test_a_nucleus_inside_tied_logits_takes_them_in_vocabulary_order() -> None:
    """A random checkpoint ties most logits (at 0): the boundary falls inside the tie, whose tokens a stable
    sort keeps in vocabulary order; and a vocabulary of one key all through."""
    logits = torch.zeros(BLOOM_VOCAB)
    logits[:3] = torch.tensor([9.0, 8.0, 7.0])  # most of the mass, then 250877 equal ones
    none = torch.tensor([], dtype=torch.long)
    probs = torch.softmax(logits.double(), -1)
    for top_p in (0.99, 0.999):
        needed = math.ceil((top_p - float(probs[:3].sum())) / float(probs[3]))
        kept = torch.isfinite(processed_scores(SamplingParams(do_sample=True, top_p=top_p), logits, none))
        assert kept[:3].all() and int(kept.sum()) == 3 + needed
        assert kept[3 : 3 + needed].all()  # the first of the tied tokens, in vocabulary order
    flat = processed_scores(SamplingParams(do_sample=True, top_p=0.5), torch.zeros(BLOOM_VOCAB), none)
    assert torch.isfinite(flat).nonzero().squeeze(1).tolist() == list(range(BLOOM_VOCAB // 2))


@pytest.mark.parametrize("top_p", [0.2, 0.9, 0.999])
def test_a_nucleus_among_spread_logits_and_a_huge_tie_is_the_sorted_one(top_p: float) -> None:
    """The demo checkpoint's rows: a thousand logits spread over several units, one a hair from zero, and
    every other token tied at exactly 0 (some -0.0). Equal-width ranges of keys put the near-zero token in
    the tie's range; whatever the counting, the set is the stable sort's: every better key, then the tied
    tokens in vocabulary order."""
    generator = torch.Generator().manual_seed(9)
    logits = torch.zeros(BLOOM_VOCAB)
    spread = torch.randperm(BLOOM_VOCAB, generator=generator)[:1000]
    logits[spread] = torch.randn(1000, generator=generator) * 2
    logits[spread[:2]] = torch.tensor([1e-4, -1e-4])
    logits[spread[2:40]] = -0.0
    none = torch.tensor([], dtype=torch.long)
    kept = torch.isfinite(processed_scores(SamplingParams(do_sample=True, top_p=top_p), logits, none))

    probs = torch.softmax(logits, -1)
    order = torch.sort(logits, descending=True, stable=True).indices
    target = top_p * probs.sum(dtype=torch.float64)
    boundary = int((probs[order].cumsum(0, dtype=torch.float64) < target).sum())
    expected = torch.zeros(BLOOM_VOCAB, dtype=torch.bool)
    expected[order[: boundary + 1]] = True
    # Sums in another order may put the boundary one token later or earlier inside the tie.
    assert abs(int(kept.sum()) - int(expected.sum())) <= 1
    key = logits[order[boundary]]
    assert torch.equal(kept[logits != key], expected[logits != key])
    tied_kept = kept[logits == key]
    assert tied_kept[: int(tied_kept.sum())].all()  # the first of the tied tokens, in vocabulary order


def test_greedy_logprob_is_log_softmax_of_raw_logits() -> None:
    sampler = Sampler(SamplingParams())
    for case in range(20):
        logits, previous = random_case(case, 5.0)
        token, logprob = sampler(logits, previous)
        assert token == int(torch.argmax(logits))
        expected = float(torch.log_softmax(logits, -1)[token])
        assert logprob == pytest.approx(expected, abs=logprob_tolerance(logits))


def test_greedy_with_penalty_takes_argmax_of_penalised_scores() -> None:
    params = SamplingParams(repetition_penalty=1.5)
    for case in range(20):
        logits, previous = random_case(case, 2.0)
        penalised = reference_scores(params, logits, previous)
        token, logprob = Sampler(params)(logits, previous)
        assert token == int(torch.argmax(penalised))
        expected = float(torch.log_softmax(penalised, -1)[token])
        assert logprob == pytest.approx(expected, abs=logprob_tolerance(penalised))


def test_sampled_logprob_is_from_the_processed_distribution() -> None:
    params = SamplingParams(
        do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=3
    )
    sampler = Sampler(params)
    for case in range(20):
        logits, previous = random_case(case, 2.0)
        token, logprob = sampler(logits, previous)
        reference = reference_scores(params, logits, previous)
        expected = float(torch.log_softmax(reference, -1)[token])
        assert logprob == pytest.approx(expected, abs=logprob_tolerance(reference))


def test_sampler_leaves_the_logits_untouched() -> None:
    logits, previous = random_case(0, 2.0)
    before = logits.clone()
    params = SamplingParams(do_sample=True, repetition_penalty=1.3, temperature=0.5, top_p=0.8)
    Sampler(params)(logits, previous)
    assert torch.equal(logits, before)


def generate(sampler: Sampler, steps: int, prompt: list[int], case: int = 0) -> list[int]:
    """A toy autoregressive loop: logits depend on the step, previous ids grow."""
    ids = list(prompt)
    for step in range(steps):
        logits, _ = random_case(case * 1000 + step, 1.0)
        token, _ = sampler(logits, torch.tensor(ids, dtype=torch.long))
        ids.append(token)
    return ids[len(prompt) :]


SAMPLING = SamplingParams(do_sample=True, temperature=0.9, top_k=200, top_p=0.95, repetition_penalty=1.1)


def test_same_seed_gives_same_tokens() -> None:
    params = dataclasses.replace(SAMPLING, seed=1234)
    assert generate(Sampler(params), 40, [5, 6, 7]) == generate(Sampler(params), 40, [5, 6, 7])


def test_different_seeds_give_different_tokens() -> None:
    runs = {tuple(generate(Sampler(dataclasses.replace(SAMPLING, seed=seed)), 40, [5])) for seed in range(4)}
    assert len(runs) == 4


def test_tokens_do_not_depend_on_other_requests() -> None:
    params = dataclasses.replace(SAMPLING, seed=77)
    alone = generate(Sampler(params), 30, [1])

    ours, other = Sampler(params), Sampler(SamplingParams(do_sample=True, seed=78))
    ids = [1]
    for step in range(30):
        logits, _ = random_case(step, 1.0)
        other(logits, torch.tensor([2, 3]))
        token, _ = ours(logits, torch.tensor(ids))
        ids.append(token)
    assert ids[1:] == alone


def test_top_k_one_is_greedy() -> None:
    for case in range(30):
        logits, previous = random_case(case, 1.0)
        greedy, _ = Sampler(SamplingParams(repetition_penalty=1.2))(logits, previous)
        top1, logprob = Sampler(SamplingParams(do_sample=True, top_k=1, repetition_penalty=1.2, seed=case))(
            logits, previous
        )
        assert top1 == greedy
        assert logprob == 0.0


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, top_k=10),
        SamplingParams(do_sample=True, top_p=0.5),
        SamplingParams(do_sample=True, top_k=20, top_p=0.7, temperature=2.0),
        SamplingParams(do_sample=True, typical_p=0.5),
        SamplingParams(do_sample=True, top_p=0.8, typical_p=0.9, repetition_penalty=1.4),
    ],
)
def test_sampled_tokens_stay_in_the_allowed_set(params: SamplingParams) -> None:
    sampler = Sampler(params)
    for case in range(10):
        logits, previous = random_case(case, 1.0)
        allowed = torch.isfinite(reference_scores(params, logits, previous))
        if params.top_k:
            assert allowed.sum() <= params.top_k
        for _ in range(30):
            token, _ = sampler(logits, previous)
            assert allowed[token]


def test_draws_follow_the_processed_distribution() -> None:
    # Catches a candidate mapped back to the wrong vocabulary id after filtering reorders candidates.
    logits = torch.tensor([0.1, 2.0, -1.0, 1.5, 0.7, 1.0, -3.0, 0.2])
    params = SamplingParams(do_sample=True, top_k=6, top_p=0.9, seed=11)
    expected = torch.softmax(reference_scores(params, logits, torch.tensor([], dtype=torch.long)), -1)
    sampler = Sampler(params)
    draws = 8000
    counts = torch.zeros_like(logits)
    for _ in range(draws):
        token, _ = sampler(logits, torch.tensor([], dtype=torch.long))
        counts[token] += 1
    # Five standard deviations of a frequency over `draws` draws at its widest (p = 1/2).
    torch.testing.assert_close(counts / draws, expected, rtol=0, atol=5 * math.sqrt(0.25 / draws))


def test_sample_batch_matches_one_by_one() -> None:
    params = [
        SamplingParams(do_sample=True, seed=0, top_k=40),
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(do_sample=True, seed=2, top_k=40),
        SamplingParams(),
    ]
    logits = torch.stack([random_case(i, 1.0)[0] for i in range(len(params))])
    previous = [random_case(i, 1.0)[1] for i in range(len(params))]
    batched = sample_batch([Sampler(p) for p in params], logits, [ids.tolist() for ids in previous])
    alone = [Sampler(p)(row, prev) for p, row, prev in zip(params, logits, previous, strict=True)]
    # Each row goes through its own sampler, the same computation as alone.
    assert batched == alone


def test_the_sampler_timing_script_prints_a_row_per_kind_of_logits() -> None:
    """scripts/sampler_timing.py gives the README's per-row figures: it must keep running."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "sampler_timing.py"
    done = subprocess.run(
        [sys.executable, str(script), "--vocab", "4000", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    table = [line for line in done.stdout.splitlines() if line.startswith("| ") and "logits" not in line]
    assert len(table) == 4
    for line in table:
        cells = [cell.strip() for cell in line.strip("|").split("|")][1:]
        assert len(cells) == 4 and all(float(cell) > 0 for cell in cells), line
