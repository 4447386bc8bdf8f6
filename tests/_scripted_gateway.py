"""A scripted gateway for the SDK's tests: a real gRPC servicer whose answers and failures a test sets."""

from __future__ import annotations

import grpc

from bloomduo.v1 import gateway_pb2, gateway_pb2_grpc


class ScriptedServicer(gateway_pb2_grpc.GenerationServiceServicer):
    """Fails each call with `code` (None: succeeds), counts calls and keeps the metadata they carried.

    GenerateStream sends `events_before_failure` token events first, then fails the same way; with no
    `code` it sends one token and the result.
    """

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.events_before_failure = 0
        self.calls = 0
        self.metadata: list[dict[str, str]] = []
        self.requests: list[gateway_pb2.GenerateRequest] = []

    def _serve(self, context: grpc.ServicerContext) -> None:
        self.calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.code is not None and not self.events_before_failure:
            context.abort(self.code, "scripted")

    def Tokenize(self, request, context):
        self._serve(context)
        return gateway_pb2.TokenizeResponse(ids=[1, 2])

    def Generate(self, request, context):
        self._serve(context)
        self.requests.append(request)
        return gateway_pb2.GenerateResponse(result=gateway_pb2.GenerateResult(text="ok"))

    def Info(self, request, context):
        self._serve(context)
        return gateway_pb2.InfoResponse(model="scripted")

    def GenerateStream(self, request, context):
        self._serve(context)
        for _ in range(self.events_before_failure if self.code is not None else 1):
            yield gateway_pb2.GenerateStreamResponse(token=gateway_pb2.Token(id=1, text="a"))
        if self.code is not None:
            context.abort(self.code, "scripted")
        yield gateway_pb2.GenerateStreamResponse(result=gateway_pb2.GenerateResult(text="a"))
