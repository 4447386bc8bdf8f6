"""Bearer-token check on the public API; health and reflection stay open for probes."""

from __future__ import annotations

import hmac
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
