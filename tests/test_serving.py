"""The public API on the running two-shard stack: streaming, concurrency, parameters, errors, health."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bloomduo.client import AsyncClient, BloomduoError, Client
from tests.conftest import running_stack

MIXED_PROMPTS = [
    "北京是中国的首都，上海",
    "Emoji party 🎉🎊🥳 and flags 🇫🇷🇯🇵 then",
    "家族👨‍👩‍👧‍👦和朋友",
    "日本語のテキスト：東京",
]


def test_health_is_serving(tiny_stack) -> None:
    with grpc.insecure_channel(tiny_stack.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "bloomduo.v1.GenerationService"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_info_describes_the_deployment(tiny_stack) -> None:
    with Client(tiny_stack.target) as bloom:
        info = bloom.info()
    assert info.num_shards == 2
    assert info.dtype == "float32"
    assert info.device == "cpu,cpu"
    assert info.worker_kernels == ["eager", "eager"]  # float32 workers keep nn.Linear as it is
    assert info.vocab_size == 1030
    assert info.limits["max_input_tokens"] == 1024
    assert info.limits["max_total_tokens"] == 2048
    assert info.load.serving and len(info.load.worker_cached_sequences) == 2
    # Each rank's cache from the start: 3 layers x 32 slots (--kv-cache-slots) x 6 heads x 128 positions
    # x 8 dims, keys and values, float32; it only grows, and both ranks hold the same shape.
    first, second = info.load.worker_kv_cache_bytes
    assert first == second >= 3 * 32 * 6 * 128 * 8 * 2 * 4


def test_bfloat16_workers_show_the_kernels_they_chose_and_serve(demo_model) -> None:
    """bfloat16 CPU workers time their matmul paths at start (shard_worker/cpu_kernels.py) and all take rank
    0's choice; it reaches the public Info, and the stack serves with it."""
    with running_stack(demo_model(), num_shards=2, dtype="bfloat16") as stack, Client(stack.target) as bloom:
        info = bloom.info()
        result = bloom.generate("Hello there", max_new_tokens=4, ignore_eos=True)
    assert info.dtype == "bfloat16" and len(info.worker_kernels) == 2
    first, second = info.worker_kernels
    assert first.startswith("blocks: ") and "; lm_head: " in first, first
    assert second == first  # rank 0's measured choice, taken by every rank
    assert result.generated_tokens == 4


def test_tokenize_returns_ids_and_count(tiny_stack) -> None:
    with Client(tiny_stack.target) as bloom:
        ids = bloom.tokenize("Hello world")
    assert ids and all(isinstance(i, int) for i in ids)


@pytest.mark.parametrize("prompt", MIXED_PROMPTS)
def test_stream_pieces_join_to_the_final_text(tiny_stack, prompt: str) -> None:
    params = {"max_new_tokens": 40, "do_sample": True, "seed": 7, "temperature": 1.3, "ignore_eos": True}
    with Client(tiny_stack.target) as bloom:
        events = list(bloom.generate_stream(prompt, **params))
        unary = bloom.generate(prompt, **params)
    pieces = [event.token.text for event in events]
    final = events[-1].result
    assert final is not None and all(event.result is None for event in events[:-1])
    assert "".join(pieces) == final.text == unary.text
    assert final.generated_tokens == len(events) == 40
    # A piece never ends inside a character: the decoder holds back incomplete UTF-8.
    assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])
    # The test is only meaningful when some character needed more than one token.
    assert any(piece == "" for piece in pieces) or any(ord(c) > 0x2FFF for c in final.text)


def _generate_alone(target: str, prompt: str, params: dict) -> list[int]:
    with Client(target) as bloom:
        return [t.id for t in bloom.generate(prompt, details=True, **params).tokens]


def test_concurrent_requests_match_the_same_request_alone(tiny_stack) -> None:
    requests = [
        ("Once upon a time", {"max_new_tokens": 12, "ignore_eos": True}),
        ("The weather today is", {"max_new_tokens": 30, "do_sample": True, "seed": 3, "ignore_eos": True}),
        ("北京", {"max_new_tokens": 5, "do_sample": True, "seed": 11, "top_k": 20, "ignore_eos": True}),
        ("A much longer prompt about many things, " * 6, {"max_new_tokens": 20, "ignore_eos": True}),
        ("x", {"max_new_tokens": 25, "do_sample": True, "seed": 5, "top_p": 0.8, "ignore_eos": True}),
        ("Repeat repeat", {"max_new_tokens": 16, "repetition_penalty": 1.5, "ignore_eos": True}),
        (
            "Typical",
            {"max_new_tokens": 16, "do_sample": True, "seed": 9, "typical_p": 0.7, "ignore_eos": True},
        ),
    ]
    alone = [_generate_alone(tiny_stack.target, prompt, params) for prompt, params in requests]

    async def together() -> list[list[int]]:
        async with AsyncClient(tiny_stack.target) as bloom:
            results = await asyncio.gather(
                *(bloom.generate(prompt, details=True, **params) for prompt, params in requests)
            )
        return [[t.id for t in result.tokens] for result in results]

    assert asyncio.run(together()) == alone
    assert [len(ids) for ids in alone] == [params["max_new_tokens"] for _, params in requests]


def test_seed_is_returned_and_reproduces(tiny_stack) -> None:
    with Client(tiny_stack.target) as bloom:
        first = bloom.generate("Seeds", max_new_tokens=10, do_sample=True, ignore_eos=True)
        again = bloom.generate("Seeds", max_new_tokens=10, do_sample=True, seed=first.seed, ignore_eos=True)
    assert first.text == again.text and first.seed == again.seed


def test_stop_sequence_ends_generation(tiny_stack) -> None:
    with Client(tiny_stack.target) as bloom:
        free = bloom.generate("The", max_new_tokens=30, ignore_eos=True)
        stop = free.text[5:8]
        stopped = bloom.generate("The", max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert stopped.finish_reason == "stop_sequence"
    # Generation ends with the token that completes the stop sequence; that token is kept whole.
    assert stop in stopped.text and free.text.startswith(stopped.text)
    assert stopped.generated_tokens < free.generated_tokens


def test_return_full_text_and_truncate(tiny_stack) -> None:
    with Client(tiny_stack.target) as bloom:
        plain = bloom.generate("Hello there", max_new_tokens=4)
        full = bloom.generate("Hello there", max_new_tokens=4, return_full_text=True)
        truncated = bloom.generate(
            "ignored words then Hello there", max_new_tokens=4, truncate=2, details=True
        )
    assert full.text == "Hello there" + plain.text
    assert truncated.prompt_tokens == 2


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", {}, "prompt"),
        ("hi", {"max_new_tokens": 0}, "max_new_tokens"),
        ("hi", {"max_new_tokens": 5000}, "max_new_tokens"),
        ("hi", {"do_sample": True, "temperature": 0.0}, "temperature"),
        ("hi", {"do_sample": True, "temperature": float("nan")}, "temperature"),
        ("hi", {"top_p": 1.5}, "top_p"),
        ("hi", {"typical_p": 0.0}, "typical_p"),
        ("hi", {"repetition_penalty": -1.0}, "repetition_penalty"),
        ("hi", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("word " * 1500, {}, "prompt"),
    ],
)
def test_bad_parameters_are_invalid_argument_naming_the_field(tiny_stack, prompt, params, field) -> None:
    with Client(tiny_stack.target) as bloom:
        with pytest.raises(BloomduoError) as caught:
            bloom.generate(prompt, **params)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in caught.value.message
        # The server keeps serving.
        assert bloom.generate("still here", max_new_tokens=2).generated_tokens == 2


def test_cli_generate_streams_text(tiny_stack) -> None:
    args = ["--target", tiny_stack.target, "--max-new-tokens", "8", "--seed", "1", "--do-sample"]
    streamed = subprocess.run(
        [sys.executable, "-m", "bloomduo", "generate", "Hello", *args],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    unary = subprocess.run(
        [sys.executable, "-m", "bloomduo", "generate", "Hello", *args, "--no-stream"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    with Client(tiny_stack.target) as bloom:
        expected = bloom.generate("Hello", max_new_tokens=8, seed=1, do_sample=True).text
    assert streamed.stdout == unary.stdout == expected + "\n"


def test_cli_health_probe(tiny_stack) -> None:
    from bloomduo.apps.launcher import free_port

    def probe(target: str) -> int:
        command = [sys.executable, "-m", "bloomduo", "health", "--target", target, "--timeout", "1"]
        return subprocess.run(command, capture_output=True, timeout=60).returncode

    assert probe(tiny_stack.target) == 0
    assert probe(f"127.0.0.1:{free_port()}") == 1
