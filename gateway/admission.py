"""Whether a request may start, decided the same for every front: a request id to log it by, a gateway
that is serving and not overloaded, and parameters within the limits.

Refusals are RequestFailed exceptions, counted here under their outcome; each front maps them to its
own status.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import tokenizers

from bloomduo.core import metrics
from bloomduo.core.logs import get_logger
from bloomduo.gateway.config import RequestLimits
from bloomduo.gateway.engine import Engine
from bloomduo.gateway.errors import Overloaded, RequestFailed, Unavailable, ValidationError
from bloomduo.gateway.request import GenerationParameters, GenerationRequest, validate

log = get_logger(__name__)
# Echoed back to the caller (x-request-id) and into logs, so it must be safe in both.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


class Admission:
    """The gate in front of the engine; `engine` is None until the model is loaded."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, limits: RequestLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.engine: Engine | None = None
        self.draining = False

    def request_id(self, supplied: str) -> str:
        """The caller's request id, or a new one when it sent none."""
        with _counted():
            request_id = supplied or uuid.uuid4().hex
            if not REQUEST_ID.fullmatch(request_id):
                raise ValidationError(
                    "request_id", "use 1 to 128 characters among letters, digits and . _ : / -"
                )
            return request_id

    async def admit(
        self, request_id: str, prompt: str, parameters: GenerationParameters
    ) -> tuple[Engine, GenerationRequest]:
        """The engine to run the request on and the request validated, or the refusal that says why."""
        with _counted():
            engine = self.engine
            if self.draining:
                raise Unavailable("the gateway is shutting down; retry on another")
            if engine is None:
                raise Unavailable("the model is still loading; retry shortly")
            if not engine.serving:
                raise Unavailable("a shard worker failed and the group is re-forming; retry shortly")
            if engine.in_flight >= self.limits.max_concurrent_requests:
                raise Overloaded(
                    f"the model is overloaded ({engine.in_flight} requests in flight); retry later"
                )
            # Tokenizing a long prompt takes a while: keep it off the loop that serves every stream.
            request = await asyncio.to_thread(
                validate, request_id, prompt, parameters, self.tokenizer, self.limits
            )
        log.info(
            "request_admitted",
            prompt_tokens=len(request.prompt_ids),
            max_new_tokens=request.max_new_tokens,
            do_sample=request.sampling.do_sample,
        )
        return engine, request


@contextmanager
def _counted() -> Iterator[None]:
    try:
        yield
    except RequestFailed as exc:
        log.info("request_refused", outcome=exc.outcome.value, error=str(exc))
        metrics.REQUESTS.labels(exc.outcome, "").inc()
        raise
