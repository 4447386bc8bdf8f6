"""What the OpenAI and TGI translations (openai_api.py, tgi_api.py) share: the front's handles on the gateway,
refusals in each protocol's error shape, server-sent events, and many generations run as one request.

The HTTP layer only translates: it builds the GenerationParameters the gRPC edge builds, admits them
through the same Admission and reads the same Engine's events.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import tokenizers
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from bloomduo.core.metrics import Outcome
from bloomduo.gateway.admission import Admission
from bloomduo.gateway.engine import GeneratedToken, GenerationResult, PromptToken, StreamEvent
from bloomduo.gateway.errors import Overloaded, RequestFailed, ValidationError
from bloomduo.gateway.request import GenerationParameters
from bloomduo.v1 import gateway_pb2

# Seconds a client told "overloaded" or "unavailable" waits before it retries (the openai SDK honours it).
RETRY_AFTER_S = 1


@dataclass
class HttpFront:
    """The gateway parts the HTTP routes use; `info` is the gRPC servicer's, completed once workers are up."""

    admission: Admission
    tokenizer: tokenizers.Tokenizer
    info: gateway_pb2.InfoResponse
    model_name: str
    render_chat: Callable[[Sequence[dict[str, Any]]], str]
    auth_token: str | None
    created: int  # when the model started serving, in Unix seconds (OpenAI's model "created")

    @property
    def serving(self) -> bool:
        engine = self.admission.engine
        return engine is not None and engine.serving and not self.admission.draining

    async def admit(
        self, request_id: str, jobs: Sequence[tuple[str, GenerationParameters]]
    ) -> list[AsyncIterator[StreamEvent]]:
        """One engine stream per (prompt, parameters), all admitted before any starts, so a refusal of
        the last leaves nothing running.

        Each generation counts against max_concurrent_requests, as each gRPC request does. The engine
        counts a generation only once it starts, so the room is checked for all of them first: else
        one request of many prompts times n would queue thousands past the limit."""
        limit = self.admission.limits.max_concurrent_requests
        if len(jobs) > limit:
            raise ValidationError(
                "n",
                f"the prompts times n make {len(jobs)} generations, more than "
                f"max_concurrent_requests={limit}",
            )
        engine = self.admission.engine
        if engine is not None and engine.in_flight + len(jobs) > limit:
            raise Overloaded(
                f"the model is overloaded ({engine.in_flight} requests in flight, room for "
                f"{limit - engine.in_flight}); retry later"
            )
        streams = []
        for prompt, parameters in jobs:
            engine, request = await self.admission.admit(request_id, prompt, parameters)
            streams.append(engine.generate(request))
        return streams


def front_of(request: Request) -> HttpFront:
    return request.app.state.front


class Body(BaseModel):
    """A request body: a field the protocol has but this server lacks is refused by name, never ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Failure:
    """A refusal, whatever its cause; `kind` is one of Protocol.statuses' keys."""

    kind: str
    message: str
    param: str | None = None


_KINDS = {
    Outcome.INVALID_ARGUMENT: "validation",
    Outcome.OVERLOADED: "overloaded",
    Outcome.UNAVAILABLE: "unavailable",
}


@dataclass(frozen=True)
class Protocol:
    """How one HTTP API names its fields and shapes its errors."""

    name: str  # the `protocol` label of bloomduo_http_requests_total
    statuses: Mapping[str, int]  # by Failure.kind
    body: Callable[[Failure], dict[str, Any]]
    field_names: Mapping[str, str] = field(default_factory=dict)  # GenerationParameters' -> this API's

    def failure(self, exc: RequestFailed) -> Failure:
        """The refusal of the gateway's own exception, with the same words and the field under this API's
        name."""
        if isinstance(exc, ValidationError):
            param = self.field_names.get(exc.field_name, exc.field_name)
            return Failure("validation", param + str(exc)[len(exc.field_name) :], param)
        return Failure(_KINDS[exc.outcome], str(exc))

    def response(self, failure: Failure) -> JSONResponse:
        retry = {"retry-after": str(RETRY_AFTER_S)} if failure.kind in ("overloaded", "unavailable") else {}
        return JSONResponse(self.body(failure), status_code=self.statuses[failure.kind], headers=retry)

    def events(self, events: AsyncIterator[dict[str, Any] | str]) -> StreamingResponse:
        """Server-sent events; a refusal after the stream has started is its last event."""

        async def lines() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield f"data: {event if isinstance(event, str) else _json(event)}\n\n"
            except RequestFailed as exc:
                yield f"data: {_json(self.body(self.failure(exc)))}\n\n"

        headers = {"cache-control": "no-cache"}
        return StreamingResponse(lines(), media_type="text/event-stream", headers=headers)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def refuse_unless_neutral(body: BaseModel, neutral: Mapping[str, tuple[tuple[Any, ...], str]]) -> None:
    """ValidationError naming the first parameter this server does not implement that is set to anything
    but a value that asks for nothing (None, 0, False...); `neutral` maps each name to those values and
    the reason."""
    for name, (values, reason) in neutral.items():
        if getattr(body, name) not in values:
            raise ValidationError(name, reason)


def seeds(seed: int | None, n: int) -> list[int | None]:
    """Choice i of n draws with seed + i, so choices differ yet each is reproducible; no seed: random."""
    return [None] * n if seed is None else [seed + i for i in range(n)]


async def merged(streams: Sequence[AsyncIterator[StreamEvent]]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """Every stream's events as they come, each with its stream's index. The first failure ends them all;
    closing this iterator (a client gone) cancels every sequence still running."""
    queue: asyncio.Queue[tuple[int, StreamEvent | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[StreamEvent]) -> None:
        try:
            async for event in stream:
                queue.put_nowait((index, event))
        except Exception as exc:  # handed to the consumer, which raises it in the request's task
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            index, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Piece:
    """Text a choice adds at one event, the tokens it came from, and the result on the choice's last."""

    index: int
    text: str
    tokens: list[GeneratedToken]
    result: GenerationResult | None = None
    prefill: list[PromptToken] | None = None  # on a choice's first, with decoder_input_details


class StopTrimmer:
    """Cuts a choice's text before its first stop sequence (OpenAI's answer leaves it out; the engine's
    text, like TGI's, ends with it). While streaming, text that could be the start of a stop sequence is
    held back until the next token tells."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def push(self, text: str, last: bool) -> str:
        if self.stopped:
            return ""
        pending = self.pending + text
        cut = min((at for stop in self.stops if (at := pending.find(stop)) != -1), default=None)
        if cut is not None:
            self.stopped, self.pending = True, ""
            return pending[:cut]
        starts = [k for s in self.stops for k in range(1, len(s)) if pending.endswith(s[:k])]
        keep = len(pending) - (0 if last else max(starts, default=0))
        self.pending = pending[keep:]
        return pending[:keep]


async def pieces(streams: Sequence[AsyncIterator[StreamEvent]], stops: Sequence[str]) -> AsyncIterator[Piece]:
    """The choices' text as the engine makes it, cut at their stop sequences."""
    trimmers = [StopTrimmer(stops) for _ in streams]
    async for index, event in merged(streams):
        last = event.result is not None
        text = trimmers[index].push(event.token.text, last)
        yield Piece(index, text, [event.token], event.result, event.prefill)


@dataclass
class Choice:
    """A whole choice, gathered from its pieces."""

    text: str = ""
    tokens: list[GeneratedToken] = field(default_factory=list)
    result: GenerationResult | None = None

    def add(self, piece: Piece) -> None:
        self.text += piece.text
        self.tokens += piece.tokens
        self.result = piece.result or self.result


class ClientGone(Exception):
    """The client closed its connection before a whole (not streamed) answer was ready."""


async def gathered(stream: AsyncIterator[Piece], count: int, request: Request) -> list[Choice]:
    """Whole choices, gathered from their pieces; ClientGone, with every sequence cancelled, when the
    client leaves first. A streamed answer learns that from its failed writes; this one writes nothing
    until the end, so it listens: once the body is read, the next ASGI message is the disconnect.
    (`request.is_disconnected()` never sees it behind a BaseHTTPMiddleware, which the doors are.)"""
    choices = [Choice() for _ in range(count)]

    async def gather() -> None:
        async with aclosing(stream):  # closing it cancels the engine's sequences still running
            async for piece in stream:
                choices[piece.index].add(piece)

    async def client_left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, left = asyncio.ensure_future(gather()), asyncio.ensure_future(client_left())
    try:
        await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, left):
            task.cancel()
        await asyncio.gather(work, left, return_exceptions=True)
    if not work.done() or work.cancelled():
        raise ClientGone
    work.result()  # a refusal or failure raised while gathering
    return choices
