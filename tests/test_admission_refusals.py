"""Admission without gRPC, and the one mapping of its refusals to gRPC statuses, on a servicer alone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import REGISTRY
from tokenizers import Tokenizer, models, pre_tokenizers

from bloomduo.core.metrics import Outcome
from bloomduo.gateway.admission import Admission
from bloomduo.gateway.config import GatewayOptions, RequestLimits
from bloomduo.gateway.engine import EngineUnavailable
from bloomduo.gateway.errors import Overloaded, RequestFailed, Unavailable, ValidationError
from bloomduo.gateway.request import GenerationParameters
from bloomduo.gateway.server import STATUS_CODES, GenerationServicer
from bloomduo.gateway.stopping import FinishReason
from bloomduo.v1 import gateway_pb2

LIMITS = RequestLimits(max_concurrent_requests=2)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1, "there": 2}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


class FakeEngine:
    """What admission and the servicer read of the engine; generate() plays back `events`, then `failure`."""

    def __init__(self, serving: bool = True, in_flight: int = 0, events=(), failure=None) -> None:
        self.serving, self.in_flight = serving, in_flight
        self.running, self.waiting = [], []
        self.events, self.failure = events, failure
        self.requests = []

    async def generate(self, request):
        self.requests.append(request)
        for event in self.events:
            yield event
        if self.failure is not None:
            raise self.failure


def counted(outcome: Outcome) -> float:
    return (
        REGISTRY.get_sample_value("bloomduo_requests_total", {"outcome": outcome.value, "finish_reason": ""})
        or 0
    )


@pytest.mark.parametrize(
    ("state", "refusal", "message"),
    [
        ({"draining": True}, Unavailable, "the gateway is shutting down; retry on another"),
        ({"engine": None}, Unavailable, "the model is still loading; retry shortly"),
        ({"engine": FakeEngine(serving=False)}, Unavailable, "group is re-forming; retry shortly"),
        ({"engine": FakeEngine(in_flight=2)}, Overloaded, "(2 requests in flight); retry later"),
    ],
)
def test_a_gateway_that_cannot_take_the_request_refuses_it(tokenizer, state, refusal, message) -> None:
    admission = Admission(tokenizer, LIMITS)
    admission.engine = FakeEngine()
    for name, value in state.items():
        setattr(admission, name, value)
    before = counted(refusal.outcome)
    with pytest.raises(refusal, match=message.replace("(", r"\(").replace(")", r"\)")):
        asyncio.run(admission.admit("r", "hi", GenerationParameters()))
    assert counted(refusal.outcome) == before + 1


def test_bad_parameters_are_refused_naming_the_field(tokenizer) -> None:
    admission = Admission(tokenizer, LIMITS)
    admission.engine = FakeEngine()
    before = counted(Outcome.INVALID_ARGUMENT)
    with pytest.raises(ValidationError) as caught:
        asyncio.run(admission.admit("r", "hi", GenerationParameters(top_p=1.5)))
    assert caught.value.field_name == "top_p"
    assert counted(Outcome.INVALID_ARGUMENT) == before + 1


def test_an_admitted_request_is_validated_for_its_engine(tokenizer) -> None:
    admission = Admission(tokenizer, LIMITS)
    admission.engine = engine = FakeEngine(in_flight=1)
    admitted_engine, request = asyncio.run(admission.admit("r-7", "hi there", GenerationParameters(seed=5)))
    assert admitted_engine is engine
    assert (request.request_id, request.prompt_ids, request.sampling.seed) == ("r-7", [1, 2], 5)


def test_request_ids(tokenizer) -> None:
    admission = Admission(tokenizer, LIMITS)
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


# --- the servicer, called as gRPC would call it -------------------------------------------------------


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.metadata = None

    async def send_initial_metadata(self, metadata) -> None:
        self.metadata = metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def servicer_with(tokenizer, engine: FakeEngine | None) -> GenerationServicer:
    options = GatewayOptions(model_dir=Path("demo"), shard_targets=["a:1", "b:2"], limits=LIMITS)
    config = SimpleNamespace(vocab_size=3, hidden_size=4, n_layer=1, n_head=1)
    servicer = GenerationServicer(options, tokenizer, SimpleNamespace(config=config))
    servicer.admission.engine = engine
    return servicer


RESULT = SimpleNamespace(
    text="there",
    generated_tokens=1,
    finish_reason=FinishReason.LENGTH,
    seed=5,
    prompt_tokens=1,
    tokens=[],
)
TOKEN = SimpleNamespace(id=2, text="there", logprob=-0.5, special=False)


def call(
    servicer: GenerationServicer, method: str, request: gateway_pb2.GenerateRequest, context: FakeContext
):
    async def run():
        if method == "Generate":
            return await servicer.Generate(request, context)
        return [message async for message in servicer.GenerateStream(request, context)]

    return asyncio.run(run())


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_servicer_answers_with_the_status_of_each_failure(tokenizer, method: str) -> None:
    request = gateway_pb2.GenerateRequest(prompt="hi", request_id="r-1")
    cases = [
        (None, request, grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly"),
        (FakeEngine(in_flight=2), request, grpc.StatusCode.RESOURCE_EXHAUSTED, "retry later"),
        (
            FakeEngine(),
            gateway_pb2.GenerateRequest(prompt="hi", parameters=gateway_pb2.GenerateParameters(top_k=5000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_k: must be in [0, 1024]",
        ),
        (
            FakeEngine(),
            gateway_pb2.GenerateRequest(prompt="hi", request_id="b a d"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "request_id: ",
        ),
        (
            FakeEngine(
                events=[SimpleNamespace(token=TOKEN, result=None)],
                failure=EngineUnavailable("worker 1 failed"),
            ),
            request,
            grpc.StatusCode.UNAVAILABLE,
            "worker 1 failed",
        ),
    ]
    for engine, sent, code, details in cases:
        with pytest.raises(Aborted) as caught:
            call(servicer_with(tokenizer, engine), method, sent, FakeContext())
        assert caught.value.args[0] == code
        assert details in caught.value.args[1]


def test_servicer_converts_once_and_echoes_the_request_id(tokenizer) -> None:
    engine = FakeEngine(events=[SimpleNamespace(token=TOKEN, result=RESULT)])
    servicer, context = servicer_with(tokenizer, engine), FakeContext()
    parameters = gateway_pb2.GenerateParameters(max_new_tokens=1, seed=5, stop=["."])
    response = call(
        servicer,
        "Generate",
        gateway_pb2.GenerateRequest(prompt="hi", parameters=parameters, request_id="r-9"),
        context,
    )
    assert context.metadata == (("x-request-id", "r-9"),)
    assert (
        response.result.text == "there" and response.result.finish_reason == gateway_pb2.FINISH_REASON_LENGTH
    )
    (request,) = engine.requests
    assert (request.request_id, request.max_new_tokens, request.sampling.seed, request.stop) == (
        "r-9",
        1,
        5,
        (".",),
    )
