"""Soak: bounded mixed load on the real stack, round after round (`pytest -m soak -s`, scripts/soak.sh).

R rounds (BLOOMDUO_SOAK_ROUNDS, default 6) of N concurrent clients (BLOOMDUO_SOAK_CLIENTS, 64), each on
its own channel, sending requests back to back for BLOOMDUO_SOAK_ROUND_S seconds (30): greedy and
sampled, unary and streamed, with stop sequences; streams cancelled after a few tokens, tiny deadlines,
channels closed mid-request, and a few invalid requests. One client in four sends the same mix over
HTTP instead, on connections of its own (httpx): OpenAI completions whole and streamed, TGI's
generate_stream, streams read slowly or left after a few events, timeouts, connections closed
mid-request, and bodies the HTTP front refuses. It checks that

- every request ends in a complete result or an explicit, expected error, within a bound: none lost,
  none hung;
- between rounds the deployment holds nothing: no running or waiting request, no worker KV cache;
- fixed greedy and seeded requests get the same tokens after every round as before the first;
- each process's resident memory stays flat: its highest sample in the last round (sampled every
  0.25 s, and once idle after the round) is within 5 % of its highest in the two warm-up rounds.
  The warm-up rounds start with a burst of the heaviest requests of the mix, so that grow-only
  buffers (the workers' KV caches) reach their final size in the warm-up. Peaks rather than the idle
  value after a round, because how much freed heap the C allocator gives back varies by tens of MB
  from one round to the next, while a leak raises every sample.

BLOOMDUO_SOAK_MODEL=DIR soaks another checkpoint instead of the tiny demo model.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx2
import pytest

from bloomduo.apps.launcher import Stack, free_port
from bloomduo.client import AsyncClient, BloomduoError, Client, FinishReason
from bloomduo.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import running_stack


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


ROUNDS = _env_int("BLOOMDUO_SOAK_ROUNDS", 6)
CLIENTS = _env_int("BLOOMDUO_SOAK_CLIENTS", 64)
ROUND_S = float(os.environ.get("BLOOMDUO_SOAK_ROUND_S", 30))
WARMUP_ROUNDS = 2
RSS_GROWTH = 1.05
# Longer than any request takes on a loaded machine, short enough that a hang fails the run.
HANG_S = float(os.environ.get("BLOOMDUO_SOAK_HANG_S", 120))
DRAIN_S = 30.0  # time for cancelled and closed requests to leave the batch and the workers' caches
PEAK_SAMPLE_S = 0.25  # how often resident memory is sampled during a round
LONGEST_GENERATION = 200  # the most tokens any request of the mix asks for

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "北京是中国的首都，上海",
    "Emoji party 🎉🎊🥳 and flags 🇫🇷🇯🇵 then",
    "家族👨‍👩‍👧‍👦和朋友",
    "日本語のテキスト：東京",
    "A much longer prompt about many things, " * 40,  # ~700 tokens (demo tokenizer): chunked prefill
    "x",
]
# Answered before the first round and after each one; the load must not change them.
REFERENCE = [
    ("The same question, every time:", {"max_new_tokens": 24, "ignore_eos": True}),
    ("北京", {"max_new_tokens": 24, "ignore_eos": True, "do_sample": True, "seed": 7, "top_p": 0.9}),
]
INVALID = [
    ("", {}),
    ("hi", {"do_sample": True, "temperature": 0.0}),
    ("hi", {"top_p": 1.5}),
    ("hi", {"max_new_tokens": 0}),
    ("hi", {"stop": ["a", "b", "c", "d", "e"]}),
]
# Bodies only the HTTP front sees: past the bound of n, malformed JSON, a parameter it does not implement.
HTTP_INVALID = [
    ("/v1/completions", b'{"model": "m", "prompt": "hi", "n": 17}'),
    ("/v1/completions", b'{"model": "m", "prompt": "hi", "max_tokens": 4'),
    ("/generate", b'{"inputs": "hi", "parameters": {"frobnicate": 1}}'),
]
HTTP_SHARE = 4  # one client in this many speaks HTTP


class Outcome:
    OK = "ok"
    CANCELLED = "cancelled"  # the client stopped reading a stream
    DISCONNECTED = "disconnected"  # the client closed its channel mid-request
    DEADLINE = "deadline"
    INVALID = "invalid"  # INVALID_ARGUMENT for a request built to be invalid
    OVERLOADED = "overloaded"  # RESOURCE_EXHAUSTED (HTTP 429): explicit, but not expected at this load
    ERROR = "error"  # anything else: fails the run
    HUNG = "hung"  # no answer within HANG_S: fails the run


@dataclass
class RoundStats:
    outcomes: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, of complete results
    errors: list[str] = field(default_factory=list)
    started: int = 0
    over_http: int = 0  # of the started requests
    http_outcomes: Counter = field(default_factory=Counter)  # the outcomes of those
    memory_kb: dict[str, dict[str, int]] = field(default_factory=dict)  # idle, after the round
    peak_kb: dict[str, int] = field(default_factory=dict)  # highest VmRSS sampled during the round
    drain_s: float = 0.0

    def add(
        self, outcome: str, latency: float | None, error: str | None = None, over_http: bool = False
    ) -> None:
        """latency None: a request of the warm-up burst, counted but left out of the latencies."""
        self.outcomes[outcome] += 1
        self.http_outcomes[outcome] += over_http
        if outcome == Outcome.OK and latency is not None:
            self.latencies.append(latency)
        if error is not None:
            self.errors.append(error)


def _check_result(result: Any, params: dict[str, Any], stream_texts: list[str] | None = None) -> None:
    """A complete result: within max_new_tokens, a finish reason that holds, streamed pieces that add up."""
    max_new_tokens = params.get("max_new_tokens", 20)
    assert 1 <= result.generated_tokens <= max_new_tokens, result
    assert result.finish_reason in (FinishReason.LENGTH, FinishReason.EOS_TOKEN, FinishReason.STOP_SEQUENCE)
    if result.finish_reason == FinishReason.LENGTH:
        assert result.generated_tokens == max_new_tokens, result
    if result.finish_reason == FinishReason.STOP_SEQUENCE:
        assert any(stop in result.text for stop in params["stop"]), result
    if stream_texts is not None:
        assert len(stream_texts) == result.generated_tokens and "".join(stream_texts) == result.text


def _random_params(rng: random.Random) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": rng.choice([1, 2, 4, 8, 16, 32, 48])}
    if rng.random() < 0.5:
        params.update(do_sample=True, seed=rng.randrange(2**32), temperature=rng.choice([0.7, 1.0, 1.3]))
        params.update(rng.choice([{}, {"top_k": 20}, {"top_p": 0.9}, {"typical_p": 0.8}]))
    if rng.random() < 0.3:
        params["repetition_penalty"] = 1.3
    if rng.random() < 0.3:
        params["stop"] = [rng.choice(["e", "the", " a", "。", "\n"])]
    if rng.random() < 0.5:
        params["ignore_eos"] = True
    if rng.random() < 0.2:
        params["details"] = True
    return params


async def _unary(bloom: AsyncClient, prompt: str, params: dict[str, Any]) -> str:
    _check_result(await bloom.generate(prompt, **params), params)
    return Outcome.OK


async def _stream(bloom: AsyncClient, prompt: str, params: dict[str, Any]) -> str:
    texts, result = [], None
    async for event in bloom.generate_stream(prompt, **params):
        texts.append(event.token.text)
        result = event.result
    assert result is not None, "the stream ended without a result"
    _check_result(result, params, texts)
    return Outcome.OK


async def _cancel(bloom: AsyncClient, prompt: str, params: dict[str, Any], after: int) -> str:
    """Stop reading after `after` tokens: leaving the iterator cancels the call on the server."""
    received = 0
    async for event in bloom.generate_stream(prompt, **params):
        received += 1
        if event.result is not None:
            return Outcome.OK  # finished first (end of sequence or stop sequence)
        if received >= after:
            return Outcome.CANCELLED
    raise AssertionError("the stream ended without a result")


async def _disconnect(target: str, prompt: str, params: dict[str, Any], after_s: float, stream: bool) -> str:
    """Close a channel of its own while its call is in flight, as a client that goes away does."""
    bloom = AsyncClient(target, retries=0)

    async def consume() -> None:
        if stream:
            await _stream(bloom, prompt, params)
        else:
            await _unary(bloom, prompt, params)

    call = asyncio.ensure_future(consume())
    await asyncio.wait({call}, timeout=after_s)
    await bloom.close()
    # asyncio.wait rather than await: grpc.aio cancels the call's task when its channel closes, and that
    # must not read as a cancellation of this request's own task (the soak's hang timeout).
    await asyncio.wait({call})
    if call.cancelled():
        return Outcome.DISCONNECTED
    exc = call.exception()
    if exc is None:
        return Outcome.OK  # the complete, checked result came before the channel closed
    if isinstance(exc, BloomduoError) and exc.code == grpc.StatusCode.CANCELLED:
        return Outcome.DISCONNECTED
    raise exc


async def _one_request(bloom: AsyncClient, target: str, rng: random.Random) -> str:
    """One request of a kind drawn at random; returns its outcome or raises what went wrong."""
    kind = rng.choices(
        ["unary", "stream", "cancel", "deadline", "disconnect", "invalid"], weights=[6, 4, 2, 1, 1, 1]
    )[0]
    prompt = rng.choice(PROMPTS)
    params = _random_params(rng)
    try:
        if kind == "unary":
            return await _unary(bloom, prompt, params)
        if kind == "stream":
            return await _stream(bloom, prompt, params)
        if kind == "cancel":
            params.update(max_new_tokens=48, ignore_eos=True)
            return await _cancel(bloom, prompt, params, after=rng.randint(1, 8))
        if kind == "deadline":
            params.update(max_new_tokens=LONGEST_GENERATION, ignore_eos=True)
            return await _unary(bloom, prompt, {**params, "timeout": rng.uniform(0.01, 0.3)})
        if kind == "disconnect":
            params.update(max_new_tokens=64, ignore_eos=True)
            return await _disconnect(target, prompt, params, rng.uniform(0.0, 0.5), stream=rng.random() < 0.5)
        prompt, params = rng.choice(INVALID)
        await bloom.generate(prompt, **params)
        raise AssertionError(f"an invalid request was accepted: {prompt!r} {params}")
    except BloomduoError as exc:
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT and kind == "invalid":
            return Outcome.INVALID
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED and kind == "deadline":
            return Outcome.DEADLINE
        if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Outcome.OVERLOADED
        raise


# --- the same mix over HTTP ------------------------------------------------------------------------------


def _openai_body(model: str, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's subset of the parameters (it has no top_k, typical_p or repetition penalty)."""
    body = {"model": model, "prompt": prompt, "max_tokens": params["max_new_tokens"]}
    body["temperature"] = params.get("temperature", 1.0) if params.get("do_sample") else 0
    body.update({name: params[name] for name in ("seed", "top_p", "stop", "ignore_eos") if name in params})
    if params.get("details"):
        body["logprobs"] = 1
    return body


def _tgi_body(prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    """TGI's names are the SDK's; it has no ignore_eos. Details always: they carry the finish reason."""
    parameters = {name: value for name, value in params.items() if name != "ignore_eos"}
    return {"inputs": prompt, "parameters": {**parameters, "details": True}}


def _check_openai(finish_reason: str, completion_tokens: int, params: dict[str, Any]) -> None:
    max_new_tokens = params["max_new_tokens"]
    assert 1 <= completion_tokens <= max_new_tokens, (completion_tokens, params)
    assert finish_reason in ("stop", "length"), finish_reason
    if finish_reason == "length":
        assert completion_tokens == max_new_tokens, (completion_tokens, params)


def _http_refusal(response: httpx2.Response, invalid: bool) -> str:
    """The outcome of a response that is not a 200, or what went wrong."""
    if response.status_code == 429:
        return Outcome.OVERLOADED
    if invalid and response.status_code in (400, 422):
        return Outcome.INVALID
    raise AssertionError(f"HTTP {response.status_code}: {response.text[:200]}")


async def _http_unary(http: httpx2.AsyncClient, model: str, prompt: str, params: dict[str, Any], **kw) -> str:
    """A whole OpenAI completion; `kw` goes to the post (a timeout)."""
    response = await http.post("/v1/completions", json=_openai_body(model, prompt, params), **kw)
    if response.status_code != 200:
        return _http_refusal(response, invalid=False)
    answer = response.json()
    _check_openai(answer["choices"][0]["finish_reason"], answer["usage"]["completion_tokens"], params)
    return Outcome.OK


async def _events(response: httpx2.Response) -> AsyncIterator[Any]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


def _last_of_stream(event: Any) -> bool:
    """An event after which the stream has nothing left to generate."""
    if not isinstance(event, dict):
        return True
    if "generated_text" in event:  # TGI
        return event["generated_text"] is not None
    return not event["choices"] or event["choices"][0]["finish_reason"] is not None


async def _http_stream(
    http: httpx2.AsyncClient,
    model: str,
    prompt: str,
    params: dict[str, Any],
    tgi: bool,
    after: int | None = None,
    pause_s: float = 0.0,
) -> str:
    """A streamed OpenAI completion or TGI generate_stream; `after` events: leave the stream there, which
    closes the connection (its body unread) and must cancel the sequence on the server. `pause_s`: read
    slowly, pausing after each event, while the server generates at its own pace."""
    if tgi:
        path, body = "/generate_stream", _tgi_body(prompt, params)
    else:
        path = "/v1/completions"
        body = {
            **_openai_body(model, prompt, params),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    events = []
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return _http_refusal(response, invalid=False)
        async for event in _events(response):
            assert not (isinstance(event, dict) and "error" in event), event
            events.append(event)
            if after is not None and len(events) >= after and not _last_of_stream(event):
                return Outcome.CANCELLED
            await asyncio.sleep(pause_s)
    if tgi:
        last = events[-1]
        details = last["details"]
        result = SimpleNamespace(
            generated_tokens=details["generated_tokens"],
            finish_reason=FinishReason(details["finish_reason"]),
            text=last["generated_text"],
        )
        _check_result(result, params, [event["token"]["text"] for event in events])
    else:
        assert events[-1] == "[DONE]", events[-2:]
        finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1]
        _check_openai(finish, events[-2]["usage"]["completion_tokens"], params)
    return Outcome.OK


async def _http_disconnect(consume: Awaitable[str], after_s: float) -> str:
    """Cancel the request after `after_s` if still in flight: httpx closes its connection, as a client
    that goes away does."""
    call = asyncio.ensure_future(consume)
    await asyncio.wait({call}, timeout=after_s)
    call.cancel()
    await asyncio.wait({call})
    return Outcome.DISCONNECTED if call.cancelled() else call.result()


async def _one_http_request(http: httpx2.AsyncClient, model: str, rng: random.Random) -> str:
    """_one_request's mix, over HTTP."""
    kind = rng.choices(
        ["unary", "stream", "cancel", "deadline", "disconnect", "invalid"], weights=[6, 4, 2, 1, 1, 1]
    )[0]
    prompt = rng.choice(PROMPTS)
    params = _random_params(rng)
    tgi = rng.random() < 0.5
    if kind == "unary":
        return await _http_unary(http, model, prompt, params)
    if kind == "stream":
        slow = rng.random() < 0.25
        return await _http_stream(http, model, prompt, params, tgi, pause_s=rng.uniform(0.02, 0.1) * slow)
    if kind == "cancel":
        params.update(max_new_tokens=48, ignore_eos=True)
        return await _http_stream(http, model, prompt, params, tgi, after=rng.randint(1, 8))
    if kind == "deadline":
        params.update(max_new_tokens=LONGEST_GENERATION, ignore_eos=True)
        try:
            return await _http_unary(http, model, prompt, params, timeout=rng.uniform(0.01, 0.3))
        except httpx2.TimeoutException:
            return Outcome.DEADLINE
    if kind == "disconnect":
        params.update(max_new_tokens=64, ignore_eos=True)
        stream = rng.random() < 0.5
        consume = (
            _http_stream(http, model, prompt, params, tgi)
            if stream
            else _http_unary(http, model, prompt, params)
        )
        return await _http_disconnect(consume, rng.uniform(0.0, 0.5))
    if rng.random() < 0.5:
        path, content = rng.choice(HTTP_INVALID)
        response = await http.post(path, content=content, headers={"content-type": "application/json"})
    else:
        prompt, params = rng.choice(INVALID)
        response = await http.post("/generate", json={"inputs": prompt, "parameters": params})
    assert response.status_code != 200, f"an invalid request was accepted: {response.text[:200]}"
    return _http_refusal(response, invalid=True)


@dataclass(frozen=True)
class Doors:
    """Where the clients reach the stack: gRPC, and the HTTP front serving `model`."""

    target: str
    url: str
    model: str


async def _client(doors: Doors, seed: int, until: float, stats: RoundStats) -> None:
    """One client: requests back to back on its own channel (or HTTP connection) until the round ends."""
    rng = random.Random(seed)
    over_http = seed % HTTP_SHARE == HTTP_SHARE - 1
    async with contextlib.AsyncExitStack() as resources:
        next_request: Callable[[], Awaitable[str]]
        if over_http:
            http = await resources.enter_async_context(httpx2.AsyncClient(base_url=doors.url, timeout=HANG_S))
            next_request = functools.partial(_one_http_request, http, doors.model, rng)
        else:
            bloom = await resources.enter_async_context(AsyncClient(doors.target, retries=0))
            next_request = functools.partial(_one_request, bloom, doors.target, rng)
        while time.monotonic() < until:
            stats.started += 1
            stats.over_http += over_http
            started = time.monotonic()
            try:
                outcome = await asyncio.wait_for(next_request(), HANG_S)
            except asyncio.TimeoutError:
                stats.add(Outcome.HUNG, None, f"no answer within {HANG_S:.0f} s", over_http)
            except Exception as exc:  # every failure is counted and reported, none escapes uncounted
                stats.add(Outcome.ERROR, None, f"{type(exc).__name__}: {exc}", over_http)
            else:
                stats.add(outcome, time.monotonic() - started, over_http=over_http)


MEMORY_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def _memory_kb(pid: int) -> dict[str, int]:
    """Resident memory of a process from /proc/<pid>/status, in kB: the total and its three parts."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in MEMORY_FIELDS:
                found[key] = int(value.split()[0])
    return found


def _processes(stack: Stack) -> dict[str, int]:
    assert stack.gateway is not None
    return {"gateway": stack.gateway.pid, **{f"shard{i}": shard.pid for i, shard in enumerate(stack.shards)}}


def _wait_idle(target: str) -> float:
    """Seconds until Info reports no request and no cached sequence anywhere; fails after DRAIN_S."""
    started = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GenerationServiceStub(channel)
        while True:
            load = stub.Info(gateway_pb2.InfoRequest(), timeout=10).load
            held = {load.kept_sequences}  # the last request's cache, kept for a next turn
            if (
                not (load.running_requests or load.waiting_requests)
                and set(load.worker_cached_sequences) == held
            ):
                return time.monotonic() - started
            if time.monotonic() - started > DRAIN_S:
                pytest.fail(f"the deployment still holds requests {DRAIN_S:.0f} s after the round: {load}")
            time.sleep(0.1)


def _reference_answers(target: str) -> list[list[int]]:
    with Client(target, timeout=HANG_S) as bloom:
        return [[t.id for t in bloom.generate(p, details=True, **params).tokens] for p, params in REFERENCE]


async def _peak_burst(target: str, stats: RoundStats) -> None:
    """The heaviest load the mix makes, all at once: every client on the longest prompt and the longest
    generation. Prefill chunks fill the step's token budget and every KV cache slot reaches the longest
    sequence, so the workers' grow-only buffers reach their final size within the warm-up."""
    prompt = max(PROMPTS, key=len)
    params = {"max_new_tokens": LONGEST_GENERATION, "ignore_eos": True, "details": True}

    async def one(bloom: AsyncClient) -> None:
        stats.started += 1
        try:
            outcome = await asyncio.wait_for(_unary(bloom, prompt, params), HANG_S)
        except asyncio.TimeoutError:
            stats.add(Outcome.HUNG, None, f"no answer within {HANG_S:.0f} s")
        except Exception as exc:
            stats.add(Outcome.ERROR, None, f"{type(exc).__name__}: {exc}")
        else:
            stats.add(outcome, None)

    async with AsyncClient(target, retries=0) as bloom:
        await asyncio.gather(*(one(bloom) for _ in range(CLIENTS)))


async def _sample_peaks(pids: dict[str, int], stats: RoundStats) -> None:
    """Keep each process's highest resident memory of the round (until cancelled)."""
    while True:
        for name, pid in pids.items():
            stats.peak_kb[name] = max(stats.peak_kb.get(name, 0), _memory_kb(pid)["VmRSS"])
        await asyncio.sleep(PEAK_SAMPLE_S)


async def _round(doors: Doors, number: int, pids: dict[str, int], stats: RoundStats) -> None:
    sampler = asyncio.ensure_future(_sample_peaks(pids, stats))
    try:
        if number < WARMUP_ROUNDS:
            await _peak_burst(doors.target, stats)
        until = time.monotonic() + ROUND_S
        seeds = [number * CLIENTS + i for i in range(CLIENTS)]
        await asyncio.gather(*(_client(doors, seed, until, stats) for seed in seeds))
    finally:
        sampler.cancel()


def _table(rounds: list[RoundStats], names: list[str]) -> str:
    columns = ["round", "requests", "http", "ok", "cancelled", "disconn", "deadline", "invalid", "overload"]
    columns += ["errors"]
    columns += ["p50 ms", "p99 ms", "drain s", *(f"{name} MB (peak)" for name in names)]
    rows = [columns]
    for number, stats in enumerate(rounds, 1):
        o = stats.outcomes
        latencies = sorted(stats.latencies) or [0.0]
        rows.append(
            [
                f"{number}{'*' if number <= WARMUP_ROUNDS else ''}",
                str(sum(o.values())),
                str(stats.over_http),
                str(o[Outcome.OK]),
                str(o[Outcome.CANCELLED]),
                str(o[Outcome.DISCONNECTED]),
                str(o[Outcome.DEADLINE]),
                str(o[Outcome.INVALID]),
                str(o[Outcome.OVERLOADED]),
                str(o[Outcome.ERROR] + o[Outcome.HUNG]),
                f"{statistics.median(latencies) * 1000:.0f}",
                f"{latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000:.0f}",
                f"{stats.drain_s:.2f}",
                *(
                    f"{stats.memory_kb[name]['VmRSS'] / 1024:.0f} ({stats.peak_kb[name] / 1024:.0f})"
                    for name in names
                ),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [
        "| " + " | ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (width + 1) + ":" for width in widths) + "|")
    return "\n".join(lines)


def _soak_model(demo_model: Callable[..., Path]) -> Path:
    configured = os.environ.get("BLOOMDUO_SOAK_MODEL")
    return Path(configured).resolve() if configured else demo_model()


@pytest.mark.soak
@pytest.mark.timeout(ROUNDS * (ROUND_S + HANG_S + DRAIN_S) + 900)
def test_soak(demo_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # One log event per request from three processes would bury the summary; warnings still show.
    monkeypatch.setenv("BLOOMDUO_LOG_LEVEL", os.environ.get("BLOOMDUO_LOG_LEVEL", "WARNING"))
    # The soak measures serving, not load shedding: admit every client with room to spare.
    gateway_args = ("--max-concurrent-requests", str(max(128, 4 * CLIENTS)))
    model = _soak_model(demo_model)
    http_port = free_port()
    with running_stack(model, num_shards=2, http_port=http_port, gateway_args=gateway_args) as stack:
        doors = Doors(stack.target, f"http://127.0.0.1:{http_port}", model.name)
        names = list(_processes(stack))
        reference = _reference_answers(stack.target)
        rounds: list[RoundStats] = []
        soak_started = time.monotonic()
        for number in range(ROUNDS):
            stats = RoundStats()
            pids = _processes(stack)
            asyncio.run(_round(doors, number, pids, stats))
            stats.drain_s = _wait_idle(stack.target)
            assert _reference_answers(stack.target) == reference, f"answers changed after round {number + 1}"
            stats.memory_kb = {name: _memory_kb(pid) for name, pid in pids.items()}
            for name, memory in stats.memory_kb.items():
                stats.peak_kb[name] = max(stats.peak_kb[name], memory["VmRSS"])
            rounds.append(stats)
            memory = ", ".join(
                f"{name} " + "/".join(f"{m[key] // 1024}" for key in MEMORY_FIELDS)
                for name, m in stats.memory_kb.items()
            )
            print(
                f"\nround {number + 1}/{ROUNDS}: {dict(stats.outcomes)}, "
                f"of which over HTTP {dict(+stats.http_outcomes)}; "
                f"MB {'/'.join(MEMORY_FIELDS)}: {memory}",
                flush=True,
            )
        elapsed = time.monotonic() - soak_started

    print(
        f"\nsoak: {ROUNDS} rounds x {CLIENTS} clients x {ROUND_S:.0f} s on {model.name}, "
        f"{elapsed:.0f} s in all (* = warm-up)\n{_table(rounds, names)}",
        flush=True,
    )
    for number, stats in enumerate(rounds, 1):
        # Nothing lost: every request started has exactly one outcome.
        assert sum(stats.outcomes.values()) == stats.started, f"round {number}: requests lost"
        bad = stats.outcomes[Outcome.ERROR] + stats.outcomes[Outcome.HUNG]
        assert bad == 0, f"round {number}: {bad} failed or hung: {Counter(stats.errors).most_common(5)}"
        assert stats.outcomes[Outcome.OK] > 0
    if len(rounds) <= WARMUP_ROUNDS:
        print(f"memory not checked: it needs more than {WARMUP_ROUNDS} (warm-up) rounds")
        return
    # Peaks, not the idle value after a round: see the module's docstring.
    warmup_peak = {name: max(stats.peak_kb[name] for stats in rounds[:WARMUP_ROUNDS]) for name in names}
    grown = {name: rounds[-1].peak_kb[name] / warmup_peak[name] for name in names}
    changes = ", ".join(f"{name} {100 * (ratio - 1):+.1f} %" for name, ratio in grown.items())
    print(f"peak resident memory, round {len(rounds)} against the warm-up rounds: {changes}")
    assert all(ratio <= RSS_GROWTH for ratio in grown.values()), f"resident memory grew: {changes}"
