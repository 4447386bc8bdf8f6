"""Over real gRPC and real processes, the stack gives transformers' tokens and logprobs for any W."""

from __future__ import annotations

import asyncio

import pytest

from bloomduo.client import AsyncClient, Client
from tests.conftest import running_stack
from tests.reference import hf_greedy

PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    return",
    "北京是中国的首都，",
    "Bonjour 🌍! Les",
]
NEW_TOKENS = 32


def assert_matches_transformers(target: str, model_dir, concurrent: bool = False) -> None:
    async def generate_all() -> list:
        async with AsyncClient(target) as bloom:
            calls = [
                bloom.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True, details=True) for p in PROMPTS
            ]
            if concurrent:
                return await asyncio.gather(*calls)
            return [await call for call in calls]

    results = asyncio.run(generate_all())
    with Client(target) as bloom:
        prompt_ids = [bloom.tokenize(prompt) for prompt in PROMPTS]
    for prompt, ids, result in zip(PROMPTS, prompt_ids, results, strict=True):
        expected_ids, expected_logprobs = hf_greedy(model_dir, ids, NEW_TOKENS)
        assert result.generated_tokens == NEW_TOKENS
        assert [t.id for t in result.tokens] == expected_ids, prompt
        for token, expected in zip(result.tokens, expected_logprobs, strict=True):
            assert token.logprob == pytest.approx(expected, abs=1e-4), prompt


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
        assert_matches_transformers(stack.target, model_dir)


def test_chunked_prefill_and_mixed_batches_match_transformers(demo_model) -> None:
    # A 7-token prefill budget cuts every prompt into chunks that share steps with other decodes.
    model_dir = demo_model()
    with running_stack(model_dir, num_shards=2, gateway_args=("--max-batch-prefill-tokens", "7")) as stack:
        assert_matches_transformers(stack.target, model_dir, concurrent=True)


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
