"""The SDK's types and the two clients; see the package docstring for an example."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import numbers
import random
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, TypeVar

import grpc
from google.protobuf.descriptor import FieldDescriptor

from bloomduo.v1 import gateway_pb2, gateway_pb2_grpc

_PARAMETERS = gateway_pb2.GenerateParameters.DESCRIPTOR.fields_by_name
_UINT_MAX = {FieldDescriptor.TYPE_UINT32: 2**32 - 1, FieldDescriptor.TYPE_UINT64: 2**64 - 1}
_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
# A target may resolve to several gateways (replicas): gRPC's round_robin spreads calls over them, and each
# call, a retry included, is a new pick. Its health checks (a grpc.health.v1 Watch stream per replica) keep
# a gateway that is loading, re-forming its group or draining out of the picks, so retries go to the
# others; a gateway without the health service counts as healthy. One address works as before.
_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": _SERVICE},
}
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.service_config", json.dumps(_SERVICE_CONFIG)),
    # Not a DNS TXT record's: the balancing above is what the retries rely on.
    ("grpc.service_config_disable_resolution", 1),
    # A replica that vanished without closing its connections (a node lost, a network cut) fails its pings
    # and leaves the rotation within 15 s. The gateway accepts a ping every 5 s (bloomduo.core.serving).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

Metadata = Sequence[tuple[str, str]]
_T = TypeVar("_T")


class _Unset(Enum):
    """Marks a per-call option left out, as distinct from an explicit None."""

    UNSET = "unset"


_UNSET = _Unset.UNSET
Timeout = float | None | Literal[_Unset.UNSET]


class FinishReason(str, Enum):
    """Why generation ended. A `str`, so `result.finish_reason == "length"` holds as well."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    UNSPECIFIED = "unspecified"  # a server newer than this SDK sent a reason it does not know

    def __str__(self) -> str:
        # Python 3.11 made str() of a str-mixin Enum its qualified name; print the value everywhere.
        return self.value


_FINISH_REASONS = {
    gateway_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    gateway_pb2.FINISH_REASON_EOS_TOKEN: FinishReason.EOS_TOKEN,
    gateway_pb2.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
}


class BloomduoError(Exception):
    """A failed call: `.code` is the grpc.StatusCode, `.message` says what went wrong.

    INVALID_ARGUMENT names the bad parameter ("top_k: ..."), whether the server refused it or the SDK
    did before sending: an argument the request message cannot carry (a wrong type, a negative or
    too large integer, a float past float32's range, text that is not valid Unicode) never leaves the
    client. RESOURCE_EXHAUSTED means the gateway is overloaded;
    UNAVAILABLE means it (or a shard worker) cannot serve right now, after the client's retries;
    DEADLINE_EXCEEDED means the call's timeout passed.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TopToken:
    """One of the likeliest tokens at a position (top_n_tokens): `logprob` is log_softmax of the model's
    logits, before any repetition penalty, temperature or filter; `text` is the token decoded alone."""

    id: int
    text: str
    logprob: float
    special: bool = False


@dataclass(frozen=True)
class Token:
    """One generated token.

    `text` is what the token adds to the output: empty while a UTF-8 character is still incomplete,
    so the texts of a stream joined always equal the final text. `logprob` is the token's
    log-probability under the distribution it was drawn from. `top_tokens`: the top_n_tokens likeliest.
    """

    id: int
    text: str
    logprob: float
    special: bool = False
    top_tokens: list[TopToken] = field(default_factory=list)


@dataclass(frozen=True)
class PromptToken:
    """A prompt token (decoder_input_details): `logprob` is log_softmax at it of the row before it, None
    for the first token; `text` is what it adds to the prompt; `top_tokens` the top_n_tokens likeliest."""

    id: int
    text: str
    logprob: float | None
    top_tokens: list[TopToken] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    """A finished generation; `seed` reproduces a sampled one, `tokens` is filled when details=True."""

    text: str
    generated_tokens: int
    finish_reason: FinishReason
    seed: int
    prompt_tokens: int
    tokens: list[Token] = field(default_factory=list)
    prefill: list[PromptToken] = field(default_factory=list)  # filled when decoder_input_details=True

    def __repr__(self) -> str:
        # The text is cut and the tokens counted, so a long result still prints on one line.
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return (
            f"Result(text={text!r}, generated_tokens={self.generated_tokens}, "
            f"finish_reason={str(self.finish_reason)!r}, seed={self.seed}, "
            f"prompt_tokens={self.prompt_tokens}, tokens=<{len(self.tokens)} tokens>)"
        )


@dataclass(frozen=True)
class StreamEvent:
    """One event of generate_stream: a token, and on the last event also the whole Result."""

    token: Token | None
    result: Result | None


@dataclass(frozen=True)
class Load:
    """What the deployment holds right now; the worker lists are in rank order (empty while not serving)."""

    running_requests: int
    waiting_requests: int
    serving: bool
    worker_cached_sequences: list[int]
    worker_cached_tokens: list[int]
    worker_kv_cache_bytes: list[int]  # allocated, used or not
    kept_sequences: int  # finished ones kept for a next turn, in worker_cached_sequences


@dataclass(frozen=True)
class Info:
    """What the gateway serves: model name, shard count, dtype, devices, vocabulary size, limits and load."""

    model: str
    num_shards: int
    dtype: str
    device: str
    vocab_size: int
    limits: dict[str, int]
    version: str
    load: Load
    worker_kernels: list[str]  # each worker's matmul kernels, in rank order (see Info in gateway.proto)


@dataclass(frozen=True)
class _RetryPolicy:
    retries: int
    backoff_s: float
    max_backoff_s: float
    retry_overloaded: bool

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("retries, backoff_s and max_backoff_s must be >= 0")

    def retryable(self, code: grpc.StatusCode) -> bool:
        """UNAVAILABLE only, and RESOURCE_EXHAUSTED when the user opted in.

        INVALID_ARGUMENT fails again the same way; CANCELLED and DEADLINE_EXCEEDED are the caller's
        own decisions; overload is better handled by the caller slowing down than by every client
        coming back at once.
        """
        if code == grpc.StatusCode.UNAVAILABLE:
            return True
        return self.retry_overloaded and code == grpc.StatusCode.RESOURCE_EXHAUSTED

    def delay(self, code: grpc.StatusCode, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before trying again after failed attempt number `attempt` (0-based), or None.

        Exponential backoff capped at max_backoff_s, with "equal jitter" (half fixed, half random) so
        that clients failing together do not come back together. None when the code is not
        retryable, the retries are spent, or the wait would end past the call's deadline.
        """
        if attempt >= self.retries or not self.retryable(code):
            return None
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        wait = ceiling / 2 + random.uniform(0, ceiling / 2)
        if deadline is not None and time.monotonic() + wait >= deadline:
            return None
        return wait


def _invalid(name: str, message: str) -> BloomduoError:
    return BloomduoError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {message}")


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid(name, f"must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _invalid(name, f"must be valid Unicode text ({exc.reason} at {exc.start})") from None
    return value


def _parameter(field: FieldDescriptor, value: Any) -> Any:
    """`value` as the field takes it, or the error naming the field where protobuf would raise one that
    does not (or would change the value silently)."""
    name = field.name
    if field.is_repeated:  # stop: one string or a list of them
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)):
            raise _invalid(name, f"must be a str or a list of str, got {type(value).__name__}")
        return [_text(name, item) for item in value]
    if field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise _invalid(name, f"must be a bool, got {type(value).__name__}")
    elif field.type in _UINT_MAX:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _invalid(name, f"must be an int, got {type(value).__name__}")
        if not 0 <= value <= _UINT_MAX[field.type]:
            raise _invalid(name, f"must be in [0, {_UINT_MAX[field.type]}], got {value}")
    elif field.type == FieldDescriptor.TYPE_FLOAT:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _invalid(name, f"must be a number, got {type(value).__name__}")
        # Protobuf would round it to infinity without a word.
        if math.isfinite(value) and math.isinf(struct.unpack("f", struct.pack("f", value))[0]):
            raise _invalid(name, f"must be within float32's range, got {value}")
    return value


def _request(prompt: str, params: dict[str, Any], request_id: str | None) -> gateway_pb2.GenerateRequest:
    """Server-side bounds (max_new_tokens, top_p...) are the server's to check; the SDK checks what the
    message itself can carry, so every error names its field."""
    unknown = set(params) - set(_PARAMETERS)
    if unknown:
        raise TypeError(f"unknown generation parameters {sorted(unknown)}; known: {sorted(_PARAMETERS)}")
    # None is the server's default: the field stays unset.
    checked = {
        name: _parameter(_PARAMETERS[name], value) for name, value in params.items() if value is not None
    }
    return gateway_pb2.GenerateRequest(
        prompt=_text("prompt", prompt),
        parameters=gateway_pb2.GenerateParameters(**checked),
        request_id="" if request_id is None else _text("request_id", request_id),
    )


def _top_tokens(messages: Sequence[gateway_pb2.TopToken]) -> list[TopToken]:
    return [TopToken(id=t.id, text=t.text, logprob=t.logprob, special=t.special) for t in messages]


def _token(message: gateway_pb2.Token) -> Token:
    return Token(
        id=message.id,
        text=message.text,
        logprob=message.logprob,
        special=message.special,
        top_tokens=_top_tokens(message.top_tokens),
    )


def _prompt_token(message: gateway_pb2.PromptToken) -> PromptToken:
    logprob = message.logprob if message.HasField("logprob") else None
    return PromptToken(
        id=message.id, text=message.text, logprob=logprob, top_tokens=_top_tokens(message.top_tokens)
    )


def _result(message: gateway_pb2.GenerateResult) -> Result:
    return Result(
        text=message.text,
        generated_tokens=message.generated_tokens,
        finish_reason=_FINISH_REASONS.get(message.finish_reason, FinishReason.UNSPECIFIED),
        seed=message.seed,
        prompt_tokens=message.prompt_tokens,
        tokens=[_token(token) for token in message.tokens],
        prefill=[_prompt_token(token) for token in message.prefill],
    )


def _event(message: gateway_pb2.GenerateStreamResponse) -> StreamEvent:
    return StreamEvent(
        token=_token(message.token) if message.HasField("token") else None,
        result=_result(message.result) if message.HasField("result") else None,
    )


def _info(message: gateway_pb2.InfoResponse) -> Info:
    limits = {field.name: value for field, value in message.limits.ListFields()}
    return Info(
        model=message.model,
        num_shards=message.num_shards,
        dtype=message.dtype,
        device=message.device,
        vocab_size=message.vocab_size,
        limits=limits,
        version=message.version,
        worker_kernels=list(message.worker_kernels),
        load=Load(
            running_requests=message.load.running_requests,
            waiting_requests=message.load.waiting_requests,
            serving=message.load.serving,
            worker_cached_sequences=list(message.load.worker_cached_sequences),
            worker_cached_tokens=list(message.load.worker_cached_tokens),
            worker_kv_cache_bytes=list(message.load.worker_kv_cache_bytes),
            kept_sequences=message.load.kept_sequences,
        ),
    )


def _error(exc: grpc.RpcError) -> BloomduoError:
    return BloomduoError(exc.code(), exc.details() or "")


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class _Base:
    """What both clients share: options, channel options, per-call deadline and metadata."""

    def __init__(
        self,
        timeout: float | None,
        retries: int,
        backoff_s: float,
        max_backoff_s: float,
        retry_overloaded: bool,
        token: str | None,
        metadata: Metadata,
    ) -> None:
        self.timeout = timeout
        self._retry = _RetryPolicy(retries, backoff_s, max_backoff_s, retry_overloaded)
        auth = [("authorization", f"Bearer {token}")] if token else []
        self._metadata = (*auth, *metadata)
        self._channel_options = list(_CHANNEL_OPTIONS)
        if backoff_s > 0:
            # Between its attempts to reconnect to a server that went away, gRPC waits 1 s, growing to
            # 120 s, and fails calls at once: a retry would often land in that wait and be wasted.
            # Reconnect at the retries' pace instead.
            self._channel_options += [
                ("grpc.initial_reconnect_backoff_ms", max(1, round(backoff_s * 1000))),
                ("grpc.max_reconnect_backoff_ms", max(1, round(max(backoff_s, max_backoff_s) * 1000))),
            ]

    def _open_channel(self, module: Any, target: str, tls: bool, root_certificates: bytes | None) -> Any:
        """A channel from `module` (grpc or grpc.aio, which name their factories alike)."""
        if tls or root_certificates:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            return module.secure_channel(target, credentials, options=self._channel_options)
        return module.insecure_channel(target, options=self._channel_options)

    def _deadline(self, timeout: Timeout) -> float | None:
        seconds = self.timeout if timeout is _UNSET else timeout
        return None if seconds is None else time.monotonic() + seconds

    def _call_metadata(self, metadata: Metadata) -> tuple[tuple[str, str], ...]:
        return (*self._metadata, *metadata)


class Client(_Base):
    """Blocking client of the gateway. Use it as a context manager, or call close().

    Every method takes `timeout=` (seconds for this call, retries included; None for no deadline;
    left out: the client's `timeout`) and `metadata=` (extra gRPC metadata for this call).
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = None,
        retries: int = 3,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        retry_overloaded: bool = False,
        token: str | None = None,
        metadata: Metadata = (),
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        """Connect (lazily) to the gateway at `target`, or to several replicas of it.

        target: any gRPC target: "host:port"; "dns:///name:port", every address the name resolves to
            (a Kubernetes headless Service: "dns:///bloomduo-headless:50051"); "ipv4:10.0.0.1:50051,
            10.0.0.2:50051". Calls go round-robin to the gateways that are reachable and SERVING.

        timeout: default deadline of each call in seconds, retries included; None waits as long as
            the server works.
        retries: how many times a call that failed with UNAVAILABLE is tried again (0: never), each
            time on the next replica in the rotation (a replica found down or not SERVING leaves it).
            generate, tokenize and info are always retried: a failed call produced nothing the caller
            saw. generate_stream is retried only until its first event arrived.
        backoff_s, max_backoff_s: the wait before retry n is about backoff_s * 2**n (half of it
            random), at most max_backoff_s.
        retry_overloaded: also retry RESOURCE_EXHAUSTED. Off by default: an overloaded gateway is
            better served by callers that slow down than by clients that all come back.
            INVALID_ARGUMENT, CANCELLED and DEADLINE_EXCEEDED are never retried.
        token: sent as ("authorization", "Bearer <token>") metadata on every call.
        metadata: more (key, value) gRPC metadata sent on every call; keys are lower case.
        tls: connect over TLS (implied by root_certificates), verifying the server against the
            system's CAs, or against root_certificates (PEM bytes) when given.
        """
        super().__init__(timeout, retries, backoff_s, max_backoff_s, retry_overloaded, token, metadata)
        self._channel = self._open_channel(grpc, target, tls, root_certificates)
        self._stub = gateway_pb2_grpc.GenerationServiceStub(self._channel)

    def _unary(self, method: Callable[..., _T], request: Any, timeout: Timeout, metadata: Metadata) -> _T:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=_remaining(deadline), metadata=self._call_metadata(metadata))
            except grpc.RpcError as exc:
                wait = self._retry.delay(exc.code(), attempt, deadline)
                if wait is None:
                    raise _error(exc) from None
            time.sleep(wait)
            attempt += 1

    def generate(
        self,
        prompt: str,
        *,
        timeout: Timeout = _UNSET,
        metadata: Metadata = (),
        request_id: str | None = None,
        **params: Any,
    ) -> Result:
        """Generate a completion of `prompt` and return it whole.

        `params` are GenerateParameters fields (max_new_tokens, do_sample, temperature, top_k, top_p,
        typical_p, repetition_penalty, seed, stop, truncate, return_full_text, details, ignore_eos);
        None means the server's default. `request_id` is echoed in the server's logs.
        Raises BloomduoError (INVALID_ARGUMENT naming the parameter for a bad value, before sending when
        the request cannot carry it), or TypeError for an unknown parameter name.
        """
        request = _request(prompt, params, request_id)
        return _result(self._unary(self._stub.Generate, request, timeout, metadata).result)

    def generate_stream(
        self,
        prompt: str,
        *,
        timeout: Timeout = _UNSET,
        metadata: Metadata = (),
        request_id: str | None = None,
        **params: Any,
    ) -> Iterator[StreamEvent]:
        """Generate a completion of `prompt`, yielding one StreamEvent per token as it is made.

        Parameters as for generate. The last event also carries the Result. Stopping the iteration
        early cancels the request on the server.
        """
        request = _request(prompt, params, request_id)
        deadline = self._deadline(timeout)
        for attempt in itertools.count():
            call = self._stub.GenerateStream(
                request, timeout=_remaining(deadline), metadata=self._call_metadata(metadata)
            )
            started = False
            try:
                for message in call:
                    started = True
                    yield _event(message)
                return
            except grpc.RpcError as exc:
                # Once an event was yielded, a retry would repeat tokens the caller already has.
                wait = None if started else self._retry.delay(exc.code(), attempt, deadline)
                if wait is None:
                    raise _error(exc) from None
            finally:
                call.cancel()  # a consumer that stops early frees its place in the batch
            time.sleep(wait)

    def tokenize(self, text: str, *, timeout: Timeout = _UNSET, metadata: Metadata = ()) -> list[int]:
        """Token ids of `text` under the served model's tokenizer."""
        request = gateway_pb2.TokenizeRequest(text=text)
        return list(self._unary(self._stub.Tokenize, request, timeout, metadata).ids)

    def info(self, *, timeout: Timeout = _UNSET, metadata: Metadata = ()) -> Info:
        """Describe the deployment: model, shards, dtype, devices, vocabulary size, limits, version."""
        return _info(self._unary(self._stub.Info, gateway_pb2.InfoRequest(), timeout, metadata))

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with Client's options and methods, as coroutines and async iterators.

    Create it inside a running event loop; use it as an async context manager, or await close().
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = None,
        retries: int = 3,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        retry_overloaded: bool = False,
        token: str | None = None,
        metadata: Metadata = (),
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        """Connect (lazily) to the gateway at `target`; the options are those of Client."""
        super().__init__(timeout, retries, backoff_s, max_backoff_s, retry_overloaded, token, metadata)
        self._channel = self._open_channel(grpc.aio, target, tls, root_certificates)
        self._stub = gateway_pb2_grpc.GenerationServiceStub(self._channel)

    async def _unary(
        self, method: Callable[..., Awaitable[_T]], request: Any, timeout: Timeout, metadata: Metadata
    ) -> _T:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return await method(
                    request, timeout=_remaining(deadline), metadata=self._call_metadata(metadata)
                )
            except grpc.RpcError as exc:
                wait = self._retry.delay(exc.code(), attempt, deadline)
                if wait is None:
                    raise _error(exc) from None
            await asyncio.sleep(wait)
            attempt += 1

    async def generate(
        self,
        prompt: str,
        *,
        timeout: Timeout = _UNSET,
        metadata: Metadata = (),
        request_id: str | None = None,
        **params: Any,
    ) -> Result:
        """Generate a completion of `prompt` and return it whole; see Client.generate."""
        request = _request(prompt, params, request_id)
        return _result((await self._unary(self._stub.Generate, request, timeout, metadata)).result)

    async def generate_stream(
        self,
        prompt: str,
        *,
        timeout: Timeout = _UNSET,
        metadata: Metadata = (),
        request_id: str | None = None,
        **params: Any,
    ) -> AsyncIterator[StreamEvent]:
        """Yield one StreamEvent per token as it is made; see Client.generate_stream."""
        request = _request(prompt, params, request_id)
        deadline = self._deadline(timeout)
        for attempt in itertools.count():
            call = self._stub.GenerateStream(
                request, timeout=_remaining(deadline), metadata=self._call_metadata(metadata)
            )
            started = False
            try:
                async for message in call:
                    started = True
                    yield _event(message)
                return
            except grpc.RpcError as exc:
                # Once an event was yielded, a retry would repeat tokens the caller already has.
                wait = None if started else self._retry.delay(exc.code(), attempt, deadline)
                if wait is None:
                    raise _error(exc) from None
            finally:
                call.cancel()
            await asyncio.sleep(wait)

    async def tokenize(self, text: str, *, timeout: Timeout = _UNSET, metadata: Metadata = ()) -> list[int]:
        """Token ids of `text` under the served model's tokenizer."""
        request = gateway_pb2.TokenizeRequest(text=text)
        return list((await self._unary(self._stub.Tokenize, request, timeout, metadata)).ids)

    async def info(self, *, timeout: Timeout = _UNSET, metadata: Metadata = ()) -> Info:
        """Describe the deployment; see Client.info."""
        return _info(await self._unary(self._stub.Info, gateway_pb2.InfoRequest(), timeout, metadata))

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
