"""OpenAI's API under /v1: models, completions and chat completions, translated onto GenerationParameters.

Log-probabilities: completions' `logprobs` N (0-5) is the engine's top_n_tokens, and `echo` with it its
decoder_input_details (the prompt's tokens with their logprobs, the first null), as vLLM serves them and
lm-evaluation-harness's `local-completions` scores with. `top_logprobs` dicts and chat's `top_logprobs`
hold the N likeliest tokens under the model's own distribution (log_softmax of its logits, before
temperature or top_p), as vLLM's; a completion's dict holds the chosen token as well, so it may have
N + 1 entries. `max_tokens: 0` with `echo` scores the prompt alone: the engine computes the first new
token from the prompt's last row anyway, so it runs one token and leaves it out of the answer.
Differences from OpenAI's service, each refused by name rather than ignored: `logprobs` and
`top_logprobs` above 5; penalties, `logit_bias`, `best_of` and `suffix` are accepted only at values
that ask for nothing. `max_tokens` defaults to the gateway's default (20).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import tokenizers
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from bloomduo.gateway.engine import GeneratedToken, GenerationResult, PromptToken, TopToken
from bloomduo.gateway.errors import ValidationError
from bloomduo.gateway.http_common import (
    Body,
    Choice,
    Failure,
    HttpFront,
    Protocol,
    front_of,
    gathered,
    pieces,
    refuse_unless_neutral,
    seeds,
)
from bloomduo.gateway.request import MAX_TOP_N_TOKENS, GenerationParameters
from bloomduo.gateway.stopping import FinishReason

MAX_N = 16  # choices per prompt: each is a sequence of its own in the batch

_ERROR_TYPES = {
    "validation": ("invalid_request_error", None),
    "unauthorized": ("invalid_request_error", "invalid_api_key"),
    "not_found": ("invalid_request_error", "model_not_found"),
    "too_large": ("invalid_request_error", "request_too_large"),
    "overloaded": ("rate_limit_error", "rate_limit_exceeded"),
    "unavailable": ("server_error", "service_unavailable"),
}


def _error_body(failure: Failure) -> dict[str, Any]:
    kind, code = _ERROR_TYPES[failure.kind]
    return {"error": {"message": failure.message, "type": kind, "param": failure.param, "code": code}}


OPENAI = Protocol(
    name="openai",
    statuses={
        "validation": 400,
        "unauthorized": 401,
        "not_found": 404,
        "too_large": 413,
        "overloaded": 429,
        "unavailable": 503,
    },
    body=_error_body,
    field_names={"max_new_tokens": "max_tokens"},
)

FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
}
_NEUTRAL = {
    "presence_penalty": ((None, 0), "is not implemented by this server; leave it unset or 0"),
    "frequency_penalty": ((None, 0), "is not implemented by this server; leave it unset or 0"),
    "logit_bias": ((None, {}), "is not implemented by this server; leave it unset"),
}


class StreamOptions(Body):
    include_usage: bool = False


class _Generation(Body):
    """What completions and chat completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default is 1: sampling
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: benchmarks generate exactly max_tokens
    top_k: int | None = None  # vLLM's extension too: -1 or 0 keeps every token
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def parameters(
        self, max_tokens: int | None, top_n_tokens: int = 0, prompt_logprobs: bool = False
    ) -> list[GenerationParameters]:
        """One GenerationParameters per choice."""
        refuse_unless_neutral(self, _NEUTRAL)
        temperature = 1.0 if self.temperature is None else self.temperature
        if temperature < 0:
            raise ValidationError("temperature", f"must be >= 0 (0 is greedy), got {temperature}")
        # Anything but 0 samples: NaN and infinity go on to validate(), which refuses them in gRPC's words
        # (NaN, neither < 0 nor > 0, was once served greedy without a word).
        sampled = {"do_sample": True, "temperature": temperature} if temperature != 0 else {}
        return [
            GenerationParameters(
                max_new_tokens=max_tokens,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k in (None, -1) else self.top_k,
                seed=seed,
                stop=self.stops,
                ignore_eos=self.ignore_eos,
                decoder_input_details=prompt_logprobs,
                top_n_tokens=top_n_tokens,
                **sampled,
            )
            for seed in seeds(self.seed, self.n)
        ]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def rendered(self) -> dict[str, Any]:
        parts = self.content
        content = parts if isinstance(parts, str) else "".join(part.text for part in parts or ())
        return {"role": self.role, "content": content, **({"name": self.name} if self.name else {})}


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)


router = APIRouter(prefix="/v1")


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    front = front_of(request)
    model = {"id": front.model_name, "object": "model", "created": front.created, "owned_by": "bloomduo"}
    return {"object": "list", "data": [model]}


def _check_model(front: HttpFront, model: str) -> JSONResponse | None:
    if model == front.model_name:
        return None
    message = f"The model {model!r} does not exist; this server serves {front.model_name!r}"
    return OPENAI.response(Failure("not_found", message, "model"))


def _text_of_ids(tokenizer: tokenizers.Tokenizer, ids: list[int]) -> str:
    """The prompt the engine takes (text) for a prompt of token ids, when tokenizing it gives those ids."""
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if outside := [token for token in ids if not 0 <= token < vocab]:
        raise ValidationError("prompt", f"token id {outside[0]} is outside the vocabulary [0, {vocab})")
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if tokenizer.encode(text, add_special_tokens=False).ids != ids:
        raise ValidationError(
            "prompt",
            "these token ids are not what their text tokenizes to, and the engine takes prompts as text; "
            "send the text, or the ids the tokenizer gives for it",
        )
    return text


async def _prompts(tokenizer: tokenizers.Tokenizer, prompt: str | list) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ValidationError("prompt", "must not be empty")
    if isinstance(prompt[0], str):
        return list(prompt)
    lists = [prompt] if isinstance(prompt[0], int) else prompt
    return [await asyncio.to_thread(_text_of_ids, tokenizer, ids) for ids in lists]


def _usage(choices: Sequence[Choice], per_prompt: int, generated: bool = True) -> dict[str, int]:
    """Each prompt counted once, however many choices it has; generated false: no completion tokens
    (a prompt scored alone)."""
    prompt = sum(choice.result.prompt_tokens for choice in choices[::per_prompt])
    completion = sum(choice.result.generated_tokens for choice in choices) if generated else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _top_dict(token: GeneratedToken | PromptToken) -> dict[str, float] | None:
    """A position's `top_logprobs` dict: its alternatives, and the token itself (None: the prompt's first,
    which nothing predicts)."""
    if token.logprob is None:
        return None
    top = {alternative.text: alternative.logprob for alternative in token.top_tokens}
    top.setdefault(token.text, token.logprob)
    return top


def _completion_logprobs(tokens: Sequence[GeneratedToken | PromptToken], offset: int) -> dict[str, Any]:
    """`tokens`: the echoed prompt's, then the generated ones; text offsets count from `offset`."""
    starts = itertools.accumulate((len(token.text) for token in tokens[:-1]), initial=offset)
    return {
        "tokens": [token.text for token in tokens],
        "token_logprobs": [token.logprob for token in tokens],
        "top_logprobs": [_top_dict(token) for token in tokens],
        "text_offset": list(starts) if tokens else [],
    }


def _chat_logprobs(tokens: list[GeneratedToken]) -> dict[str, Any]:
    def entry(token: GeneratedToken | TopToken) -> dict[str, Any]:
        return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode("utf-8"))}

    return {"content": [{**entry(t), "top_logprobs": [entry(a) for a in t.top_tokens]} for t in tokens]}


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    front = front_of(request)
    if (refusal := _check_model(front, body.model)) is not None:
        return refusal
    refuse_unless_neutral(
        body,
        {
            "best_of": ((None, 1), "is not implemented by this server; leave it unset or 1"),
            "suffix": ((None, ""), "is not implemented by this server; leave it unset"),
        },
    )
    # max_tokens 0 with echo scores the prompt alone: one token is run (free: the prompt's last row gives
    # it) and left out of the answer.
    prompt_only = body.echo and body.max_tokens == 0
    parameters = body.parameters(
        1 if prompt_only else body.max_tokens,
        top_n_tokens=body.logprobs or 0,
        prompt_logprobs=body.echo and body.logprobs is not None,
    )
    prompts = await _prompts(front.tokenizer, body.prompt)
    streams = await front.admit(request.state.request_id, [(p, q) for p in prompts for q in parameters])
    # With echo a choice's text starts with its prompt, and text offsets count from there.
    prefixes = [prompt if body.echo else "" for prompt in prompts for _ in parameters]
    head = {"id": f"cmpl-{request.state.request_id}", "object": "text_completion", "model": front.model_name}

    def choice(
        index: int,
        text: str,
        tokens: Sequence[GeneratedToken | PromptToken],
        offset: int,
        result: GenerationResult | None,
    ) -> dict[str, Any]:
        logprobs = None if body.logprobs is None else _completion_logprobs(tokens, offset)
        finish = None if result is None else FINISH_REASONS[result.finish_reason]
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def usage(choices: Sequence[Choice]) -> dict[str, int]:
        return _usage(choices, len(parameters), generated=not prompt_only)

    if not body.stream:
        choices = await gathered(pieces(streams, body.stops), len(streams), request)
        answers = []
        for i, c in enumerate(choices):
            text, tokens = ("", []) if prompt_only else (c.text, c.tokens)
            echoed = c.result.prefill if body.echo else []
            offset = 0 if body.echo else len(prefixes[i])
            answers.append(choice(i, prefixes[i] + text, [*echoed, *tokens], offset, c.result))
        return JSONResponse({**head, "created": front.created, "choices": answers, "usage": usage(choices)})

    async def chunks() -> AsyncIterator[dict[str, Any] | str]:
        include_usage = {"usage": None} if body.include_usage else {}
        offsets = [len(prefix) for prefix in prefixes]
        choices = [Choice() for _ in streams]
        echoed_choices: set[int] = set()
        async for piece in pieces(streams, body.stops):
            choices[piece.index].add(piece)
            if body.echo and piece.index not in echoed_choices:
                # The echoed prompt goes first, once its logprobs (if asked) are known: with the first token.
                echoed_choices.add(piece.index)
                result = piece.result if prompt_only else None
                echoed = choice(piece.index, prefixes[piece.index], piece.prefill or [], 0, result)
                yield {**head, "created": front.created, "choices": [echoed], **include_usage}
            if prompt_only:
                continue
            chunk = choice(piece.index, piece.text, piece.tokens, offsets[piece.index], piece.result)
            offsets[piece.index] += sum(len(token.text) for token in piece.tokens)
            yield {**head, "created": front.created, "choices": [chunk], **include_usage}
        if body.include_usage:
            yield {**head, "created": front.created, "choices": [], "usage": usage(choices)}
        yield "[DONE]"

    return OPENAI.events(chunks())


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
    front = front_of(request)
    if (refusal := _check_model(front, body.model)) is not None:
        return refusal
    if body.top_logprobs and not body.logprobs:
        raise ValidationError("top_logprobs", "needs logprobs: true")
    parameters = body.parameters(
        body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens,
        top_n_tokens=body.top_logprobs or 0,
    )
    prompt = front.render_chat([message.rendered() for message in body.messages])
    try:
        streams = await front.admit(request.state.request_id, [(prompt, q) for q in parameters])
    except ValidationError as exc:
        if exc.field_name != "prompt":
            raise
        # The prompt is the messages rendered: the refusal names what the client sent.
        raise ValidationError("messages", str(exc).removeprefix("prompt: ")) from None
    head = {"id": f"chatcmpl-{request.state.request_id}", "model": front.model_name, "created": front.created}

    def logprobs(tokens: list[GeneratedToken]) -> dict[str, Any] | None:
        return _chat_logprobs(tokens) if body.logprobs else None

    def finish(result: GenerationResult | None) -> str | None:
        return None if result is None else FINISH_REASONS[result.finish_reason]

    if not body.stream:
        choices = await gathered(pieces(streams, body.stops), len(streams), request)
        return JSONResponse(
            {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": logprobs(c.tokens),
                        "finish_reason": finish(c.result),
                    }
                    for i, c in enumerate(choices)
                ],
                "usage": _usage(choices, len(streams)),
            }
        )

    async def chunks() -> AsyncIterator[dict[str, Any] | str]:
        head_ = {**head, "object": "chat.completion.chunk", **({"usage": None} if body.include_usage else {})}

        def chunk(index: int, delta: dict[str, str], tokens: list[GeneratedToken], result=None) -> dict:
            entry = {"index": index, "delta": delta, "logprobs": logprobs(tokens)}
            return {**head_, "choices": [{**entry, "finish_reason": finish(result)}]}

        choices = [Choice() for _ in streams]
        for index in range(len(streams)):
            yield chunk(index, {"role": "assistant", "content": ""}, [])
        async for piece in pieces(streams, body.stops):
            choices[piece.index].add(piece)
            yield chunk(piece.index, {"content": piece.text}, piece.tokens, piece.result)
        if body.include_usage:
            yield {**head_, "choices": [], "usage": _usage(choices, len(streams))}
        yield "[DONE]"

    return OPENAI.events(chunks())
