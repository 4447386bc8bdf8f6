"""The SDK's own behaviour: retries and backoff, deadlines, typed results, metadata.

Most tests run against the real two-shard stack. The exact retry contract (which status codes are
retried, how often, and a stream only before its first event) and the metadata on the wire are
checked against a small scripted gRPC server, because the real gateway neither fails on demand nor
reads the authorization header yet.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor

from bloomduo.apps.launcher import free_port
from bloomduo.client import AsyncClient, BloomduoError, Client, FinishReason
from bloomduo.v1 import gateway_pb2, gateway_pb2_grpc
from tests._scripted_gateway import ScriptedServicer

LONG = {"max_new_tokens": 2000, "ignore_eos": True}  # takes seconds on the tiny model


def test_call_options_do_not_collide_with_generation_parameters() -> None:
    parameters = set(gateway_pb2.GenerateParameters.DESCRIPTOR.fields_by_name)
    assert not parameters & {"timeout", "metadata", "request_id"}


def test_finish_reason_is_an_enum_that_compares_as_str(tiny_stack) -> None:
    with Client(tiny_stack.target) as bloom:
        result = bloom.generate("Hello", max_new_tokens=3, ignore_eos=True, details=True, request_id="r-1")
    assert result.finish_reason is FinishReason.LENGTH
    assert result.finish_reason == "length" and f"{result.finish_reason}" == str(result.finish_reason)
    assert str(result.finish_reason) == "length"
    assert "finish_reason='length'" in repr(result) and "tokens=<3 tokens>" in repr(result)


def test_unavailable_is_retried_with_backoff_then_raised() -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    with Client(target, retries=0) as bloom:
        started = time.monotonic()
        with pytest.raises(BloomduoError) as caught:
            bloom.tokenize("x")
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 0.5
    with Client(target, retries=3, backoff_s=0.2) as bloom:
        started = time.monotonic()
        with pytest.raises(BloomduoError) as caught:
            bloom.tokenize("x")
        elapsed = time.monotonic() - started
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    # Waits of 0.2, 0.4 and 0.8 s, each between half and all of it: 0.7 to 1.4 s in all.
    assert 0.7 <= elapsed < 2.5, elapsed


def test_async_unavailable_is_retried_with_backoff_then_raised() -> None:
    async def call() -> tuple[grpc.StatusCode, float]:
        async with AsyncClient(f"127.0.0.1:{free_port()}", retries=2, backoff_s=0.2) as bloom:
            started = time.monotonic()
            try:
                await bloom.info()
            except BloomduoError as exc:
                return exc.code, time.monotonic() - started
        raise AssertionError("info() reached a server where none listens")

    code, elapsed = asyncio.run(call())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert 0.3 <= elapsed < 1.5, elapsed  # waits of 0.2 and 0.4 s, half to all of each


@contextmanager
def late_port(target: str, delay_s: float) -> Iterator[str]:
    """A loopback port that starts listening after `delay_s` and then forwards connections to target."""
    port, stop = free_port(), threading.Event()
    host, target_port = target.rsplit(":", 1)

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            source.close()
            sink.close()

    def serve() -> None:
        if stop.wait(delay_s):
            return
        with socket.create_server(("127.0.0.1", port)) as server:
            server.settimeout(0.05)
            while not stop.is_set():
                try:
                    accepted, _ = server.accept()
                except TimeoutError:
                    continue
                upstream = socket.create_connection((host, int(target_port)))
                for ends in ((accepted, upstream), (upstream, accepted)):
                    threading.Thread(target=pump, args=ends, daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join()


def test_retries_reach_a_gateway_that_comes_up(tiny_stack) -> None:
    with late_port(tiny_stack.target, 0.5) as target, Client(target, retries=6, backoff_s=0.2) as bloom:
        assert bloom.generate("Hello", max_new_tokens=2).generated_tokens == 2
    with late_port(tiny_stack.target, 0.5) as target, Client(target, retries=6, backoff_s=0.2) as bloom:
        events = list(bloom.generate_stream("Hello", max_new_tokens=2))
    assert events[-1].result is not None and events[-1].result.generated_tokens == 2

    async def stream(target: str) -> list:
        async with AsyncClient(target, retries=6, backoff_s=0.2) as bloom:
            return [event async for event in bloom.generate_stream("Hello", max_new_tokens=2)]

    with late_port(tiny_stack.target, 0.5) as target:
        assert len(asyncio.run(stream(target))) == 2


def test_invalid_argument_is_not_retried(tiny_stack) -> None:
    with Client(tiny_stack.target, retries=3, backoff_s=2.0) as bloom:
        started = time.monotonic()
        with pytest.raises(BloomduoError) as caught:
            bloom.generate("hi", top_p=1.5)
        elapsed = time.monotonic() - started
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert elapsed < 1.0, elapsed  # a retry would have waited at least 1 s first


def test_per_call_timeout_ends_a_long_generation_and_the_stack_keeps_serving(tiny_stack) -> None:
    with Client(tiny_stack.target, timeout=0.001, retries=3) as bloom:
        # The per-call value wins over the client's (here hopeless) default.
        assert bloom.info(timeout=30).num_shards == 2
        for call in (
            lambda: bloom.generate("Once", timeout=0.3, **LONG),
            lambda: list(bloom.generate_stream("Once", timeout=0.3, **LONG)),
        ):
            started = time.monotonic()
            with pytest.raises(BloomduoError) as caught:
                call()
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 1.5  # not retried
        assert bloom.generate("still here", max_new_tokens=2, timeout=None).generated_tokens == 2


def test_async_per_call_timeout_and_results(tiny_stack) -> None:
    async def calls() -> None:
        async with AsyncClient(tiny_stack.target, timeout=30) as bloom:
            with pytest.raises(BloomduoError) as caught:
                await bloom.generate("Once", timeout=0.3, **LONG)
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(BloomduoError) as caught:
                async for _ in bloom.generate_stream("Once", timeout=0.3, **LONG):
                    pass
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            result = await bloom.generate("still here", max_new_tokens=2, ignore_eos=True)
            assert result.finish_reason == FinishReason.LENGTH == "length"
            assert await bloom.tokenize("Hello world", timeout=10)

    asyncio.run(calls())


def test_token_and_metadata_calls_work_on_the_stack(tiny_stack) -> None:
    with Client(tiny_stack.target, token="s3cret", metadata=[("x-team", "a")]) as bloom:
        assert bloom.tokenize("Hello", metadata=[("x-call", "1")])


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedServicer, str]]:
    servicer, server = ScriptedServicer(), grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gateway_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.mark.parametrize(
    ("code", "retry_overloaded", "calls"),
    [
        (grpc.StatusCode.UNAVAILABLE, False, 3),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False, 1),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True, 3),
        (grpc.StatusCode.INVALID_ARGUMENT, True, 1),
        (grpc.StatusCode.CANCELLED, True, 1),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True, 1),
    ],
)
def test_which_codes_are_retried(scripted, code, retry_overloaded, calls) -> None:
    servicer, target = scripted
    servicer.code = code
    options = {"retries": 2, "backoff_s": 0.01, "retry_overloaded": retry_overloaded}
    with Client(target, **options) as bloom, pytest.raises(BloomduoError) as caught:
        bloom.tokenize("x")
    assert caught.value.code == code and servicer.calls == calls

    async def info() -> None:
        async with AsyncClient(target, **options) as bloom:
            await bloom.info()

    with pytest.raises(BloomduoError):
        asyncio.run(info())
    assert servicer.calls == 2 * calls


def test_a_stream_is_retried_only_before_its_first_event(scripted) -> None:
    servicer, target = scripted
    servicer.code = grpc.StatusCode.UNAVAILABLE
    with Client(target, retries=2, backoff_s=0.01) as bloom:
        with pytest.raises(BloomduoError):
            list(bloom.generate_stream("x"))
        assert servicer.calls == 3
        servicer.events_before_failure = 1
        received = []
        with pytest.raises(BloomduoError) as caught:
            received.extend(bloom.generate_stream("x"))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(received) == 1 and servicer.calls == 4

    async def stream() -> int:
        async with AsyncClient(target, retries=2, backoff_s=0.01) as bloom:
            count = 0
            with pytest.raises(BloomduoError):
                async for _ in bloom.generate_stream("x"):
                    count += 1
            return count

    assert asyncio.run(stream()) == 1 and servicer.calls == 5


def test_token_and_metadata_are_sent_on_every_call(scripted) -> None:
    servicer, target = scripted
    with Client(target, token="s3cret", metadata=[("x-team", "a")]) as bloom:
        bloom.info()
        bloom.tokenize("x", metadata=[("x-call", "1")])

    async def info() -> None:
        async with AsyncClient(target, token="s3cret") as bloom:
            await bloom.info()

    asyncio.run(info())
    assert [m["authorization"] for m in servicer.metadata] == ["Bearer s3cret"] * 3
    assert servicer.metadata[0]["x-team"] == servicer.metadata[1]["x-team"] == "a"
    assert servicer.metadata[1]["x-call"] == "1" and "x-call" not in servicer.metadata[0]


# --- arguments the request message cannot carry never leave the client ---------------------------------

PARAMETER_FIELDS = gateway_pb2.GenerateParameters.DESCRIPTOR.fields
UINT32, UINT64 = FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64
FLOAT, BOOL, STRING = FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_STRING
BAD_VALUES = {
    UINT32: [-1, 2**32, 1.5, True, "3"],
    UINT64: [-1, 2**64, 2.0, False, "3"],
    FLOAT: ["1.0", True, 1e39, -3.5e38, [0.5]],
    BOOL: [1, "yes", 0.0],
    STRING: [3, [1], [b"x"], b"x", ["ok", "a\ud800"]],  # stop: a str or a list of str
}
EDGE_VALUES = {
    UINT32: [0, 2**32 - 1],
    UINT64: [0, 2**64 - 1],
    FLOAT: [0, -3.4e38, 3.4028234e38, math.inf],
    BOOL: [True, False],
    STRING: ["one", ("a", "停")],
}
BAD_ARGUMENTS = [(field.name, value) for field in PARAMETER_FIELDS for value in BAD_VALUES[field.type]] + [
    ("prompt", 3),
    ("prompt", "a\udfffb"),
    ("request_id", 7),
]


def test_every_parameter_field_is_of_a_type_the_sdk_checks() -> None:
    for field in PARAMETER_FIELDS:
        assert field.type in BAD_VALUES and field.is_repeated == (field.type == STRING), field.name


@pytest.mark.parametrize(("name", "value"), BAD_ARGUMENTS)
def test_a_bad_argument_is_refused_before_sending_naming_it(scripted, name: str, value) -> None:
    servicer, target = scripted
    arguments = {"prompt": "hi", name: value}
    with Client(target) as bloom:
        for call in (
            lambda: bloom.generate(**arguments),
            lambda: list(bloom.generate_stream(**arguments)),
        ):
            with pytest.raises(BloomduoError) as caught:
                call()
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.message.startswith(f"{name}: "), caught.value.message

    async def generate() -> None:
        async with AsyncClient(target) as bloom:
            await bloom.generate(**arguments)

    with pytest.raises(BloomduoError) as caught:
        asyncio.run(generate())
    assert caught.value.message.startswith(f"{name}: ")
    assert servicer.calls == 0


def test_arguments_at_the_edges_of_their_types_arrive_unchanged(scripted) -> None:
    servicer, target = scripted
    with Client(target) as bloom:
        for field in PARAMETER_FIELDS:
            for value in EDGE_VALUES[field.type]:
                assert bloom.generate("hi", **{field.name: value}).text == "ok"
                sent = servicer.requests[-1].parameters
                if field.is_repeated:
                    assert list(sent.stop) == ([value] if isinstance(value, str) else list(value))
                else:
                    # float32 keeps 24 significant bits: half an ulp of relative rounding.
                    expected = pytest.approx(value, rel=2**-24) if field.type == FLOAT else value
                    assert getattr(sent, field.name) == expected, field.name
        bloom.generate("hi", top_k=None, stop=None)
    assert servicer.requests[-1].parameters == gateway_pb2.GenerateParameters()
