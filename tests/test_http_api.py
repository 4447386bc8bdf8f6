"""The HTTP front (OpenAI's and TGI's APIs) on the real two-shard stack, through the real, unmodified
clients people point at it: the openai SDK (sync and async) and huggingface_hub's InferenceClient.
Greedy answers must equal the gRPC SDK's token for token: the HTTP layer only translates."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
from huggingface_hub import InferenceClient
from huggingface_hub.errors import TextGenerationError

from bloomduo.apps.launcher import free_port, free_ports
from bloomduo.client import BloomduoError, Client
from bloomduo.gateway.chat_template import load_chat_template, plain_turns
from bloomduo.gateway.config import RequestLimits
from tests.conftest import free_port_run, running_stack
from tests.reference import hf_log_softmax

TOKEN = "http-s3cret"
GREEDY = {"max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
LONG = {"max_tokens": 1500, "temperature": 0, "extra_body": {"ignore_eos": True}, "stream": True}


@dataclass(frozen=True)
class HttpStack:
    grpc: str
    url: str
    model: str
    metrics_port: int


@pytest.fixture(scope="module")
def stack(demo_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpStack]:
    token_file = tmp_path_factory.mktemp("http") / "token"
    token_file.write_text(TOKEN)
    model_dir = demo_model()
    metrics_port = free_port_run(3)  # the gateway's, then each worker's
    http_port = free_ports(1, exclude=range(metrics_port, metrics_port + 3))[0]
    gateway_args = ("--auth-token-file", str(token_file))
    with running_stack(
        model_dir,
        num_shards=2,
        http_port=http_port,
        metrics_port=metrics_port,
        gateway_args=gateway_args,
        limits=RequestLimits(max_concurrent_requests=2),
    ) as running:
        yield HttpStack(running.target, f"http://127.0.0.1:{http_port}", model_dir.name, metrics_port)


def _openai(stack: HttpStack, api_key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=api_key, max_retries=0)


def _grpc_greedy(stack: HttpStack, prompt: str, max_new_tokens: int = 12):
    with Client(stack.grpc, token=TOKEN) as bloom:
        return bloom.generate(prompt, max_new_tokens=max_new_tokens, ignore_eos=True, details=True)


def _http(stack: HttpStack, path: str, body: dict | None = None, headers: dict | None = None):
    """(status, headers, parsed body) of a raw request, for what no client exposes."""
    request = urllib.request.Request(
        stack.url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def test_openai_completions_equal_grpc_token_for_token(stack: HttpStack) -> None:
    prompt = "The capital of France is"
    expected = _grpc_greedy(stack, prompt)
    with _openai(stack) as client:
        answer = client.completions.create(model=stack.model, prompt=prompt, logprobs=0, **GREEDY)
        (choice,) = answer.choices
        assert choice.text == expected.text and choice.finish_reason == "length"
        assert choice.logprobs.tokens == [token.text for token in expected.tokens]
        assert choice.logprobs.token_logprobs == pytest.approx([t.logprob for t in expected.tokens], abs=1e-5)
        assert choice.logprobs.text_offset[0] == 0
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (expected.prompt_tokens, 12)

        # The same prompt as token ids, and as a list of prompts next to another one: one choice each.
        with Client(stack.grpc, token=TOKEN) as bloom:
            ids = bloom.tokenize(prompt)
        listed = client.completions.create(model=stack.model, prompt=[ids, ids[:2]], **GREEDY)
        assert [c.index for c in listed.choices] == [0, 1] and listed.choices[0].text == expected.text

        streamed = list(
            client.completions.create(
                model=stack.model,
                prompt=prompt,
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
        )
        *chunks, last = streamed
        assert "".join(chunk.choices[0].text for chunk in chunks) == expected.text
        assert chunks[-1].choices[0].finish_reason == "length"
        assert last.choices == [] and last.usage.completion_tokens == 12

        # n choices are independent draws, each reproducible from its seed.
        sampled = {"model": stack.model, "prompt": prompt, "max_tokens": 6, "n": 2, "seed": 7}
        first, again = (client.completions.create(**sampled) for _ in range(2))
        assert [c.text for c in first.choices] == [c.text for c in again.choices]
        assert first.usage.prompt_tokens == expected.prompt_tokens and first.usage.completion_tokens <= 12
        # vLLM's top_k extension: sampling among the single likeliest token is the greedy text
        top_one = client.completions.create(
            model=stack.model,
            prompt=prompt,
            max_tokens=12,
            temperature=1.0,
            extra_body={"ignore_eos": True, "top_k": 1},
        )
        assert top_one.choices[0].text == expected.text

        stopped = client.completions.create(
            model=stack.model, prompt=prompt, stop=[expected.text[3:6]], **GREEDY
        )
        assert stopped.choices[0].text == expected.text[:3] and stopped.choices[0].finish_reason == "stop"


def _assert_top(top: dict[str, float], row: torch.Tensor, n: int, tokenizer) -> None:
    """A `top_logprobs` dict holds the n likeliest tokens of transformers' log_softmax row (keyed by text),
    and maybe the chosen token."""
    best = row.topk(n)
    for token_id, logprob in zip(best.indices.tolist(), best.values.tolist(), strict=True):
        assert top[tokenizer.decode([token_id], skip_special_tokens=False)] == pytest.approx(
            logprob, abs=1e-4
        )
    assert n <= len(top) <= n + 1


def test_openai_echo_and_logprobs_score_token_id_prompts_as_transformers(
    stack: HttpStack, demo_model
) -> None:
    """What lm-evaluation-harness's local-completions sends to score multiple choice: token-id prompts,
    echo, logprobs, max_tokens 1; every prompt token's logprob is transformers' log_softmax (float32)."""
    from tokenizers import Tokenizer

    model_dir = demo_model()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    with Client(stack.grpc, token=TOKEN) as bloom:
        context, choice_a, choice_b = (bloom.tokenize(t) for t in ("The capital of France", " is", " was"))
    prompts = [context + choice_a, context + choice_b]
    worst = 0.0
    with _openai(stack) as client:
        answer = client.completions.create(
            model=stack.model, prompt=prompts, echo=True, logprobs=2, max_tokens=1, temperature=0, seed=1
        )
        for ids, choice in zip(prompts, sorted(answer.choices, key=lambda c: c.index), strict=True):
            logprobs = choice.logprobs
            generated = choice.text[len(tokenizer.decode(ids)) :]
            expected = hf_log_softmax(model_dir, ids)
            assert len(logprobs.tokens) == len(ids) + 1 and logprobs.token_logprobs[0] is None
            assert logprobs.top_logprobs[0] is None and logprobs.text_offset[0] == 0
            want = [float(expected[i, token]) for i, token in enumerate(ids[1:])]
            got = logprobs.token_logprobs[1 : len(ids)]
            assert got == pytest.approx(want, abs=1e-4)
            worst = max(worst, *(abs(a - b) for a, b in zip(got, want, strict=True)))
            for position in range(1, len(ids) + 1):  # prompt tokens 1.., then the generated one
                _assert_top(logprobs.top_logprobs[position], expected[position - 1], 2, tokenizer)
            # Greedy: the generated token is the likeliest after the prompt.
            assert logprobs.token_logprobs[-1] == pytest.approx(float(expected[-1].max()), abs=1e-4)
            assert "".join(logprobs.tokens) == choice.text and logprobs.tokens[-1] == generated
            assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(ids) + 1)]

        # max_tokens 0 with echo: the prompt's logprobs alone, no completion tokens.
        scored = client.completions.create(
            model=stack.model, prompt=prompts[0], echo=True, logprobs=0, max_tokens=0
        )
        (choice,) = scored.choices
        assert choice.text == tokenizer.decode(prompts[0]) and choice.finish_reason == "length"
        # The same prompt scored alone and with no token to generate: its logits come from float32 GEMMs of
        # other row counts than above, which may sum in another order (a Xeon with AMX: 1 ulp apart).
        alone, batched = choice.logprobs.token_logprobs, answer.choices[0].logprobs.token_logprobs[:-1]
        assert alone[0] is None and batched[0] is None and len(alone) == len(batched)
        assert alone[1:] == pytest.approx(batched[1:], rel=32 * torch.finfo(torch.float32).eps, abs=0)
        assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(prompts[0])

        # Streamed: the echoed prompt with its logprobs first, then each new token.
        first, *rest = client.completions.create(
            model=stack.model, prompt=prompts[0], echo=True, logprobs=1, stream=True, **GREEDY
        )
        assert first.choices[0].text == tokenizer.decode(prompts[0])
        assert first.choices[0].logprobs.token_logprobs == answer.choices[0].logprobs.token_logprobs[:-1]
        # computed alone here, beside the other prompt above: as the prompt's, its logits may be 1 ulp apart
        assert len(rest) == 12 and rest[0].choices[0].logprobs.token_logprobs == pytest.approx(
            [answer.choices[0].logprobs.token_logprobs[-1]], rel=32 * torch.finfo(torch.float32).eps, abs=0
        )
    print(f"HTTP echo: max |logprob - transformers log_softmax| = {worst:.2e}")


def test_openai_chat_top_logprobs_are_the_likeliest_tokens(stack: HttpStack, demo_model) -> None:
    from tokenizers import Tokenizer

    model_dir = demo_model()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    messages = [{"role": "user", "content": "Name a colour."}]
    expected = _grpc_greedy(stack, plain_turns(messages), max_new_tokens=4)
    with _openai(stack) as client:
        answer = client.chat.completions.create(
            model=stack.model, messages=messages, logprobs=True, top_logprobs=3, **{**GREEDY, "max_tokens": 4}
        )
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=stack.model, messages=messages, logprobs=True, top_logprobs=6
            )
        assert refused.value.param == "top_logprobs"
    with Client(stack.grpc, token=TOKEN) as bloom:
        prompt_ids = bloom.tokenize(plain_turns(messages))
    rows = hf_log_softmax(model_dir, prompt_ids + [t.id for t in expected.tokens])[len(prompt_ids) - 1 :]
    content = answer.choices[0].logprobs.content
    assert [entry.logprob for entry in content] == pytest.approx(
        [t.logprob for t in expected.tokens], abs=1e-5
    )
    for entry, row in zip(content, rows, strict=False):
        best = row.topk(3)
        assert [top.token for top in entry.top_logprobs] == [
            tokenizer.decode([i], skip_special_tokens=False) for i in best.indices.tolist()
        ]
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_openai_async_chat_renders_plain_turns_and_streams_role_first(stack: HttpStack) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    expected = _grpc_greedy(stack, plain_turns(messages))

    async def chat() -> tuple:
        async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=TOKEN, max_retries=0) as client:
            answer = await client.chat.completions.create(model=stack.model, messages=messages, **GREEDY)
            stream = await client.chat.completions.create(
                model=stack.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
            return answer, [chunk async for chunk in stream]

    answer, chunks = asyncio.run(chat())
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length" and answer.usage.total_tokens == expected.prompt_tokens + 12
    first, *deltas, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content for chunk in deltas) == expected.text
    assert usage.choices == [] and usage.usage.completion_tokens == 12


def test_openai_refusals_are_the_sdks_typed_errors_naming_the_field(stack: HttpStack) -> None:
    with Client(stack.grpc, token=TOKEN) as bloom, pytest.raises(BloomduoError) as grpc_refusal:
        bloom.generate("Hello", max_new_tokens=0)
    with _openai(stack) as client:
        create = client.completions.create
        with pytest.raises(openai.BadRequestError) as refused:
            create(model=stack.model, prompt="Hello", max_tokens=0)
        # The gRPC refusal's words, with the field under OpenAI's name.
        assert refused.value.param == "max_tokens"
        assert refused.value.body["message"] == grpc_refusal.value.message.replace(
            "max_new_tokens", "max_tokens"
        )
        for extra, param in (
            ({"extra_body": {"frobnicate": 1}}, "frobnicate"),  # unknown: never silently ignored
            ({"logprobs": 6}, "logprobs"),  # above the engine's top-n bound (OpenAI's too)
            ({"presence_penalty": 0.5}, "presence_penalty"),
            ({"n": 0}, "n"),
        ):
            with pytest.raises(openai.BadRequestError) as refused:
                create(model=stack.model, prompt="Hello", **extra)
            assert refused.value.param == param and param in refused.value.message
        with pytest.raises(openai.NotFoundError):
            create(model="gpt-4", prompt="Hello")
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=stack.model, messages=[{"role": "robot", "content": "x"}])
        assert refused.value.param == "messages.0.role"
    with _openai(stack, api_key="wrong") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()

    # Over the concurrency limit (2 for this stack): 429 with Retry-After, which the SDK would honour.
    with _openai(stack) as client:
        streams = [
            client.completions.create(model=stack.model, prompt="A long story", **LONG) for _ in range(2)
        ]
        for stream in streams:
            next(iter(stream))
        with pytest.raises(openai.RateLimitError) as overloaded:
            client.completions.create(model=stack.model, prompt="Hello", max_tokens=2)
        assert overloaded.value.response.headers["retry-after"] == "1"
        for stream in streams:
            stream.close()  # a client gone cancels its sequence
    with Client(stack.grpc, token=TOKEN) as bloom:
        deadline = time.monotonic() + 30
        while bloom.info().load.running_requests and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bloom.info().load.running_requests == 0


def test_tgi_clients_equal_grpc(stack: HttpStack, demo_model) -> None:
    prompt = "Once upon a time"
    expected = _grpc_greedy(stack, prompt, max_new_tokens=8)
    client = InferenceClient(model=stack.url, token=TOKEN)
    assert client.text_generation(prompt, max_new_tokens=8) == expected.text
    detailed = client.text_generation(prompt, max_new_tokens=8, details=True)
    assert [t.id for t in detailed.details.tokens] == [t.id for t in expected.tokens]
    assert detailed.generated_text == expected.text and detailed.details.generated_tokens == len(
        expected.tokens
    )
    *tokens, last = client.text_generation(prompt, max_new_tokens=8, details=True, stream=True)
    assert [t.token.id for t in [*tokens, last]] == [t.id for t in expected.tokens]
    assert last.generated_text == expected.text and last.details.finish_reason == expected.finish_reason
    with pytest.raises(TextGenerationError, match="top_n_tokens"):
        client.text_generation(prompt, max_new_tokens=2, top_n_tokens=6)

    # The prompt's logprobs and each step's top-n, as transformers' log_softmax gives them.
    scored = client.text_generation(
        prompt, max_new_tokens=4, details=True, decoder_input_details=True, top_n_tokens=3
    )
    ids = [token.id for token in scored.details.prefill]
    rows = hf_log_softmax(demo_model(), ids + [t.id for t in scored.details.tokens])
    assert scored.details.prefill[0].logprob is None and len(ids) == expected.prompt_tokens
    assert [t.logprob for t in scored.details.prefill[1:]] == pytest.approx(
        [float(rows[i, token]) for i, token in enumerate(ids[1:])], abs=1e-4
    )
    # huggingface_hub types top_tokens' inner lists but leaves their tokens as parsed: plain dicts.
    top_ids = [[t["id"] for t in top] for top in scored.details.top_tokens]
    for top, row in zip(scored.details.top_tokens, rows[len(ids) - 1 :], strict=False):
        assert [t["id"] for t in top] == row.topk(3).indices.tolist()
        assert [t["logprob"] for t in top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    streamed = list(
        client.text_generation(prompt, max_new_tokens=4, details=True, stream=True, top_n_tokens=3)
    )
    assert [[t.id for t in event.top_tokens] for event in streamed] == top_ids

    status, _, info = _http(stack, "/info", headers={"authorization": f"Bearer {TOKEN}"})
    assert status == 200 and info["model_id"] == stack.model and info["max_concurrent_requests"] == 2
    assert _http(stack, "/health")[0] == 200  # open to probes, like grpc.health.v1
    status, _, body = _http(stack, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 0}})
    assert status == 401 and "error_type" in body
    status, _, body = _http(
        stack, "/generate", {"inputs": "Hi", "bogus": 1}, headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert (status, body["error_type"]) == (422, "validation") and "bogus" in body["error"]


def test_request_id_is_honoured_and_returned_and_requests_counted_by_protocol(stack: HttpStack) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    status, headers, _ = _http(stack, "/v1/models", headers={**auth, "x-request-id": "trace-42"})
    assert status == 200 and headers["x-request-id"] == "trace-42"
    status, headers, body = _http(stack, "/v1/models", headers={**auth, "x-request-id": "bad id!"})
    assert status == 400 and body["error"]["param"] == "request_id"
    status, headers, _ = _http(stack, "/openapi.json")
    assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10) as scrape:
        metrics = scrape.read().decode()
    assert 'bloomduo_http_requests_total{protocol="openai",status="400"}' in metrics
    assert re.search(r'bloomduo_http_requests_total\{protocol="tgi",status="200"\} [1-9]', metrics)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Leave early", "max_tokens": 1500, "ignore_eos": True}),
        # TGI has no ignore_eos; the demo model's greedy text never reaches EOS
        ("/generate", {"inputs": "Leave early", "parameters": {"max_new_tokens": 1500}}),
    ],
)
def test_a_client_that_leaves_before_a_whole_answer_frees_its_sequence(stack: HttpStack, path, body) -> None:
    """Not streamed: nothing is written until the end, so only asking the connection tells the server."""
    if path.startswith("/v1"):
        body = {**body, "model": stack.model}
    request = urllib.request.Request(
        stack.url + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN}"},
    )
    with pytest.raises(TimeoutError):  # the client gives up and closes
        urllib.request.urlopen(request, timeout=1.5)
    started = time.monotonic()
    while not _http_idle(stack):
        # 1500 tokens take the tiny model several seconds more than this
        assert time.monotonic() - started < 1.5, "the sequence kept running after its client left"
        time.sleep(0.1)
    assert _grpc_greedy(stack, "served after", max_new_tokens=3).generated_tokens == 3
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10) as scrape:
        assert re.search(
            r'bloomduo_http_requests_total\{protocol="\w+",status="499"\} [1-9]', scrape.read().decode()
        )


def _http_idle(stack: HttpStack) -> bool:
    with Client(stack.grpc, token=TOKEN) as bloom:
        load = bloom.info(timeout=5).load
    return load.running_requests == 0 and set(load.worker_cached_sequences) == {load.kept_sequences}


def test_http_port_zero_leaves_http_off(demo_model) -> None:
    """A gateway started with --http-port 0 listens on its gRPC port only (no workers needed to see it)."""
    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "bloomduo", "gateway", "--model", str(demo_model()), "--shards",
         f"127.0.0.1:{free_port()}", "--port", str(port), "--http-port", "0"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "BLOOMDUO_LOG_FORMAT": "json"},
    )  # fmt: skip
    try:
        for line in gateway.stderr:
            if '"gateway_listening"' in line:
                break
        assert json.loads(line)["http"] is None
        assert _listening_ports(gateway.pid) == {port}
    finally:
        gateway.terminate()
        gateway.wait(30)


def _listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on: its socket inodes matched against the kernel's LISTEN table."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with_target = os.readlink(fd) if fd.is_symlink() else ""
        if match := re.fullmatch(r"socket:\[(\d+)\]", with_target):
            inodes.add(match.group(1))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_chat_template_from_file_or_plain_fallback(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert load_chat_template(tmp_path, None)(messages) == "User: Hi\nAssistant:"
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert load_chat_template(tmp_path, template)(messages) == "<|user|>Hi</s><|assistant|>"
