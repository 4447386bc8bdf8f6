"""Every request parameter is bounded: validate() and the real server under random requests (hypothesis).

Unit level: validate() returns a GenerationRequest within every bound of RequestLimits, or raises a
ValidationError naming a GenerationParameters field or "prompt", never any other exception; and it
accepts exactly the requests that a plain reading of the documented bounds accepts.

Server level: random GenerateRequests, including what only a raw protobuf client sends (set versus unset
optional fields, NaN and infinite floats, uint32/uint64 extremes, control characters, prompts past the
1 MiB message limit), get OK, INVALID_ARGUMENT naming the field, or RESOURCE_EXHAUSTED for the size;
and the server answers fixed requests the same before and after.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import grpc
import pytest
import tokenizers
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from bloomduo.gateway.config import RequestLimits
from bloomduo.gateway.errors import ValidationError
from bloomduo.gateway.request import MAX_SEED, GenerationParameters, GenerationRequest, validate
from bloomduo.gateway.server import parameters_from_pb
from bloomduo.v1 import gateway_pb2, gateway_pb2_grpc

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


@pytest.fixture(scope="module")
def gateway(tiny_stack) -> Iterator[Gateway]:
    with grpc.insecure_channel(tiny_stack.target) as channel:
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
        tokenizer = tokenizers.Tokenizer.from_file(str(tiny_stack.options.model_dir / "tokenizer.json"))
        yield Gateway(stub, limits, tokenizer)


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
def raw_requests(draw: st.DrawFn, gw: Gateway) -> gateway_pb2.GenerateRequest:
    """Any GenerateRequest protobuf carries; every optional field either unset or set to anything.

    Half the requests are tame (each field out of bounds one time in ten) so that many are accepted
    and generate under unusual but valid parameters; the other half draw every field from anything.
    """
    limits = gw.limits
    valid = _valid_values(limits)
    tame = draw(st.booleans(), label="tame")

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


def test_the_server_answers_the_same_after_random_requests(
    tiny_stack, gateway: Gateway, answers_before: list[list[int]]
) -> None:
    """Runs after the property test (file order): the fixed requests get the same tokens, nothing is held."""
    assert fixed_answers(gateway.stub) == answers_before
    deadline = time.monotonic() + 10
    while True:
        load = gateway.stub.Info(gateway_pb2.InfoRequest(), timeout=10).load
        if not (load.running_requests or load.waiting_requests or any(load.worker_cached_sequences)):
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


def test_undecodable_request_is_invalid_argument(tiny_stack) -> None:
    with grpc.insecure_channel(tiny_stack.target) as channel:
        generate = channel.unary_unary("/bloomduo.v1.GenerationService/Generate")
        # Field 1 (prompt), length 2, bytes that are not UTF-8.
        with pytest.raises(grpc.RpcError) as caught:
            generate(b"\x0a\x02\xff\xfe", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
