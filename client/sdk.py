"""The SDK's types and the two clients; see the package docstring for an example."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from bloomduo.v1 import gateway_pb2, gateway_pb2_grpc

_FINISH_REASONS = {
    gateway_pb2.FINISH_REASON_LENGTH: "length",
    gateway_pb2.FINISH_REASON_EOS_TOKEN: "eos_token",
    gateway_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}
_PARAMETER_NAMES = frozenset(gateway_pb2.GenerateParameters.DESCRIPTOR.fields_by_name)
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class BloomduoError(Exception):
    """A failed call: `.code` is the grpc.StatusCode, the message says what went wrong."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float
    special: bool = False


@dataclass(frozen=True)
class Result:
    text: str
    generated_tokens: int
    finish_reason: str  # "length", "eos_token" or "stop_sequence"
    seed: int
    prompt_tokens: int
    tokens: list[Token] = field(default_factory=list)  # filled when details=True


@dataclass(frozen=True)
class StreamEvent:
    token: Token | None
    result: Result | None  # set on the last event only


@dataclass(frozen=True)
class Info:
    model: str
    num_shards: int
    dtype: str
    device: str
    vocab_size: int
    limits: dict[str, int]
    version: str


def _request(prompt: str, params: dict[str, Any]) -> gateway_pb2.GenerateRequest:
    unknown = set(params) - _PARAMETER_NAMES - {"request_id"}
    if unknown:
        raise TypeError(f"unknown generation parameters {sorted(unknown)}; known: {sorted(_PARAMETER_NAMES)}")
    request_id = params.pop("request_id", "")
    stop = params.pop("stop", None)
    parameters = gateway_pb2.GenerateParameters(**{k: v for k, v in params.items() if v is not None})
    if stop:
        parameters.stop.extend([stop] if isinstance(stop, str) else stop)
    return gateway_pb2.GenerateRequest(prompt=prompt, parameters=parameters, request_id=request_id)


def _token(message: gateway_pb2.Token) -> Token:
    return Token(id=message.id, text=message.text, logprob=message.logprob, special=message.special)


def _result(message: gateway_pb2.GenerateResult) -> Result:
    return Result(
        text=message.text,
        generated_tokens=message.generated_tokens,
        finish_reason=_FINISH_REASONS.get(message.finish_reason, "unspecified"),
        seed=message.seed,
        prompt_tokens=message.prompt_tokens,
        tokens=[_token(token) for token in message.tokens],
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
    )


def _error(exc: grpc.RpcError) -> BloomduoError:
    return BloomduoError(exc.code(), exc.details() or "")


class Client:
    """Blocking client. `timeout` (seconds) bounds each call; None waits as long as the server works."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = None) -> None:
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = gateway_pb2_grpc.GenerationServiceStub(self._channel)

    def generate(self, prompt: str, **params: Any) -> Result:
        try:
            response = self._stub.Generate(_request(prompt, params), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _result(response.result)

    def generate_stream(self, prompt: str, **params: Any) -> Iterator[StreamEvent]:
        call = self._stub.GenerateStream(_request(prompt, params), timeout=self.timeout)
        try:
            for message in call:
                yield _event(message)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()  # a consumer that stops early frees its place in the batch

    def tokenize(self, text: str) -> list[int]:
        try:
            return list(self._stub.Tokenize(gateway_pb2.TokenizeRequest(text=text), timeout=self.timeout).ids)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def info(self) -> Info:
        try:
            return _info(self._stub.Info(gateway_pb2.InfoRequest(), timeout=self.timeout))
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as Client, as coroutines and async iterators."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = None) -> None:
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = gateway_pb2_grpc.GenerationServiceStub(self._channel)

    async def generate(self, prompt: str, **params: Any) -> Result:
        try:
            response = await self._stub.Generate(_request(prompt, params), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return _result(response.result)

    async def generate_stream(self, prompt: str, **params: Any) -> AsyncIterator[StreamEvent]:
        call = self._stub.GenerateStream(_request(prompt, params), timeout=self.timeout)
        try:
            async for message in call:
                yield _event(message)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()

    async def tokenize(self, text: str) -> list[int]:
        try:
            response = await self._stub.Tokenize(gateway_pb2.TokenizeRequest(text=text), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return list(response.ids)

    async def info(self) -> Info:
        try:
            return _info(await self._stub.Info(gateway_pb2.InfoRequest(), timeout=self.timeout))
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
