"""Every request parameter is bounded: validate() and the real server under random requests (hypothesis).

Unit level: validate() returns a GenerationRequest within every bound of RequestLimits, or raises a
ValidationError naming a GenerationParameters field or "prompt", never any other exception; and it
accepts exactly the requests that a plain reading of the documented bounds accepts.

Server level: random GenerateRequests, including what only a raw protobuf client sends (set versus unset
optional fields, NaN and infinite floats, uint32/uint64 extremes, control characters, prompts past the
1 MiB message limit), get OK, INVALID_ARGUMENT naming the field, or RESOURCE_EXHAUSTED for the size;
and the server answers fixed requests the same before and after.

HTTP level: the same random requests as bodies of /v1/completions, /v1/chat/completions, /generate and
/generate_stream, and worse (wrong types, unknown fields, malformed JSON, lone surrogates, n and logprobs
out of bounds, bodies over the limit, with and without a content-length), get 200 or a 4xx in the
protocol's error shape naming the field, never a 5xx or a dropped connection; a refusal gRPC gives for
the equivalent parameters comes with the same words.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import grpc
import httpx2
import pytest
import tokenizers
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from bloomduo.apps.launcher import Stack, free_port
from bloomduo.gateway.chat_template import load_chat_template
from bloomduo.gateway.config import RequestLimits
from bloomduo.gateway.errors import ValidationError
from bloomduo.gateway.request import MAX_SEED, GenerationParameters, GenerationRequest, validate
from bloomduo.gateway.server import parameters_from_pb
from bloomduo.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import running_stack

FIELDS = frozenset(field.name for field in fields(GenerationParameters))
ERROR_FIELDS = FIELDS | {"prompt"}
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
SPECIAL_TEXTS = ("<unk>", "<s>", "</s>", "<pad>")  # the demo tokenizer's special tokens, as in BLOOM
WHITESPACE = " \t\n\r\x0b\x0c\x85\xa0\u2028\u3000"

# --- strategies shared by both levels -----------------------------------------------------------------

# st.text() draws from every code point except surrogates: NUL and other control characters, emoji,
# CJK, combining marks, private use.
PROMPTS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["北京是中国的首都，上海", "Emoji 🎉🎊🥳 🇫🇷", "家族👨‍👩‍👧‍👦", "日本語：東京", "Hello world"]
    ),
    st.text(st.sampled_from(WHITESPACE), min_size=1, max_size=8),  # only whitespace
    st.lists(st.sampled_from(SPECIAL_TEXTS), min_size=1, max_size=4).map("".join),  # only special tokens
    # From a few hundred tokens to well past max_input_tokens=1024.
    st.builds(
        lambda unit, n: unit * n, st.sampled_from(["word ", "数", "🎉", "a b "]), st.integers(50, 2500)
    ),
)
STOPS = st.lists(st.text(max_size=70), max_size=6)
# Floats with NaN, infinities, signed zeros, subnormals and the largest finite values, plus the
# edges of the documented bounds and ordinary values.
EDGE_FLOATS = [0.0, -0.0, 5e-324, 1e-45, 1e-4, 1e-3, 0.5, 1.0, 1.0000001, 1e3, 1000.1, 3.4e38, 1.8e308]
FLOATS = st.one_of(st.floats(), st.sampled_from(EDGE_FLOATS), st.floats(0.001, 2.0))
# Protobuf rounds the 64-bit values to float32 on the wire.
FLOATS32 = st.one_of(
    st.floats(width=32), st.sampled_from(EDGE_FLOATS), st.floats(0.001, 2.0), st.floats(0.0, 1e-30)
)
UINT32 = st.one_of(
    st.integers(0, 40), st.integers(0, UINT32_MAX), st.sampled_from([1023, 1024, 1025, UINT32_MAX])
)
UINT64 = st.one_of(st.integers(0, UINT64_MAX), st.sampled_from([0, 2**63, UINT64_MAX]))


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def expected_violations(
    prompt: str, params: GenerationParameters, tokenizer: tokenizers.Tokenizer, limits: RequestLimits
) -> set[str]:
    """Every field that breaks a documented bound, read off the bounds independently of validate()."""
    bad: set[str] = set()
    if not prompt or not _is_text(prompt):
        bad.add("prompt")
    max_new_tokens = limits.default_max_new_tokens if params.max_new_tokens is None else params.max_new_tokens
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        bad.add("max_new_tokens")
    if not math.isfinite(params.temperature) or params.temperature < limits.min_temperature:
        bad.add("temperature")
    if not 0 <= params.top_k <= limits.max_top_k:
        bad.add("top_k")
    for name in ("top_p", "typical_p"):
        value = getattr(params, name)
        if math.isnan(value) or not 0 < value <= 1:
            bad.add(name)
    penalty = params.repetition_penalty
    if math.isnan(penalty) or not limits.min_repetition_penalty <= penalty <= limits.max_repetition_penalty:
        bad.add("repetition_penalty")
    if params.seed is not None and not 0 <= params.seed <= UINT64_MAX:
        bad.add("seed")
    stop = params.stop
    if len(stop) > limits.max_stop_sequences or not all(
        1 <= len(s) <= limits.max_stop_sequence_length and _is_text(s) for s in stop
    ):
        bad.add("stop")
    truncate = params.truncate
    if truncate is not None and not 1 <= truncate <= limits.max_input_tokens:
        bad.add("truncate")
    if "prompt" not in bad:
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        if truncate is not None and "truncate" not in bad:
            ids = ids[-truncate:]
        if not ids or len(ids) > limits.max_input_tokens:
            bad.add("prompt")
        elif "max_new_tokens" not in bad and len(ids) + max_new_tokens > limits.max_total_tokens:
            bad.add("max_new_tokens")
    return bad


def assert_within_limits(
    request: GenerationRequest,
    prompt: str,
    params: GenerationParameters,
    tokenizer: tokenizers.Tokenizer,
    limits: RequestLimits,
) -> None:
    """An accepted request keeps what the caller asked for and sits inside every bound."""
    full_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    truncate = params.truncate
    assert request.prompt_ids == (full_ids if truncate is None else full_ids[-truncate:])
    assert 1 <= len(request.prompt_ids) <= limits.max_input_tokens
    assert 1 <= request.max_new_tokens <= limits.max_new_tokens
    assert len(request.prompt_ids) + request.max_new_tokens <= limits.max_total_tokens
    if params.max_new_tokens is None:
        assert request.max_new_tokens == limits.default_max_new_tokens
    else:
        assert request.max_new_tokens == params.max_new_tokens
    sampling = request.sampling
    assert sampling.do_sample == params.do_sample
    assert math.isfinite(sampling.temperature) and sampling.temperature >= limits.min_temperature
    assert 0 <= sampling.top_k <= limits.max_top_k
    assert 0 < sampling.top_p <= 1 and 0 < sampling.typical_p <= 1
    assert limits.min_repetition_penalty <= sampling.repetition_penalty <= limits.max_repetition_penalty
    assert 0 <= sampling.seed <= MAX_SEED
    if params.seed is not None:
        assert sampling.seed == params.seed
    assert request.stop == params.stop
    assert len(request.stop) <= limits.max_stop_sequences
    assert all(1 <= len(s) <= limits.max_stop_sequence_length for s in request.stop)


# --- unit level: validate() ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(demo_model) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(demo_model() / "tokenizer.json"))


# Unlike protobuf, GenerationParameters holds negative and oversized integers, and strings with lone
# surrogates (JSON carries both).
INTS = st.one_of(
    st.integers(-3, 40),
    st.integers(-(2**70), 2**70),
    st.sampled_from([1023, 1024, 1025, 2047, 2048, UINT32_MAX, MAX_SEED, MAX_SEED + 1]),
)
SURROGATE_TEXT = st.text(st.characters(categories=["Cs"]) | st.characters(), min_size=1, max_size=8)
UNIT_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": INTS,
        "do_sample": st.booleans(),
        "temperature": FLOATS,
        "top_k": INTS,
        "top_p": FLOATS,
        "typical_p": FLOATS,
        "repetition_penalty": FLOATS,
        "seed": INTS,
        "stop": st.one_of(STOPS, st.lists(SURROGATE_TEXT, max_size=2)),
        "truncate": INTS,
        "return_full_text": st.booleans(),
        "details": st.booleans(),
        "ignore_eos": st.booleans(),
    },
)
# Small limits make each bound, and the prompt + new tokens total, easy to land on either side of.
SMALL_LIMITS = st.builds(
    RequestLimits,
    max_input_tokens=st.integers(1, 64),
    max_total_tokens=st.integers(1, 96),
    default_max_new_tokens=st.integers(1, 32),
    max_stop_sequences=st.integers(0, 4),
    max_stop_sequence_length=st.integers(1, 8),
    max_top_k=st.integers(0, 1030),
)
NAN, INF = float("nan"), float("inf")


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.one_of(PROMPTS, SURROGATE_TEXT),
    params=UNIT_PARAMS,
    limits=st.just(RequestLimits()) | SMALL_LIMITS,
)
# The list, one example each, so none depends on the random draw.
@example(prompt="", params={}, limits=RequestLimits())
@example(prompt="word " * 1500, params={}, limits=RequestLimits())
@example(prompt="word " * 1500, params={"truncate": 1024}, limits=RequestLimits())
@example(prompt="hi", params={"max_new_tokens": 0}, limits=RequestLimits())
@example(prompt="hi", params={"max_new_tokens": UINT32_MAX}, limits=RequestLimits())
@example(prompt="word " * 1000, params={"max_new_tokens": 1024}, limits=RequestLimits())
@example(prompt="hi", params={"do_sample": True, "temperature": 0.0}, limits=RequestLimits())
@example(prompt="hi", params={"do_sample": True, "temperature": NAN}, limits=RequestLimits())
@example(prompt="hi", params={"do_sample": True, "temperature": 1e-45}, limits=RequestLimits())
@example(prompt="hi", params={"temperature": INF}, limits=RequestLimits())
@example(prompt="hi", params={"top_p": 0.0}, limits=RequestLimits())
@example(prompt="hi", params={"top_p": 1.0000001}, limits=RequestLimits())
@example(prompt="hi", params={"typical_p": NAN}, limits=RequestLimits())
@example(prompt="hi", params={"top_k": -1}, limits=RequestLimits())
@example(prompt="hi", params={"top_k": UINT32_MAX}, limits=RequestLimits())
@example(prompt="hi", params={"repetition_penalty": 0.0}, limits=RequestLimits())
@example(prompt="hi", params={"repetition_penalty": 1e-45}, limits=RequestLimits())
@example(prompt="hi", params={"repetition_penalty": 3.4e38}, limits=RequestLimits())
@example(prompt="hi", params={"seed": -1}, limits=RequestLimits())
@example(prompt="hi", params={"seed": MAX_SEED + 1}, limits=RequestLimits())
@example(prompt="hi", params={"seed": MAX_SEED}, limits=RequestLimits())
@example(prompt="hi", params={"truncate": 0}, limits=RequestLimits())
@example(prompt="hi", params={"truncate": UINT32_MAX}, limits=RequestLimits())
@example(prompt="hi", params={"stop": ["a", "b", "c", "d", "e"]}, limits=RequestLimits())
@example(prompt="hi", params={"stop": ["x" * 65]}, limits=RequestLimits())
@example(prompt="hi", params={"stop": [""]}, limits=RequestLimits())
@example(prompt="hi", params={"stop": ["\ud800"]}, limits=RequestLimits())
@example(prompt="a\udfffb", params={}, limits=RequestLimits())
@example(prompt="\x00\x01\x1b[0m", params={"stop": ["\x00"]}, limits=RequestLimits())
@example(prompt=" \t\n", params={}, limits=RequestLimits())
@example(prompt="</s><pad>", params={}, limits=RequestLimits())
def test_validate_accepts_exactly_the_documented_bounds(
    tokenizer: tokenizers.Tokenizer, prompt: str, params: dict[str, Any], limits: RequestLimits
) -> None:
    parameters = GenerationParameters(**{**params, "stop": tuple(params.get("stop", ()))})
    expected = expected_violations(prompt, parameters, tokenizer, limits)
    try:
        request = validate("r-1", prompt, parameters, tokenizer, limits)
    except ValidationError as exc:
        assert exc.field_name in ERROR_FIELDS
        assert str(exc).startswith(f"{exc.field_name}: ")
        assert exc.field_name in expected, f"rejected {exc.field_name!r}, expected one of {expected}: {exc}"
        return
    assert not expected, f"accepted, but {expected} break the documented bounds"
    assert_within_limits(request, prompt, parameters, tokenizer, limits)


def test_truncate_accepts_a_prompt_past_max_input_tokens(tokenizer: tokenizers.Tokenizer) -> None:
    prompt = "word " * 1500
    with pytest.raises(ValidationError) as caught:
        validate("r", prompt, GenerationParameters(), tokenizer, RequestLimits())
    assert caught.value.field_name == "prompt" and "truncate" in str(caught.value)
    request = validate("r", prompt, GenerationParameters(truncate=1024), tokenizer, RequestLimits())
    assert len(request.prompt_ids) == 1024


# --- server level: raw protobuf at the running stack ---------------------------------------------------

STATUS_OK = grpc.StatusCode.OK
DOCUMENTED = {STATUS_OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
CALL_TIMEOUT_S = 60.0  # a hung call fails the test rather than stalling it
# Fixed requests, answered before and after the random ones: greedy, and sampled with a seed.
FIXED = [
    gateway_pb2.GenerateRequest(
        prompt="The same question, every time:",
        parameters=gateway_pb2.GenerateParameters(max_new_tokens=16, ignore_eos=True, details=True),
    ),
    gateway_pb2.GenerateRequest(
        prompt="北京",
        parameters=gateway_pb2.GenerateParameters(
            max_new_tokens=16, ignore_eos=True, details=True, do_sample=True, seed=7, top_p=0.9
        ),
    ),
]


@dataclass(frozen=True)
class Gateway:
    stub: gateway_pb2_grpc.GenerationServiceStub
    limits: RequestLimits
    tokenizer: tokenizers.Tokenizer
    url: str  # the HTTP front's (OpenAI and TGI)
    model: str  # the served model's name, OpenAI's `model`
    render_chat: Callable[[list[dict[str, Any]]], str]  # messages -> prompt, as the gateway renders them


@pytest.fixture(scope="module")
def stack(demo_model) -> Iterator[Stack]:
    """The tiny stack with its HTTP front on, so the same requests reach one server by both doors."""
    with running_stack(demo_model(), num_shards=2, http_port=free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(stack: Stack) -> Iterator[Gateway]:
    with grpc.insecure_channel(stack.target) as channel:
        stub = gateway_pb2_grpc.GenerationServiceStub(channel)
        served = stub.Info(gateway_pb2.InfoRequest(), timeout=10).limits
        # The bounds Info serves; the rest are the gateway's defaults.
        limits = RequestLimits(
            max_input_tokens=served.max_input_tokens,
            max_total_tokens=served.max_total_tokens,
            max_stop_sequences=served.max_stop_sequences,
            max_stop_sequence_length=served.max_stop_sequence_length,
            max_top_k=served.max_top_k,
        )
        assert served.max_new_tokens == limits.max_new_tokens
        model_dir = stack.options.model_dir
        tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        url = f"http://127.0.0.1:{stack.options.http_port}"
        render_chat = load_chat_template(model_dir, None)
        yield Gateway(stub, limits, tokenizer, url, model_dir.name, render_chat)


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    result: gateway_pb2.GenerateResult | None = None
    stream_texts: list[str] | None = None


def call(
    stub: gateway_pb2_grpc.GenerationServiceStub, request: gateway_pb2.GenerateRequest, stream: bool
) -> Outcome:
    try:
        if not stream:
            return Outcome(STATUS_OK, "", stub.Generate(request, timeout=CALL_TIMEOUT_S).result)
        events = list(stub.GenerateStream(request, timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "")
    # The last event carries the result; none before it does.
    assert events and events[-1].HasField("result")
    assert not any(event.HasField("result") for event in events[:-1])
    return Outcome(STATUS_OK, "", events[-1].result, [event.token.text for event in events])


def fixed_answers(stub: gateway_pb2_grpc.GenerationServiceStub) -> list[list[int]]:
    return [[t.id for t in stub.Generate(r, timeout=CALL_TIMEOUT_S).result.tokens] for r in FIXED]


def _tail_tokens(gw: Gateway, prompt: str, truncate: int | None) -> int:
    ids = gw.tokenizer.encode(prompt, add_special_tokens=False).ids if _is_text(prompt) else []
    return len(ids if truncate is None or truncate == 0 else ids[-truncate:])


def _valid_values(limits: RequestLimits) -> dict[str, st.SearchStrategy]:
    """Values inside the documented bounds, field by field, edges included."""
    return {
        "temperature": st.one_of(
            st.floats(limits.min_temperature, 100.0), st.sampled_from([1e-3, 1.0, 3.4e38])
        ),
        "top_k": st.integers(0, limits.max_top_k),
        "top_p": st.floats(0.0, 1.0, exclude_min=True),
        "typical_p": st.floats(0.0, 1.0, exclude_min=True),
        "repetition_penalty": st.floats(limits.min_repetition_penalty, limits.max_repetition_penalty),
        "seed": UINT64,
        "truncate": st.integers(1, limits.max_input_tokens),
        "stop": st.lists(
            st.text(min_size=1, max_size=limits.max_stop_sequence_length), max_size=limits.max_stop_sequences
        ),
    }


WILD_VALUES: dict[str, st.SearchStrategy] = {
    "temperature": FLOATS32,
    "top_k": UINT32,
    "top_p": FLOATS32,
    "typical_p": FLOATS32,
    "repetition_penalty": FLOATS32,
    "seed": UINT64,
    "truncate": UINT32,
    "stop": STOPS,
}


@st.composite
def raw_requests(draw: st.DrawFn, gw: Gateway, tame: bool | None = None) -> gateway_pb2.GenerateRequest:
    """Any GenerateRequest protobuf carries; every optional field either unset or set to anything.

    Half the requests are tame (each field out of bounds one time in ten) so that many are accepted
    and generate under unusual but valid parameters; the other half draw every field from anything.
    `tame` chooses instead of a draw.
    """
    limits = gw.limits
    valid = _valid_values(limits)
    tame = draw(st.booleans(), label="tame") if tame is None else tame

    def value(name: str) -> Any:
        wild = draw(st.integers(0, 9)) == 0 if tame else draw(st.booleans())
        return draw(WILD_VALUES[name] if wild else valid[name])

    # One prompt in twenty is large: past the 1 MiB message limit (RESOURCE_EXHAUSTED), or under it
    # with far too many tokens (the gateway tokenizes it all, which takes a while).
    large = st.sampled_from(
        ["🎉" * (limits.max_request_bytes // 4 + 1000), "x" * (limits.max_request_bytes + 1), "big " * 50_000]
    )
    prompt = draw(st.integers(0, 19).flatmap(lambda i: large if i == 0 else PROMPTS))
    parameters = gateway_pb2.GenerateParameters(
        do_sample=draw(st.booleans()),
        return_full_text=draw(st.booleans()),
        details=draw(st.booleans()),
        ignore_eos=draw(st.booleans()),
        stop=value("stop"),
    )
    for name in ("temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "seed", "truncate"):
        if draw(st.booleans()):  # set or left unset
            setattr(parameters, name, value(name))
    # A valid max_new_tokens stays small so accepted requests finish fast; the large ones are all
    # past a bound: the max_new_tokens limit, or prompt + new past max_total_tokens.
    truncate = parameters.truncate if parameters.HasField("truncate") else None
    over_total = limits.max_total_tokens - _tail_tokens(gw, prompt, truncate) + 1
    choices = [st.none(), st.integers(1, 8)]
    if not tame:
        too_many = [0, limits.max_new_tokens + 1, 2**31, UINT32_MAX, max(over_total, 1)]
        choices.append(st.sampled_from(too_many))
    max_new_tokens = draw(st.one_of(choices))
    if max_new_tokens is not None:
        parameters.max_new_tokens = max_new_tokens
    request_id = draw(st.one_of(st.just(""), st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", max_size=32)))
    return gateway_pb2.GenerateRequest(prompt=prompt, parameters=parameters, request_id=request_id)


def expected_outcome(gw: Gateway, request: gateway_pb2.GenerateRequest) -> tuple[grpc.StatusCode, Any]:
    """What the server must answer: computed with the same validate() on the same tokenizer and limits."""
    if request.ByteSize() > gw.limits.max_request_bytes:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, None
    params = parameters_from_pb(request.parameters)
    try:
        validated = validate("local", request.prompt, params, gw.tokenizer, gw.limits)
    except ValidationError as exc:
        return grpc.StatusCode.INVALID_ARGUMENT, exc.field_name
    return STATUS_OK, validated


@pytest.fixture(scope="module")
def answers_before(gateway: Gateway) -> list[list[int]]:
    return fixed_answers(gateway.stub)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(data=st.data())
def test_random_requests_get_only_documented_codes(
    gateway: Gateway, answers_before: list[list[int]], data: st.DataObject
) -> None:
    request = data.draw(raw_requests(gateway), label="request")
    stream = data.draw(st.booleans(), label="stream")
    code, expected = expected_outcome(gateway, request)
    outcome = call(gateway.stub, request, stream)
    event(f"{outcome.code.name} {outcome.details.split(':', 1)[0][:40]}")

    assert outcome.code in DOCUMENTED, outcome
    if outcome.code == grpc.StatusCode.INVALID_ARGUMENT:
        field_name = outcome.details.split(":", 1)[0]
        assert field_name in ERROR_FIELDS, outcome.details
    assert outcome.code == code, (outcome.code, outcome.details[:200], code, expected)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert outcome.details.startswith(f"{expected}: ")
    if code != STATUS_OK:
        return
    validated: GenerationRequest = expected
    result = outcome.result
    # The strategy keeps accepted requests short; a long one would mean it let a slow case through.
    assert validated.max_new_tokens <= 20
    assert 1 <= result.generated_tokens <= validated.max_new_tokens
    assert result.prompt_tokens == len(validated.prompt_ids)
    if request.parameters.HasField("seed"):
        assert result.seed == request.parameters.seed
    if request.parameters.details:
        assert len(result.tokens) == result.generated_tokens
        assert all(math.isfinite(token.logprob) for token in result.tokens)
    if outcome.stream_texts is not None:
        generated = "".join(outcome.stream_texts)
        assert result.text == (
            request.prompt + generated if request.parameters.return_full_text else generated
        )


# --- server level: the same requests, and worse, over HTTP ---------------------------------------------

OPENAI, TGI = "openai", "tgi"
PATHS = {
    "/v1/completions": OPENAI,
    "/v1/chat/completions": OPENAI,
    "/generate": TGI,
    "/generate_stream": TGI,
}
REFUSED = {OPENAI: 400, TGI: 422}  # a request that breaks a bound
TOO_LARGE = 413
JSON = {"content-type": "application/json"}
# What each route calls the schema's fields, where it differs: chat's prompt is its messages.
HTTP_NAMES = {
    "/v1/completions": {"max_new_tokens": "max_tokens"},
    "/v1/chat/completions": {"max_new_tokens": "max_tokens", "prompt": "messages"},
    "/generate": {"prompt": "inputs"},
    "/generate_stream": {"prompt": "inputs"},
}
WRONG_TYPES = {  # values no lax reading turns into the field's type
    "int": st.sampled_from(["x", 1.5, [1], {"a": 1}]),
    "float": st.sampled_from(["x", [0.5], {"a": 1}]),
    "bool": st.sampled_from([2, "maybe", [True], {"a": 1}]),
    "str": st.sampled_from([1.5, {"a": 1}, [1.5], True]),
}
FIELD_TYPES = {
    OPENAI: {"max_tokens": "int", "temperature": "float", "top_p": "float", "n": "int", "seed": "int",
             "stream": "bool", "ignore_eos": "bool", "model": "str", "stop": "str"},
    TGI: {"max_new_tokens": "int", "temperature": "float", "top_p": "float", "top_k": "int",
          "typical_p": "float", "repetition_penalty": "float", "seed": "int", "truncate": "int",
          "do_sample": "bool", "details": "bool", "stop": "str", "top_n_tokens": "int"},
}  # fmt: skip
# n and logprobs past their bounds: refused by the HTTP schema itself, before any generation.
OUT_OF_BOUNDS = {
    "n": st.sampled_from([0, -1, 17, 2**70]),
    "logprobs": st.sampled_from([-1, 6, 2**70]),
    "top_logprobs": st.sampled_from([-1, 6]),
}


@dataclass(frozen=True)
class HttpCase:
    """A request body, and what it must get."""

    path: str
    body: bytes
    # The generations it asks for, in the order the front admits them; None for a body refused before
    # any (`field` names what the refusal must name, None where nothing can be named).
    jobs: list[tuple[str, GenerationParameters]] | None
    field: str | None = None

    @property
    def protocol(self) -> str:
        return PATHS[self.path]


def _set_fields(parameters: gateway_pb2.GenerateParameters) -> dict[str, Any]:
    """The fields a caller set: the present optional ones and the rest that differ from their default."""
    found = {}
    for f in parameters.DESCRIPTOR.fields:
        value = getattr(parameters, f.name)
        if parameters.HasField(f.name) if f.has_presence else value:
            found[f.name] = list(value) if f.name == "stop" else value
    return found


def _tgi_case(draw: st.DrawFn, request: gateway_pb2.GenerateRequest, path: str) -> HttpCase:
    """TGI names the parameters as GenerationParameters does: they pass as they are, but for ignore_eos,
    which TGI lacks, and top_n_tokens and decoder_input_details, which protobuf clients rarely set."""
    parameters = copy.deepcopy(request.parameters)
    parameters.ignore_eos = False
    parameters.decoder_input_details = draw(st.booleans())
    parameters.top_n_tokens = draw(st.integers(0, 7))  # past its bound (5) one time in four
    body = {"inputs": request.prompt, "parameters": _set_fields(parameters)}
    return HttpCase(path, _encode(body), [(request.prompt, parameters_from_pb(parameters))])


def _openai_case(draw: st.DrawFn, gw: Gateway, request: gateway_pb2.GenerateRequest, path: str) -> HttpCase:
    """OpenAI's subset of the parameters: temperature 0 is greedy and unset is 1 (sampled), choice i of
    n draws with seed + i, one generation per prompt and choice."""
    pb = request.parameters
    body: dict[str, Any] = {"model": gw.model}
    chat = path.endswith("/chat/completions")
    top_n, prompt_logprobs, prompt_only = 0, False, False
    if chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
        prompts = [gw.render_chat(body["messages"])]
        if draw(st.booleans()):
            body["logprobs"] = True
            body["top_logprobs"] = top_n = draw(st.integers(0, 5))
    else:
        prompts = draw(st.sampled_from([[request.prompt], [request.prompt, "Hello world"]]))
        body["prompt"] = prompts[0] if len(prompts) == 1 and draw(st.booleans()) else prompts
        body["echo"] = echo = draw(st.booleans())
        logprobs = draw(st.one_of(st.none(), st.integers(0, 5)))
        if logprobs is not None:
            body["logprobs"] = top_n = logprobs
        prompt_logprobs = echo and logprobs is not None
        prompt_only = echo and pb.HasField("max_new_tokens") and pb.max_new_tokens == 0
    max_tokens = pb.max_new_tokens if pb.HasField("max_new_tokens") else None
    if max_tokens is not None:
        body["max_completion_tokens" if chat and draw(st.booleans()) else "max_tokens"] = max_tokens
    if not pb.do_sample:
        body["temperature"] = 0
    elif pb.HasField("temperature"):
        body["temperature"] = pb.temperature
    for name in ("top_p", "seed"):
        if pb.HasField(name):
            body[name] = getattr(pb, name)
    if pb.stop:
        body["stop"] = pb.stop[0] if len(pb.stop) == 1 and draw(st.booleans()) else list(pb.stop)
    if pb.ignore_eos:
        body["ignore_eos"] = True
    body["n"] = n = draw(st.integers(1, 3))
    body["stream"] = draw(st.booleans())
    temperature = body.get("temperature", 1.0)
    if temperature < 0:  # OpenAI's own bound: gRPC has no equivalent (do_sample off is its greedy)
        return HttpCase(path, _encode(body), None, "temperature")
    seed = pb.seed if pb.HasField("seed") else None
    choices = [
        GenerationParameters(
            max_new_tokens=1 if prompt_only else max_tokens,
            # Anything but 0, NaN included, samples at that temperature, checked as gRPC checks it.
            **({"do_sample": True, "temperature": temperature} if temperature != 0 else {}),
            top_p=pb.top_p if pb.HasField("top_p") else 1.0,
            seed=None if seed is None else seed + i,
            stop=tuple(pb.stop),
            ignore_eos=pb.ignore_eos,
            decoder_input_details=prompt_logprobs,
            top_n_tokens=top_n,
        )
        for i in range(n)
    ]
    return HttpCase(path, _encode(body), [(prompt, choice) for prompt in prompts for choice in choices])


def _encode(body: Any, ascii_only: bool = False) -> bytes:
    # Python's json writes NaN and Infinity, as JSON clients in Python and JavaScript may send them;
    # "surrogatepass" writes a lone surrogate as the invalid UTF-8 a broken client sends.
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def http_cases(draw: st.DrawFn, gw: Gateway) -> HttpCase:
    """raw_requests, mostly tame, as HTTP bodies; one in two mangled in one of the ways below."""
    request = draw(raw_requests(gw, tame=draw(st.integers(0, 3)) > 0), label="request")
    path = draw(st.sampled_from(sorted(PATHS)), label="path")
    case = _tgi_case(draw, request, path) if PATHS[path] == TGI else _openai_case(draw, gw, request, path)
    if not draw(st.booleans()):
        event("mangled: no")
        return case
    how = draw(st.sampled_from(["type", "unknown", "bounds", "malformed", "surrogate", "huge"]))
    event(f"mangled: {how}")
    body = json.loads(case.body)
    # TGI's parameters sit in an object of their own.
    params, prefix = (body["parameters"], "parameters.") if case.protocol == TGI else (body, "")
    if how == "type":
        name, kind = draw(st.sampled_from(sorted(FIELD_TYPES[case.protocol].items())))
        params[name] = draw(WRONG_TYPES[kind])
        return HttpCase(path, _encode(body), None, prefix + name)
    if how == "unknown":
        name = "x_" + draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
        params[name] = draw(st.sampled_from([None, 1, "on", [1.5], {"a": {}}]))
        return HttpCase(path, _encode(body), None, prefix + name)
    if how == "bounds":
        if case.protocol == TGI:  # TGI's best_of is refused past 1, as it has no best_of
            params["best_of"] = draw(st.integers(2, 20))
            return HttpCase(path, _encode(body), None, "best_of")
        names = ["n", "top_logprobs" if path.endswith("/chat/completions") else "logprobs"]
        name = draw(st.sampled_from(names))
        body[name] = draw(OUT_OF_BOUNDS[name])
        if name == "top_logprobs":
            body["logprobs"] = True
        return HttpCase(path, _encode(body), None, name)
    if how == "surrogate":
        text = "a\udc80b"
        if case.protocol == TGI:
            body["inputs"] = text
        else:
            # The prompt is checked first, but for OpenAI's own bound on temperature.
            body["temperature"] = 0
            if "messages" in body:
                body["messages"][0]["content"] = text
            else:
                body["prompt"] = text
        # Escaped (\udc80), the server reads a string it must refuse; raw, the body is not UTF-8.
        ascii_only = draw(st.booleans())
        field = {TGI: "inputs", OPENAI: "messages" if "messages" in body else "prompt"}[case.protocol]
        return HttpCase(path, _encode(body, ascii_only), None, field if ascii_only else None)
    if how == "malformed":
        raw = case.body
        broken = draw(
            st.sampled_from(
                [raw[: len(raw) // 2], raw + b"}", b"\xff" + raw, b"{'model': 1}", b"", b"[]", b"null", b"1"]
            )
        )
        return HttpCase(path, broken, None, None)
    # huge: past the body limit, the big part in a field no parser reaches
    pad = "x" * (gw.limits.max_request_bytes + 1)
    params["x_pad"] = pad
    return HttpCase(path, _encode(body), None, None)


def _grpc_refusal(gw: Gateway, prompt: str, parameters: GenerationParameters) -> str | None:
    """The gRPC refusal of the same generation; None when protobuf cannot carry it (a lone surrogate, a
    negative integer, seed + i past 2**64 - 1)."""
    try:
        values = {k: v for k, v in asdict(parameters).items() if v is not None}
        request = gateway_pb2.GenerateRequest(
            prompt=prompt, parameters=gateway_pb2.GenerateParameters(**values)
        )
        request.SerializeToString()
    except (ValueError, TypeError, OverflowError):
        return None
    outcome = call(gw.stub, request, stream=False)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    return outcome.details


def _renamed(path: str, message: str) -> str:
    field_name, rest = message.split(":", 1)
    return HTTP_NAMES[path].get(field_name, field_name) + ":" + rest


def _error(protocol: str, response: httpx2.Response) -> tuple[str, str | None]:
    """The refusal's message and the field it names, from the protocol's error shape (and only that)."""
    body = response.json()
    if protocol == TGI:
        assert set(body) == {"error", "error_type"}, body
        assert isinstance(body["error"], str) and isinstance(body["error_type"], str), body
        message = body["error"]
        return message, message.split(":", 1)[0] if ":" in message else None
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and isinstance(error["type"], str), body
    return error["message"], error["param"]


def _events(response: httpx2.Response) -> list[Any]:
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def _check_answer(case: HttpCase, validated: list[GenerationRequest], response: httpx2.Response) -> None:
    """A 200: every asked generation, each within its max_new_tokens, a stream that ends properly."""
    most = sum(request.max_new_tokens for request in validated)
    if response.headers["content-type"].startswith("text/event-stream"):
        events = _events(response)
        if case.protocol == OPENAI:
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-3:]
        else:
            assert events[-1]["generated_text"] is not None, events[-1]
            assert not any("error" in e for e in events), events[-3:]
            assert 1 <= len(events) <= most, len(events)
        return
    body = response.json()
    if case.protocol == TGI:
        assert isinstance(body["generated_text"], str), body
        if "details" in body:
            assert 1 <= body["details"]["generated_tokens"] <= most
        return
    assert len(body["choices"]) == len(validated), body
    assert {choice["finish_reason"] for choice in body["choices"]} <= {"stop", "length"}, body
    assert body["usage"]["completion_tokens"] <= most, body


def expected_http(gw: Gateway, case: HttpCase) -> tuple[int, Any]:
    """(status, what to check): 413 for the size, the first refusal of the generations in the order the
    front admits them, or 200 with them all validated."""
    if len(case.body) > gw.limits.max_request_bytes:
        return TOO_LARGE, None
    if case.jobs is None:
        return REFUSED[case.protocol], case.field
    validated = []
    for prompt, parameters in case.jobs:
        try:
            validated.append(validate("local", prompt, parameters, gw.tokenizer, gw.limits))
        except ValidationError as exc:
            return REFUSED[case.protocol], (prompt, parameters, exc)
    return 200, validated


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=gateway.url, timeout=CALL_TIMEOUT_S) as client:
        yield client


@settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(data=st.data())
def test_random_http_bodies_get_200_or_a_refusal_in_the_protocols_shape(
    gateway: Gateway, http: httpx2.Client, answers_before: list[list[int]], data: st.DataObject
) -> None:
    case = data.draw(http_cases(gateway), label="case")
    status, expected = expected_http(gateway, case)
    response = http.post(case.path, content=case.body, headers=JSON)
    event(f"{case.path} {response.status_code}")
    if status == TOO_LARGE:
        # Sent again in chunks, with no content-length to refuse it by: the limit holds while reading.
        half = len(case.body) // 2
        chunked = http.post(case.path, content=iter([case.body[:half], case.body[half:]]), headers=JSON)
        assert chunked.status_code == TOO_LARGE, (chunked.status_code, chunked.text[:300])
        _error(case.protocol, chunked)

    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code != 200:
        message, param = _error(case.protocol, response)
    assert response.status_code == status, (response.status_code, response.text[:300], expected)
    if status == 200:
        _check_answer(case, expected, response)
    elif isinstance(expected, tuple):  # a bound of the schema: gRPC's refusal, word for word
        prompt, parameters, exc = expected
        assert message == _renamed(case.path, str(exc)), (message, str(exc))
        assert param == _renamed(case.path, exc.field_name + ":")[:-1]
        if (grpc_details := _grpc_refusal(gateway, prompt, parameters)) is not None:
            assert message == _renamed(case.path, grpc_details)
    elif expected is not None:  # a refusal by the HTTP schema, naming the field
        assert param is not None and (param == expected or param.startswith(expected + ".")), (param, message)
        assert message.startswith(param), message


@pytest.mark.parametrize(
    ("path", "content", "status", "message"),
    [
        # NaN is neither < 0 nor > 0: OpenAI's temperature once served it greedy without a word.
        (
            "/v1/completions",
            b'{"model": "MODEL", "prompt": "hi", "temperature": NaN}',
            400,
            "temperature: must be a finite number, got nan",
        ),
        # Not UTF-8: FastAPI's own 400, once in its {"detail"} shape, which neither protocol's clients read.
        ("/v1/completions", b'\xff{"model": "MODEL"}', 400, "the body is not valid JSON: "),
        ("/generate", b'{"inputs": "\xff"}', 422, "the body is not valid JSON: "),
        # TGI calls the prompt `inputs`.
        ("/generate", b'{"inputs": ""}', 422, "inputs: must not be empty"),
        # Each generation counts against max_concurrent_requests (128): many prompts times n once
        # queued past it in one request.
        (
            "/v1/completions",
            b'{"model": "MODEL", "prompt": [' + b'"a", ' * 64 + b'"a"], "n": 2}',
            400,
            "n: the prompts times n make 130 generations, more than max_concurrent_requests=128",
        ),
    ],
)
def test_http_refusals_the_property_test_found(
    gateway: Gateway, http: httpx2.Client, path: str, content: bytes, status: int, message: str
) -> None:
    content = content.replace(b"MODEL", gateway.model.encode())
    response = http.post(path, content=content, headers=JSON)
    assert response.status_code == status, response.text
    assert _error(PATHS[path], response)[0].startswith(message), response.text


def test_a_chunked_body_is_held_to_the_limit(gateway: Gateway, http: httpx2.Client) -> None:
    """Without a content-length no header bounds the body: the front counts it as it reads."""
    over = iter([b" " * 65536] * (gateway.limits.max_request_bytes // 65536 + 2))
    response = http.post("/generate", content=over, headers=JSON)
    assert response.status_code == TOO_LARGE, response.text
    assert _error(TGI, response)[0].startswith("the body has more bytes than the limit")
    body = json.dumps({"inputs": "chunked", "parameters": {"max_new_tokens": 2}}).encode()
    response = http.post("/generate", content=iter([body[:5], body[5:]]), headers=JSON)
    assert response.status_code == 200 and response.json()["generated_text"], response.text


def test_the_server_answers_the_same_after_random_requests(
    gateway: Gateway, answers_before: list[list[int]]
) -> None:
    """Runs after the property tests (file order): the fixed requests get the same tokens, nothing is held."""
    assert fixed_answers(gateway.stub) == answers_before
    deadline = time.monotonic() + 10
    while True:
        load = gateway.stub.Info(gateway_pb2.InfoRequest(), timeout=10).load
        held = {load.kept_sequences}  # the last request's cache, kept for a next turn
        if not (load.running_requests or load.waiting_requests) and set(load.worker_cached_sequences) == held:
            break
        assert time.monotonic() < deadline, f"requests still held after the run: {load}"
        time.sleep(0.1)


@pytest.mark.parametrize(
    "params",
    [
        # At and past the edges of each bound; every sampled case on a prompt with repeated tokens, so the
        # repetition penalty applies.
        {"do_sample": True, "temperature": 1e-45},
        {"do_sample": True, "temperature": 1e-3},
        {"do_sample": True, "temperature": 3.4e38},
        {"do_sample": True, "repetition_penalty": 1e-45},
        {"do_sample": True, "repetition_penalty": 1e-3, "temperature": 1e-3},
        {"do_sample": True, "repetition_penalty": 1e3, "top_p": 1e-45},
        {"do_sample": True, "repetition_penalty": 3.4e38},
        {"repetition_penalty": 1e-45},
        {"repetition_penalty": 1e-3},
        {"do_sample": True, "typical_p": 1e-45, "top_k": 1},
        {"do_sample": True, "top_k": 1024, "seed": UINT64_MAX},
    ],
)
def test_extreme_parameters_are_served_or_rejected(gateway: Gateway, params: dict[str, Any]) -> None:
    """Near-zero divisors once overflowed the logits to inf and failed every request of the batch."""
    parameters = gateway_pb2.GenerateParameters(max_new_tokens=8, details=True, ignore_eos=True, **params)
    request = gateway_pb2.GenerateRequest(prompt="the the the the cat cat", parameters=parameters)
    outcome = call(gateway.stub, request, stream=False)
    assert outcome.code in {STATUS_OK, grpc.StatusCode.INVALID_ARGUMENT}, outcome
    if outcome.code == STATUS_OK:
        assert outcome.result.generated_tokens == 8
        assert all(math.isfinite(token.logprob) for token in outcome.result.tokens), outcome.result.tokens
    else:
        assert outcome.details.split(":", 1)[0] in params, outcome.details


def test_oversized_message_is_resource_exhausted(gateway: Gateway) -> None:
    request = gateway_pb2.GenerateRequest(prompt="x" * (gateway.limits.max_request_bytes + 1))
    for stream in (False, True):
        outcome = call(gateway.stub, request, stream)
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    assert call(gateway.stub, FIXED[0], stream=False).code == STATUS_OK


@pytest.mark.parametrize("request_id", ["héllo", "line\nbreak", "x" * 20_000])
def test_any_request_id_gets_a_documented_code(gateway: Gateway, request_id: str) -> None:
    request = gateway_pb2.GenerateRequest(
        prompt="hi", parameters=gateway_pb2.GenerateParameters(max_new_tokens=2), request_id=request_id
    )
    outcome = call(gateway.stub, request, stream=False)
    assert outcome.code in {STATUS_OK, grpc.StatusCode.INVALID_ARGUMENT}, outcome
    if outcome.code != STATUS_OK:
        assert outcome.details.startswith("request_id"), outcome


def test_undecodable_request_is_invalid_argument(stack: Stack) -> None:
    with grpc.insecure_channel(stack.target) as channel:
        generate = channel.unary_unary("/bloomduo.v1.GenerationService/Generate")
        # Field 1 (prompt), length 2, bytes that are not UTF-8.
        with pytest.raises(grpc.RpcError) as caught:
            generate(b"\x0a\x02\xff\xfe", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
