"""Interceptors at the public door: requests that cannot be parsed, and the bearer-token check."""

from __future__ import annotations

import hmac
import inspect
from collections.abc import Awaitable, Callable

import grpc

PROTECTED_PREFIX = "/bloomduo.v1.GenerationService/"
DENIED = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self.expected = f"Bearer {token}".encode()

    def authorized(self, metadata: tuple[tuple[str, str | bytes], ...]) -> bool:
        supplied = dict(metadata).get("authorization", "")
        supplied = supplied.encode() if isinstance(supplied, str) else supplied
        return hmac.compare_digest(supplied, self.expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        if self.authorized(details.invocation_metadata or ()):
            return handler
        if handler.unary_stream:

            async def deny_stream(request, context: grpc.aio.ServicerContext):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
                yield  # makes this an async generator, like the handler it replaces

            return grpc.unary_stream_rpc_method_handler(
                deny_stream, handler.request_deserializer, handler.response_serializer
            )

        async def deny(request, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

        return grpc.unary_unary_rpc_method_handler(
            deny, handler.request_deserializer, handler.response_serializer
        )


class _Undecodable:
    def __init__(self, error: Exception) -> None:
        self.error = error


class RejectUndecodable(grpc.aio.ServerInterceptor):
    """A request protobuf cannot parse (say, a string that is not UTF-8) gets INVALID_ARGUMENT.

    gRPC's own deserializer failure answers UNKNOWN, which tells the caller nothing.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        parse = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # protobuf raises DecodeError, sometimes other errors
                return _Undecodable(exc)

        def message(request: _Undecodable) -> str:
            return f"the request is not a valid {details.method.rsplit('/', 1)[-1]} message: {request.error}"

        if handler.unary_stream:
            behaviour = handler.unary_stream
            if not inspect.isasyncgenfunction(behaviour):
                # grpc.health.v1's Watch answers through context.write(), a coroutine: wrapped as an
                # async generator it failed every time, and with it the SDK's client-side health checks.
                return handler

            async def checked_stream(request, context: grpc.aio.ServicerContext):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message(request))
                async for response in behaviour(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                checked_stream, deserialize, handler.response_serializer
            )

        behaviour = handler.unary_unary

        async def checked(request, context: grpc.aio.ServicerContext):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message(request))
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(checked, deserialize, handler.response_serializer)
