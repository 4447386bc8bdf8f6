"""text-generation-inference's API: /generate, /generate_stream, / (its compat route), /info, /health,
/tokenize. TGI's parameters carry the names GenerationParameters has, so they pass through as they are
(the prompt is TGI's `inputs`).

`decoder_input_details` fills `details.prefill` (the prompt's tokens and logprobs, the first null) and
`top_n_tokens` (0-5) `top_tokens`, per generated token, from the model's own distribution (log_softmax of
its logits, before any penalty or warper). Refused by name unless left neutral: `best_of`,
`frequency_penalty`, `grammar`, `watermark`, `adapter_id`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from bloomduo import __version__
from bloomduo.gateway.engine import GeneratedToken, GenerationResult, TopToken
from bloomduo.gateway.http_common import (
    Body,
    Failure,
    HttpFront,
    Protocol,
    front_of,
    gathered,
    merged,
    pieces,
    refuse_unless_neutral,
)
from bloomduo.gateway.request import GenerationParameters

_ERROR_TYPES = {"unavailable": "generation", "unauthorized": "authentication", "too_large": "validation"}

TGI = Protocol(
    name="tgi",
    # 422 is TGI's answer to a request it will not run; 503 says, as to the openai SDK, "retry shortly".
    statuses={
        "validation": 422,
        "unauthorized": 401,
        "not_found": 404,
        "too_large": 413,
        "overloaded": 429,
        "unavailable": 503,
    },
    body=lambda fail: {"error": fail.message, "error_type": _ERROR_TYPES.get(fail.kind, fail.kind)},
    field_names={"prompt": "inputs"},  # TGI's name for the prompt; the parameters keep the schema's names
)
_UNIMPLEMENTED = "is not implemented by this server; leave it unset"
_NEUTRAL = {
    "best_of": ((None, 1), f"{_UNIMPLEMENTED} or 1"),
    "frequency_penalty": ((None, 0), f"{_UNIMPLEMENTED} or 0"),
    "grammar": ((None,), _UNIMPLEMENTED),
    "watermark": ((None, False), f"{_UNIMPLEMENTED} or false"),
    "adapter_id": ((None,), _UNIMPLEMENTED),
}


class Parameters(Body):
    best_of: int | None = None
    decoder_input_details: bool | None = None
    details: bool | None = None
    do_sample: bool | None = None
    frequency_penalty: float | None = None
    grammar: dict[str, Any] | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool | None = None
    adapter_id: str | None = None

    def generation(self) -> GenerationParameters:
        """GenerationParameters from the fields both have; unset ones keep the schema's defaults."""
        refuse_unless_neutral(self, _NEUTRAL)
        given = {
            f.name: value
            for f in dataclasses.fields(GenerationParameters)
            if f.name in type(self).model_fields and (value := getattr(self, f.name)) is not None
        }
        return GenerationParameters(**{**given, "stop": tuple(self.stop or ())})


class GenerateRequest(Body):
    inputs: str
    parameters: Parameters = Parameters()


class CompatRequest(GenerateRequest):
    stream: bool | None = None


class TokenizeRequest(Body):
    inputs: str
    parameters: Parameters | None = None  # TGI takes a whole generate request; the parameters do nothing


router = APIRouter()


def _token(token: GeneratedToken | TopToken) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def _top_tokens(token: GeneratedToken, parameters: GenerationParameters) -> list[dict[str, Any]] | None:
    return [_token(top) for top in token.top_tokens] if parameters.top_n_tokens else None


def _finish(result: GenerationResult) -> dict[str, Any]:
    return {
        "finish_reason": result.finish_reason.value,
        "generated_tokens": result.generated_tokens,
        "seed": result.seed,
    }


async def _generate(front: HttpFront, request: Request, body: GenerateRequest) -> dict[str, Any]:
    parameters = body.parameters.generation()
    streams = await front.admit(request.state.request_id, [(body.inputs, parameters)])
    (choice,) = await gathered(pieces(streams, ()), 1, request)
    answer: dict[str, Any] = {"generated_text": choice.result.text}
    if parameters.details:
        answer["details"] = {
            **_finish(choice.result),
            "prefill": [
                {"id": token.id, "text": token.text, "logprob": token.logprob}
                for token in choice.result.prefill
            ],
            "tokens": [_token(token) for token in choice.tokens],
            "top_tokens": [_top_tokens(t, parameters) for t in choice.tokens]
            if parameters.top_n_tokens
            else None,
            "best_of_sequences": None,
        }
    return answer


async def _generate_stream(front: HttpFront, request: Request, body: GenerateRequest) -> StreamingResponse:
    parameters = body.parameters.generation()
    streams = await front.admit(request.state.request_id, [(body.inputs, parameters)])

    async def events() -> AsyncIterator[dict[str, Any]]:
        index = itertools.count(1)
        async for _, event in merged(streams):
            result = event.result
            details = {**_finish(result), "input_length": result.prompt_tokens} if result else None
            yield {
                "index": next(index),
                "token": _token(event.token),
                "top_tokens": _top_tokens(event.token, parameters),
                "generated_text": result.text if result else None,
                "details": details if parameters.details else None,
            }

    return TGI.events(events())


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
    return await _generate(front_of(request), request, body)


@router.post("/generate_stream", response_model=None)
async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    return await _generate_stream(front_of(request), request, body)


@router.post("/", response_model=None)
async def compat_generate(body: CompatRequest, request: Request) -> list[dict[str, Any]] | StreamingResponse:
    """TGI's route for clients that post to the model's URL: a JSON array, or a stream with stream: true."""
    if body.stream:
        return await _generate_stream(front_of(request), request, body)
    return [await _generate(front_of(request), request, body)]


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    front = front_of(request)
    limits = front.info.limits
    return {
        "model_id": front.model_name,
        "model_sha": None,
        "model_dtype": front.info.dtype or None,
        "model_device_type": front.info.device or None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": limits.max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": limits.max_stop_sequences,
        "max_input_tokens": limits.max_input_tokens,
        "max_total_tokens": limits.max_total_tokens,
        "max_batch_size": limits.max_batch_size,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "bloomduo",
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }


@router.get("/health", response_model=None)
async def health(request: Request) -> Response:
    """200 while every worker serves; open without a token, like grpc.health.v1."""
    if front_of(request).serving:
        return Response(status_code=200)
    message = "the model is not serving (loading, a worker down, or draining)"
    return TGI.response(Failure("unavailable", message))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> list[dict[str, Any]]:
    encoding = front_of(request).tokenizer.encode(body.inputs, add_special_tokens=False)
    return [
        {"id": token_id, "text": body.inputs[start:stop], "start": start, "stop": stop}
        for token_id, (start, stop) in zip(encoding.ids, encoding.offsets, strict=True)
    ]
