"""Python SDK for bloomduo: `Client` (blocking) and `AsyncClient` (asyncio) over the gateway's gRPC API.

    from bloomduo.client import Client
    with Client("localhost:50051", timeout=60) as bloom:
        result = bloom.generate("The capital of France is", max_new_tokens=16)
        print(result.text, result.finish_reason)
        for event in bloom.generate_stream("Once upon a time", max_new_tokens=32, timeout=10):
            print(event.token.text, end="", flush=True)

The target is any gRPC target: "host:port", or several replicas of the gateway, as
"dns:///bloomduo-headless:50051" (every address the name resolves to) or "ipv4:10.0.0.1:50051,10.0.0.2:50051";
calls then go round-robin to the replicas that are reachable and SERVING.

Parameter names are those of GenerateParameters in proto/bloomduo/v1/gateway.proto. Calls that fail
with UNAVAILABLE are retried with exponential backoff (`retries=`, `backoff_s=`), each time on the next
replica; every method takes a per-call `timeout=` and `metadata=`; `token=` sends a bearer token on every
call. Failures raise BloomduoError with the gRPC status code. A bad argument raises BloomduoError with
INVALID_ARGUMENT and a message that starts with its name ("top_k: ..."), from the server, or from the SDK
before sending when the request message cannot carry it (wrong type, out of the field's range); an unknown
parameter name raises TypeError.
"""

from bloomduo.client.sdk import (
    AsyncClient,
    BloomduoError,
    Client,
    FinishReason,
    Info,
    Load,
    PromptToken,
    Result,
    StreamEvent,
    Token,
    TopToken,
)

__all__ = [
    "AsyncClient",
    "BloomduoError",
    "Client",
    "FinishReason",
    "Info",
    "Load",
    "PromptToken",
    "Result",
    "StreamEvent",
    "Token",
    "TopToken",
]
