"""Python SDK for bloomduo: `Client` (blocking) and `AsyncClient` (asyncio) over the gateway's gRPC API.

    from client import Client
    with Client("localhost:50051") as bloom:
        print(bloom.generate("The capital of France is", max_new_tokens=16).text)
        for event in bloom.generate_stream("Once upon a time", max_new_tokens=32):
            print(event.token.text, end="", flush=True)

Parameter names are those of GenerateParameters in proto/bloomduo/v1/gateway.proto.
"""

from client.sdk import (
    AsyncClient,
    BloomduoError,
    Client,
    Info,
    Result,
    StreamEvent,
    Token,
)

__all__ = ["AsyncClient", "BloomduoError", "Client", "Info", "Result", "StreamEvent", "Token"]
