"""Admission on a real Engine, and the servicer's one mapping of its refusals to gRPC statuses over real
gRPC on loopback.

The engine is the gateway's own, over the demo model's tokenizer and embedding and a ShardPool whose
worker address nobody listens on: put into each state through its public API (serving, requests queued
by generate() while its loop is not running), or started so that its first step finds no worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from prometheus_client import REGISTRY

from bloomduo.apps.launcher import free_port
from bloomduo.core.metrics import Outcome
from bloomduo.gateway.admission import Admission
from bloomduo.gateway.config import GatewayOptions, RequestLimits, SchedulerSettings
from bloomduo.gateway.engine import Engine
from bloomduo.gateway.errors import Overloaded, RequestFailed, Unavailable, ValidationError
from bloomduo.gateway.request import GenerationParameters, validate
from bloomduo.gateway.server import STATUS_CODES, GenerationServicer
from bloomduo.gateway.shards import ShardPool
from bloomduo.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import TinyModel

LIMITS = RequestLimits(max_concurrent_requests=2)


@asynccontextmanager
async def engine_in(
    model: TinyModel, *, queued: int = 0, serving: bool = True, started: bool = False
) -> AsyncIterator[Engine]:
    """A real Engine over a ShardPool whose worker is not there: `queued` requests wait in it (its loop
    is not running unless `started`, and then its first step fails for want of the worker)."""
    pool = ShardPool([f"127.0.0.1:{free_port()}"], model.checkpoint.config.vocab_size, step_timeout_s=10.0)
    engine = Engine(model.tokenizer, model.embedder, pool, SchedulerSettings(), eos_token_id=2)
    engine.serving = serving
    streams = [
        engine.generate(validate(f"q{n}", "queued", GenerationParameters(), model.tokenizer, LIMITS))
        for n in range(queued)
    ]
    waiting = [asyncio.ensure_future(anext(stream)) for stream in streams]
    await asyncio.sleep(0)  # each request is queued and waits for its first token
    assert engine.in_flight == queued
    if started:
        engine.start()
    try:
        yield engine
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        await engine.stop()
        await pool.close()


def counted(outcome: Outcome) -> float:
    return (
        REGISTRY.get_sample_value("bloomduo_requests_total", {"outcome": outcome.value, "finish_reason": ""})
        or 0
    )


# state: how admission and its engine stand; each sets `admission.engine` (None: still loading)
STATES = {
    "draining": ({"draining": True}, {}),
    "loading": ({"engine": None}, {}),
    "re-forming": ({}, {"serving": False}),
    "overloaded": ({}, {"queued": 2}),
}


@pytest.mark.parametrize(
    ("state", "refusal", "message"),
    [
        ("draining", Unavailable, "the gateway is shutting down; retry on another"),
        ("loading", Unavailable, "the model is still loading; retry shortly"),
        ("re-forming", Unavailable, "a shard worker failed and the group is re-forming; retry shortly"),
        ("overloaded", Overloaded, "the model is overloaded (2 requests in flight); retry later"),
    ],
)
def test_a_gateway_that_cannot_take_the_request_refuses_it(model, state, refusal, message) -> None:
    admission_state, engine_state = STATES[state]

    async def scenario() -> None:
        async with engine_in(model, **engine_state) as engine:
            admission = Admission(model.tokenizer, LIMITS)
            admission.engine = engine
            for name, value in admission_state.items():
                setattr(admission, name, value)
            before = counted(refusal.outcome)
            with pytest.raises(refusal) as refused:
                await admission.admit("r", "hi", GenerationParameters())
            assert str(refused.value) == message
            assert counted(refusal.outcome) == before + 1

    asyncio.run(scenario())


def test_bad_parameters_are_refused_naming_the_field(model) -> None:
    async def scenario() -> None:
        async with engine_in(model) as engine:
            admission = Admission(model.tokenizer, LIMITS)
            admission.engine = engine
            before = counted(Outcome.INVALID_ARGUMENT)
            with pytest.raises(ValidationError) as caught:
                await admission.admit("r", "hi", GenerationParameters(top_p=1.5))
            assert caught.value.field_name == "top_p"
            assert counted(Outcome.INVALID_ARGUMENT) == before + 1

    asyncio.run(scenario())


def test_an_admitted_request_is_validated_for_its_engine(model) -> None:
    async def scenario() -> None:
        async with engine_in(model, queued=1) as engine:  # one below the limit of two
            admission = Admission(model.tokenizer, LIMITS)
            admission.engine = engine
            admitted, request = await admission.admit("r-7", "hi there", GenerationParameters(seed=5))
            assert admitted is engine
            assert (request.request_id, request.prompt_ids, request.sampling.seed) == (
                "r-7",
                model.tokenizer.encode("hi there").ids,
                5,
            )

    asyncio.run(scenario())


def test_request_ids(model) -> None:
    admission = Admission(model.tokenizer, LIMITS)
    assert admission.request_id("client/42:a.b_c-d") == "client/42:a.b_c-d"
    made = admission.request_id("")
    assert len(made) == 32 and int(made, 16) >= 0
    for bad in ("héllo", "line\nbreak", "x" * 129):
        with pytest.raises(ValidationError) as caught:
            admission.request_id(bad)
        assert caught.value.field_name == "request_id"


def test_every_failure_maps_to_a_grpc_status() -> None:
    for failure in (ValidationError, Overloaded, Unavailable):
        assert issubclass(failure, RequestFailed)
        assert failure.outcome in STATUS_CODES
    assert STATUS_CODES[Overloaded.outcome] == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- the servicer over real gRPC on loopback ----------------------------------------------------------
#
# What the real stack already answers is tested there (tests/test_serving.py, test_faults.py,
# test_request_property.py): INVALID_ARGUMENT naming the field, overload and draining on Generate, a
# worker lost mid-stream on GenerateStream. Here every refusal goes through both methods, with the
# request id echoed on each; the echo of a served request is checked on the real stack at the end.

ACCEPTED = gateway_pb2.GenerateRequest(prompt="hi", request_id="r-1")


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
@pytest.mark.parametrize(
    ("state", "sent", "code", "details"),
    [
        ("loading", ACCEPTED, grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly"),
        ("draining", ACCEPTED, grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; retry on another"),
        ("re-forming", ACCEPTED, grpc.StatusCode.UNAVAILABLE, "the group is re-forming; retry shortly"),
        ("overloaded", ACCEPTED, grpc.StatusCode.RESOURCE_EXHAUSTED, "(2 requests in flight); retry later"),
        (
            "no worker",
            ACCEPTED,
            grpc.StatusCode.UNAVAILABLE,
            "the model failed while serving this request: shard worker 127.0.0.1:",
        ),
        (
            "serving",
            gateway_pb2.GenerateRequest(
                prompt="hi", request_id="r-1", parameters=gateway_pb2.GenerateParameters(top_k=5000)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_k: must be in [0, 1024]",
        ),
        (
            "serving",
            gateway_pb2.GenerateRequest(prompt="hi", request_id="b a d"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "request_id: ",
        ),
    ],
)
def test_servicer_answers_each_refusal_with_its_status_and_echoes_the_request_id(
    model, method: str, state: str, sent: gateway_pb2.GenerateRequest, code, details: str
) -> None:
    admission_state, engine_state = STATES.get(state, ({}, {}))
    if state == "no worker":
        engine_state = {"started": True}
    options = GatewayOptions(model_dir=model.model_dir, shard_targets=["127.0.0.1:1"], limits=LIMITS)

    async def scenario() -> grpc.aio.AioRpcError:
        async with engine_in(model, **engine_state) as engine:
            servicer = GenerationServicer(options, model.tokenizer, model.checkpoint)
            servicer.admission.engine = engine
            for name, value in admission_state.items():
                setattr(servicer.admission, name, value)
            server = grpc.aio.server()
            gateway_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = gateway_pb2_grpc.GenerationServiceStub(channel)
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        if method == "Generate":
                            await stub.Generate(sent, timeout=30)
                        else:
                            async for _ in stub.GenerateStream(sent, timeout=30):
                                pass
                    return caught.value
            finally:
                await server.stop(None)

    error = asyncio.run(scenario())
    assert error.code() == code
    assert details in error.details()
    # The id is echoed as soon as it is known to be safe: on every refusal but that of the id itself.
    echoed = dict(error.initial_metadata() or ()).get("x-request-id")
    assert echoed == (None if sent.request_id == "b a d" else "r-1")


def test_served_requests_echo_their_request_id(tiny_stack) -> None:
    parameters = gateway_pb2.GenerateParameters(max_new_tokens=3, seed=5, do_sample=True, ignore_eos=True)
    with grpc.insecure_channel(tiny_stack.target) as channel:
        stub = gateway_pb2_grpc.GenerationServiceStub(channel)
        response, call = stub.Generate.with_call(
            gateway_pb2.GenerateRequest(prompt="hi", parameters=parameters, request_id="r-9"), timeout=60
        )
        stream = stub.GenerateStream(
            gateway_pb2.GenerateRequest(prompt="hi", parameters=parameters), timeout=60
        )
        events = list(stream)
        made = dict(stream.initial_metadata())["x-request-id"]
    assert dict(call.initial_metadata())["x-request-id"] == "r-9"
    assert (response.result.seed, response.result.generated_tokens) == (5, 3)
    # Without an id, the gateway makes one and sends it before the first token.
    assert len(made) == 32 and int(made, 16) >= 0
    assert events[-1].result.text == response.result.text
