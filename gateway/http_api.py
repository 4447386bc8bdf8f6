"""HTTP face of the gateway: OpenAI's API under /v1 (openai_api.py) and TGI's (tgi_api.py), served by
uvicorn as a task on the gateway's own loop, over the same admission and engine as gRPC.

Every request passes the same doors as a gRPC call: the bearer token (all but /health and the API
schema), a request id (`x-request-id`, honoured when valid, generated otherwise, returned always), the
body size limit, one structlog event, and bloomduo_http_requests_total by protocol and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

import structlog
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter
from starlette.exceptions import HTTPException

from bloomduo import __version__
from bloomduo.core.logs import get_logger
from bloomduo.core.serving import TlsFiles
from bloomduo.gateway import openai_api, tgi_api
from bloomduo.gateway.errors import RequestFailed
from bloomduo.gateway.http_common import ClientGone, Failure, HttpFront, Protocol

log = get_logger(__name__)

HTTP_REQUESTS = Counter(
    "bloomduo_http_requests",
    "HTTP requests by protocol (openai, tgi) and status code; bloomduo_requests_total counts generations",
    ["protocol", "status"],
)
# nginx's status for a request whose client closed the connection before the answer: no standard one fits.
CLIENT_CLOSED_REQUEST = 499
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def protocol_of(path: str) -> Protocol:
    return openai_api.OPENAI if path == "/v1" or path.startswith("/v1/") else tgi_api.TGI


def _validation_failure(exc: RequestValidationError) -> Failure:
    """Pydantic's first complaint, named by its field (`n`, `messages.0.role`); an unknown field is one
    this server does not implement."""
    error = exc.errors()[0]
    location = [str(part) for part in error["loc"][1:]]  # after "body"
    if error["type"] == "json_invalid":
        return Failure("validation", f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}")
    param = ".".join(location) or "body"
    if error["type"] == "extra_forbidden":
        return Failure("validation", f"{param}: unknown parameter; this server does not implement it", param)
    return Failure("validation", f"{param}: {error['msg']}", param)


def _authorized(request: Request, token: str) -> bool:
    supplied = request.headers.get("authorization", "").encode("latin-1")
    return hmac.compare_digest(supplied, f"Bearer {token}".encode())


def create_app(front: HttpFront, max_request_bytes: int) -> FastAPI:
    app = FastAPI(
        title="bloomduo",
        version=__version__,
        description="OpenAI- and text-generation-inference-compatible HTTP API of the bloomduo gateway",
    )
    app.state.front = front
    app.include_router(openai_api.router)
    app.include_router(tgi_api.router)

    @app.exception_handler(RequestFailed)
    async def refused(request: Request, exc: RequestFailed) -> JSONResponse:
        protocol = protocol_of(request.url.path)
        return protocol.response(protocol.failure(exc))

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # no one reads it; the log and the metric do

    @app.exception_handler(HTTPException)
    async def undecodable(request: Request, exc: HTTPException) -> Response:
        """FastAPI's 400 for a body it cannot even decode (not UTF-8), in the protocol's error shape rather
        than its own {"detail"}, which neither protocol's clients read; its other refusals (no such
        route or method) keep FastAPI's answer."""
        if exc.status_code != 400:
            return await http_exception_handler(request, exc)
        message = f"the body is not valid JSON: {exc.__cause__ or exc.detail}"
        return protocol_of(request.url.path).response(Failure("validation", message))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        return protocol_of(request.url.path).response(_validation_failure(exc))

    @app.middleware("http")
    async def doors(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        protocol = protocol_of(request.url.path)
        try:
            request_id = front.admission.request_id(request.headers.get("x-request-id", ""))
        except RequestFailed as exc:
            request_id = None
            response = protocol.response(protocol.failure(exc))
        else:
            structlog.contextvars.bind_contextvars(request_id=request_id)
            request.state.request_id = request_id
            response = await _guarded(request, protocol, call_next, front.auth_token, max_request_bytes)
        if request_id is not None:
            response.headers["x-request-id"] = request_id
        HTTP_REQUESTS.labels(protocol.name, str(response.status_code)).inc()
        log.info(
            "http_request",
            protocol=protocol.name,
            method=request.method,
            path=request.url.path,
            status=response.status_code,
            seconds=round(time.perf_counter() - started, 6),
        )
        return response

    return app


async def _guarded(
    request: Request,
    protocol: Protocol,
    call_next: Callable[[Request], Awaitable[Response]],
    token: str | None,
    max_request_bytes: int,
) -> Response:
    if token and request.url.path not in OPEN_PATHS and not _authorized(request, token):
        message = "missing or wrong bearer token: send the header 'authorization: Bearer <token>'"
        return protocol.response(Failure("unauthorized", message))
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_request_bytes:
        message = f"the body has {length} bytes, more than the limit of {max_request_bytes}"
        return protocol.response(Failure("too_large", message))
    if not length and not await _body_within(request, max_request_bytes):
        message = f"the body has more bytes than the limit of {max_request_bytes}"
        return protocol.response(Failure("too_large", message))
    return await call_next(request)


async def _body_within(request: Request, limit: int) -> bool:
    """Reads a body sent without a content-length (chunked), which no header bounds, only as far as the
    limit; True when all of it fits, and then it is the body the route reads."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return False
        chunks.append(chunk)
    # Starlette's cache of Request.body(): the doors' BaseHTTPMiddleware hands it on to the route.
    request._body = b"".join(chunks)
    return True


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the gateway's (core.serving) stop both fronts in order, and
    uvicorn's would replace them and re-raise the signal when it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """The HTTP front on a socket bound at construction, so a port in use fails the gateway's start."""

    def __init__(self, app: FastAPI, host: str, port: int, grace_s: float, tls: TlsFiles) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, dualstack_ipv6=host == "::")
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,  # the doors middleware logs each request as a structlog event
            timeout_graceful_shutdown=grace_s,
            # The public port's certificate serves HTTPS as well as gRPC.
            ssl_certfile=tls.cert,
            ssl_keyfile=tls.key,
        )
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve([self.socket]), name="http")

    async def stop(self) -> None:
        """New connections are refused; responses in flight get the grace period to finish."""
        self.server.should_exit = True
        if self.task is not None:
            await self.task
