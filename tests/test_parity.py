"""Over real gRPC and real processes, the stack gives transformers' tokens and logprobs for any W: the
chosen tokens', the prompt's (decoder_input_details) and the top-n alternatives' (top_n_tokens)."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest

from bloomduo.client import AsyncClient, Client
from tests.conftest import free_port_run, running_stack
from tests.reference import hf_greedy, hf_log_softmax

PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    return",
    "北京是中国的首都，",
    "Bonjour 🌍! Les",
]
NEW_TOKENS = 32
TOP_N = 5
SCORED = {"decoder_input_details": True, "top_n_tokens": TOP_N}


def assert_scores_match_transformers(model_dir, prompt_ids: list[int], result) -> float:
    """Every prompt token's logprob and every position's top-n equal transformers' log_softmax of the
    same sequence within 1e-4; returns the largest difference seen."""
    tokens = result.tokens
    logprobs = hf_log_softmax(model_dir, prompt_ids + [t.id for t in tokens])
    assert [t.id for t in result.prefill] == prompt_ids
    assert result.prefill[0].logprob is None and not result.prefill[0].top_tokens
    got = [t.logprob for t in result.prefill[1:]]
    want = [float(logprobs[i, token]) for i, token in enumerate(prompt_ids[1:])]
    assert got == pytest.approx(want, abs=1e-4)
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    # Position i's alternatives come from row i - 1: prompt tokens 1.., then every generated token.
    positions = [*result.prefill[1:], *tokens]
    for row, token in enumerate(positions):
        best = logprobs[row].topk(TOP_N)
        assert [t.id for t in token.top_tokens] == best.indices.tolist(), row
        top = [t.logprob for t in token.top_tokens]
        assert top == pytest.approx(best.values.tolist(), abs=1e-4), row
        worst = max(worst, *(abs(a - b) for a, b in zip(top, best.values.tolist(), strict=True)))
    return worst


def assert_matches_transformers(target: str, model_dir, concurrent: bool = False) -> float:
    """Greedy tokens and logprobs, and (for the prompts at odd indices) the prompt's logprobs and every
    position's top-n, equal transformers'; returns the largest logprob difference of those scores."""

    async def generate_all() -> list:
        async with AsyncClient(target) as bloom:
            calls = [
                bloom.generate(
                    p, max_new_tokens=NEW_TOKENS, ignore_eos=True, details=True, **(SCORED if i % 2 else {})
                )
                for i, p in enumerate(PROMPTS)
            ]
            if concurrent:
                return await asyncio.gather(*calls)
            return [await call for call in calls]

    results = asyncio.run(generate_all())
    with Client(target) as bloom:
        prompt_ids = [bloom.tokenize(prompt) for prompt in PROMPTS]
    worst = 0.0
    for index, (prompt, ids, result) in enumerate(zip(PROMPTS, prompt_ids, results, strict=True)):
        expected_ids, expected_logprobs = hf_greedy(model_dir, ids, NEW_TOKENS)
        assert result.generated_tokens == NEW_TOKENS
        assert [t.id for t in result.tokens] == expected_ids, prompt
        for token, expected in zip(result.tokens, expected_logprobs, strict=True):
            assert token.logprob == pytest.approx(expected, abs=1e-4), prompt
        if index % 2:
            worst = max(worst, assert_scores_match_transformers(model_dir, ids, result))
            assert "".join(t.text for t in result.prefill) == prompt
        else:
            assert not result.prefill and not any(t.top_tokens for t in result.tokens)
    return worst


@pytest.mark.parametrize(
    ("num_shards", "layout"),
    [
        (1, {}),
        (2, {"prefix": True, "num_files": 3}),
        (3, {"num_files": 2}),
        (4, {"prefix": True}),
    ],
    ids=["W1-one-file", "W2-prefixed-3-files", "W3-2-files", "W4-prefixed"],
)
def test_greedy_matches_transformers(demo_model, num_shards: int, layout: dict) -> None:
    # The tiny preset has 12 heads (not a power of two) and a vocabulary of 1030 rows, which
    # neither 3 nor 4 divides, so the padded-vocabulary path runs too.
    model_dir = demo_model(**layout)
    with running_stack(model_dir, num_shards=num_shards) as stack:
        worst = assert_matches_transformers(stack.target, model_dir)
    print(f"W={num_shards}: max |logprob - transformers log_softmax| of prompt and top-n = {worst:.2e}")


@pytest.mark.parametrize("num_shards", [2, 3])
def test_greedy_with_a_repetition_penalty_matches_transformers(demo_model, num_shards: int) -> None:
    """The workers apply a greedy sequence's penalty to their slices (no row crosses the wire): the tokens
    and logprobs are transformers' with its RepetitionPenaltyLogitsProcessor, penalised tokens in every slice
    (at W = 3 the vocabulary is padded too)."""
    model_dir = demo_model()
    cases = [(PROMPTS[0], 1.3), (PROMPTS[1], 0.8), (PROMPTS[2], 2.0)]

    async def generate_all(target: str) -> list:
        async with AsyncClient(target) as bloom:
            return await asyncio.gather(
                *(
                    bloom.generate(
                        prompt, max_new_tokens=16, ignore_eos=True, details=True, repetition_penalty=penalty
                    )
                    for prompt, penalty in cases
                )
            )

    with running_stack(model_dir, num_shards=num_shards) as stack:
        results = asyncio.run(generate_all(stack.target))
        with Client(stack.target) as bloom:
            prompt_ids = [bloom.tokenize(prompt) for prompt, _ in cases]
    for (prompt, penalty), ids, result in zip(cases, prompt_ids, results, strict=True):
        expected_ids, expected_logprobs = hf_greedy(model_dir, ids, 16, repetition_penalty=penalty)
        assert [t.id for t in result.tokens] == expected_ids, (prompt, penalty)
        assert [t.logprob for t in result.tokens] == pytest.approx(expected_logprobs, abs=1e-4), prompt
    # the penalty changed something: without it the last prompt continues otherwise
    assert expected_ids != hf_greedy(model_dir, prompt_ids[-1], 16)[0]


def test_chunked_prefill_and_mixed_batches_match_transformers(demo_model) -> None:
    # A 7-token prefill budget cuts every prompt into chunks that share steps with other decodes.
    model_dir = demo_model()
    with running_stack(model_dir, num_shards=2, gateway_args=("--max-batch-prefill-tokens", "7")) as stack:
        assert_matches_transformers(stack.target, model_dir, concurrent=True)


def test_a_scored_prompt_shares_no_prefix_and_others_still_do(demo_model) -> None:
    # While `base` runs, `scored` starts with base's prompt: it must compute (and score) every row rather
    # than copy them, while `plain`, with the same prompt, copies the prefix (the metric counts it).
    model_dir = demo_model()
    base = "The quick brown fox jumps over the lazy dog and runs far away"
    longer = base + " into the forest"

    async def run(target: str) -> list:
        async with AsyncClient(target) as bloom:
            # Long enough to outlast the two requests below; leaving the stream cancels it.
            async for _ in bloom.generate_stream(base, max_new_tokens=1500, ignore_eos=True):
                scored = await bloom.generate(longer, max_new_tokens=4, details=True, **SCORED)
                plain = await bloom.generate(longer, max_new_tokens=4, details=True)
                return [scored, plain]
        raise AssertionError("base gave no token")

    metrics_port = free_port_run(3)  # the gateway's, then each worker's
    with running_stack(model_dir, num_shards=2, metrics_port=metrics_port) as stack:
        scored, plain = asyncio.run(run(stack.target))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as scrape:
            shared = re.search(r"^bloomduo_prefix_tokens_shared_total (\S+)$", scrape.read().decode(), re.M)
        with Client(stack.target) as bloom:
            ids, base_ids = bloom.tokenize(longer), bloom.tokenize(base)
    assert ids[: len(base_ids)] == base_ids
    # `plain` copied at least base's prompt; `scored` copied nothing (else twice that would be counted).
    assert len(base_ids) <= float(shared.group(1)) < 2 * len(base_ids)
    assert_scores_match_transformers(model_dir, ids, scored)
    assert [t.id for t in plain.tokens] == [t.id for t in scored.tokens] == hf_greedy(model_dir, ids, 4)[0]


def test_worker_holds_its_share_of_the_weights(tiny_stack, demo_model) -> None:
    import grpc

    from bloomduo.core.checkpoint import Checkpoint
    from bloomduo.v1 import shard_pb2, shard_pb2_grpc

    checkpoint = Checkpoint(demo_model())
    config = checkpoint.config
    block_bytes = sum(
        4 * torch_numel(checkpoint.shape(name)) for name in checkpoint.names() if name.startswith("h.")
    )
    head_bytes = 4 * config.vocab_size * config.hidden_size
    ln_f_bytes = 4 * 2 * config.hidden_size
    full = block_bytes + head_bytes + ln_f_bytes
    for shard_target in tiny_stack.shard_targets:
        with grpc.insecure_channel(shard_target) as channel:
            info = shard_pb2_grpc.ShardServiceStub(channel).Info(shard_pb2.ShardInfoRequest(), timeout=5)
        assert info.world_size == 2 and info.ready
        # Half of every split matrix, plus the replicated LayerNorms and the once-counted biases.
        assert 0.45 * full < info.parameter_bytes < 0.55 * full
        assert info.local_heads == config.n_head // 2
        assert info.vocab_end - info.vocab_start == (config.vocab_size + 1) // 2


def torch_numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
