"""The one request schema: protobuf converts into it once, and the one validator names every bad field."""

from __future__ import annotations

import dataclasses

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from bloomduo.gateway.config import RequestLimits
from bloomduo.gateway.errors import ValidationError
from bloomduo.gateway.request import GenerationParameters, validate
from bloomduo.gateway.server import parameters_from_pb
from bloomduo.v1 import gateway_pb2

PROTO_FIELDS = gateway_pb2.GenerateParameters.DESCRIPTOR.fields


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1, "there": 2}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_the_schema_has_the_fields_of_the_wire_message() -> None:
    assert [f.name for f in dataclasses.fields(GenerationParameters)] == [f.name for f in PROTO_FIELDS]


def test_unset_fields_take_the_schema_defaults() -> None:
    assert parameters_from_pb(gateway_pb2.GenerateParameters()) == GenerationParameters()


def test_fields_set_to_zero_are_set_not_defaults() -> None:
    # Presence, not value, tells a proto3 optional field the caller set apart from one left unset.
    optional = [f.name for f in PROTO_FIELDS if f.has_presence]
    message = gateway_pb2.GenerateParameters(**dict.fromkeys(optional, 0))
    parameters = parameters_from_pb(message)
    assert all(getattr(parameters, name) == 0 for name in optional)
    assert parameters.max_new_tokens == 0 and parameters.temperature == 0.0 and parameters.seed == 0


def test_every_field_comes_across() -> None:
    # Values float32 represents exactly, so the wire changes none of them.
    values = {
        "max_new_tokens": 7,
        "do_sample": True,
        "temperature": 0.5,
        "top_k": 3,
        "top_p": 0.75,
        "typical_p": 0.25,
        "repetition_penalty": 1.5,
        "seed": 2**64 - 1,
        "stop": ("a", "停"),
        "truncate": 9,
        "return_full_text": True,
        "details": True,
        "ignore_eos": True,
        "decoder_input_details": True,
        "top_n_tokens": 5,
    }
    assert parameters_from_pb(gateway_pb2.GenerateParameters(**values)) == GenerationParameters(**values)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", 0, "max_new_tokens: must be in [1, 2047], got 0"),
        ("temperature", 0.0, "temperature: must be >= 0.001 (lower is greedy: leave do_sample off), got 0.0"),
        ("temperature", float("nan"), "temperature: must be a finite number, got nan"),
        ("top_k", -1, "top_k: must be in [0, 1024] (0 disables it), got -1"),
        ("top_p", 0.0, "top_p: must be in (0, 1], got 0.0"),
        ("top_p", 1.5, "top_p: must be in (0, 1], got 1.5"),
        ("typical_p", 0.0, "typical_p: must be in (0, 1], got 0.0"),
        (
            "repetition_penalty",
            0.0,
            "repetition_penalty: must be in [0.001, 1000.0] (1 disables it), got 0.0",
        ),
        ("seed", -1, "seed: must be in [0, 2**64 - 1], got -1"),
        # An empty stop sequence would match before any text.
        ("stop", ("ok", ""), "stop: each stop sequence must have 1 to 64 characters; sequence 1 has 0"),
        ("truncate", 0, "truncate: must be in [1, 1024], got 0"),
    ],
)
def test_the_validator_names_the_field(tokenizer: Tokenizer, field: str, value, message: str) -> None:
    parameters = GenerationParameters(**{field: value})
    with pytest.raises(ValidationError) as caught:
        validate("r", "hi there", parameters, tokenizer, RequestLimits())
    assert caught.value.field_name == field
    assert str(caught.value) == message


def test_a_valid_request_carries_the_defaults_and_a_seed(tokenizer: Tokenizer) -> None:
    request = validate("r", "hi there", GenerationParameters(), tokenizer, RequestLimits())
    assert request.prompt_ids == [1, 2]
    assert request.max_new_tokens == RequestLimits().default_max_new_tokens
    sampling = request.sampling
    assert not sampling.do_sample and sampling.repetition_penalty == 1.0 and 0 <= sampling.seed < 2**63
    assert (request.stop, request.ignore_eos, request.details, request.return_full_text) == (
        (),
        False,
        False,
        False,
    )
