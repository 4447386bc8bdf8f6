"""gRPC face of the gateway: protobuf in, the request schema and admission, calls on Engine, protobuf out."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable

import grpc
import structlog
import tokenizers

from bloomduo import __version__
from bloomduo.core.checkpoint import Checkpoint
from bloomduo.core.dtypes import to_torch
from bloomduo.core.gc_pauses import freeze_loaded_heap, time_pauses
from bloomduo.core.libc import keep_freed_heap
from bloomduo.core.logs import get_logger
from bloomduo.core.metrics import Outcome
from bloomduo.core.serving import (
    SERVER_OPTIONS,
    STEP_HEAP_KEPT_BYTES,
    Health,
    bind,
    enable_reflection,
    stop_event_on_signals,
)
from bloomduo.gateway.admission import Admission
from bloomduo.gateway.auth import BearerTokenAuth, RejectUndecodable
from bloomduo.gateway.chat_template import load_chat_template
from bloomduo.gateway.config import EXIT_SHARDS_STALLED, GatewayOptions
from bloomduo.gateway.embedding import Embedder
from bloomduo.gateway.engine import (
    Engine,
    GeneratedToken,
    GenerationResult,
    PromptToken,
    StreamEvent,
    TopToken,
)
from bloomduo.gateway.errors import RequestFailed
from bloomduo.gateway.http_api import HttpServer, create_app
from bloomduo.gateway.http_common import HttpFront
from bloomduo.gateway.request import GenerationParameters
from bloomduo.gateway.shards import ShardPool
from bloomduo.gateway.stopping import FinishReason
from bloomduo.v1 import gateway_pb2, gateway_pb2_grpc

log = get_logger(__name__)
SERVICE_NAME = "bloomduo.v1.GenerationService"

FINISH_REASONS = {
    FinishReason.LENGTH: gateway_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS_TOKEN: gateway_pb2.FINISH_REASON_EOS_TOKEN,
    FinishReason.STOP_SEQUENCE: gateway_pb2.FINISH_REASON_STOP_SEQUENCE,
}
# The status a call fails with, by the outcome of the request failure that ended it.
STATUS_CODES = {
    Outcome.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Outcome.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def parameters_from_pb(message: gateway_pb2.GenerateParameters) -> GenerationParameters:
    """The one conversion of the wire's parameters; an unset optional field takes the schema's default."""
    present = {
        field.name: getattr(message, field.name)
        for field in message.DESCRIPTOR.fields
        if not field.has_presence or message.HasField(field.name)
    }
    return GenerationParameters(**{**present, "stop": tuple(message.stop)})


def _top_to_pb(top: tuple[TopToken, ...]) -> list[gateway_pb2.TopToken]:
    return [gateway_pb2.TopToken(id=t.id, text=t.text, logprob=t.logprob, special=t.special) for t in top]


def token_to_pb(token: GeneratedToken) -> gateway_pb2.Token:
    return gateway_pb2.Token(
        id=token.id,
        text=token.text,
        logprob=token.logprob,
        special=token.special,
        top_tokens=_top_to_pb(token.top_tokens),
    )


def _prompt_token_to_pb(token: PromptToken) -> gateway_pb2.PromptToken:
    return gateway_pb2.PromptToken(
        id=token.id, text=token.text, logprob=token.logprob, top_tokens=_top_to_pb(token.top_tokens)
    )


def result_to_pb(result: GenerationResult) -> gateway_pb2.GenerateResult:
    return gateway_pb2.GenerateResult(
        text=result.text,
        generated_tokens=result.generated_tokens,
        finish_reason=FINISH_REASONS[result.finish_reason],
        seed=result.seed,
        prompt_tokens=result.prompt_tokens,
        tokens=[token_to_pb(token) for token in result.tokens],
        prefill=[_prompt_token_to_pb(token) for token in result.prefill],
    )


def answers_failures(method: Callable) -> Callable:
    """Ends the call of a unary or server-streaming method that raises RequestFailed with the status of
    its outcome and its message."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context: grpc.aio.ServicerContext):
            try:
                async for message in method(self, request, context):
                    yield message
            except RequestFailed as exc:
                await context.abort(STATUS_CODES[exc.outcome], str(exc))

        return stream

    @functools.wraps(method)
    async def unary(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except RequestFailed as exc:
            await context.abort(STATUS_CODES[exc.outcome], str(exc))

    return unary


class GenerationServicer(gateway_pb2_grpc.GenerationServiceServicer):
    """Protobuf in and out; admission decides, the engine generates."""

    def __init__(
        self, options: GatewayOptions, tokenizer: tokenizers.Tokenizer, checkpoint: Checkpoint
    ) -> None:
        self.options = options
        self.tokenizer = tokenizer
        self.admission = Admission(tokenizer, options.limits)
        self.shards: ShardPool | None = None
        config = checkpoint.config
        self.info = gateway_pb2.InfoResponse(
            model=options.model_dir.name,
            model_type="bloom",
            num_shards=len(options.shard_targets),
            vocab_size=config.vocab_size,
            version=__version__,
            hidden_size=config.hidden_size,
            num_layers=config.n_layer,
            num_heads=config.n_head,
            limits=gateway_pb2.Limits(
                max_input_tokens=options.limits.max_input_tokens,
                max_total_tokens=options.limits.max_total_tokens,
                max_new_tokens=options.limits.max_new_tokens,
                max_stop_sequences=options.limits.max_stop_sequences,
                max_stop_sequence_length=options.limits.max_stop_sequence_length,
                max_batch_size=options.scheduler.max_batch_size,
                max_concurrent_requests=options.limits.max_concurrent_requests,
                max_top_k=options.limits.max_top_k,
            ),
        )

    async def _events(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[StreamEvent]:
        request_id = self.admission.request_id(request.request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        await context.send_initial_metadata((("x-request-id", request_id),))
        engine, admitted = await self.admission.admit(
            request_id, request.prompt, parameters_from_pb(request.parameters)
        )
        async for event in engine.generate(admitted):
            yield event

    @answers_failures
    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        async for event in self._events(request, context):
            if event.result is not None:
                return gateway_pb2.GenerateResponse(result=result_to_pb(event.result))
        await context.abort(grpc.StatusCode.INTERNAL, "generation ended without a result")

    @answers_failures
    async def GenerateStream(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        async for event in self._events(request, context):
            message = gateway_pb2.GenerateStreamResponse(token=token_to_pb(event.token))
            if event.result is not None:
                message.result.CopyFrom(result_to_pb(event.result))
            yield message

    async def Tokenize(self, request: gateway_pb2.TokenizeRequest, context: grpc.aio.ServicerContext):
        encoding = self.tokenizer.encode(request.text, add_special_tokens=False)
        return gateway_pb2.TokenizeResponse(ids=encoding.ids, count=len(encoding.ids), tokens=encoding.tokens)

    async def Info(self, request: gateway_pb2.InfoRequest, context: grpc.aio.ServicerContext):
        info = gateway_pb2.InfoResponse()
        info.CopyFrom(self.info)
        engine = self.admission.engine
        if engine is None or self.shards is None:
            return info
        info.load.running_requests = len(engine.running)
        info.load.waiting_requests = len(engine.waiting)
        info.load.kept_sequences = engine.kept_caches
        info.load.serving = engine.serving and not self.admission.draining
        if engine.serving:
            try:
                workers = await self.shards.load()
            except grpc.aio.AioRpcError as exc:
                log.warning("worker_info_failed", error=exc.details())
            else:
                info.load.worker_cached_sequences.extend(w.cached_sequences for w in workers)
                info.load.worker_cached_tokens.extend(w.cached_tokens for w in workers)
                info.load.worker_kv_cache_bytes.extend(w.kv_cache_bytes for w in workers)
        return info


async def _connect(
    servicer: GenerationServicer,
    pool: ShardPool,
    checkpoint: Checkpoint,
    health: Health,
    on_stalled: Callable[[str], None],
) -> None:
    infos = await pool.wait_ready(servicer.options.shard_ready_timeout_s)
    dtype = to_torch(infos[0].dtype)
    servicer.info.dtype = infos[0].dtype
    servicer.info.device = ",".join(info.device for info in infos)
    servicer.info.worker_kernels[:] = [info.kernels for info in infos]
    embedder = await asyncio.to_thread(Embedder, checkpoint, dtype)
    engine = Engine(
        servicer.tokenizer,
        embedder,
        pool,
        servicer.options.scheduler,
        eos_token_id=checkpoint.config.eos_token_id,
        on_serving_change=health.set,
        log_text=servicer.options.log_text,
        deadline=servicer.options.step_deadline,
        on_stalled=on_stalled,
    )
    engine.start()
    servicer.shards = pool
    servicer.admission.engine = engine
    freeze_loaded_heap()
    await health.set(True)
    log.info("gateway_ready", shards=len(infos), dtype=infos[0].dtype)


def _http_server(options: GatewayOptions, servicer: GenerationServicer, host: str) -> HttpServer:
    """The OpenAI and TGI front on the servicer's admission (so on its engine), bound but not started."""
    front = HttpFront(
        admission=servicer.admission,
        tokenizer=servicer.tokenizer,
        info=servicer.info,
        model_name=options.served_model_name or options.model_dir.name,
        render_chat=load_chat_template(options.model_dir, options.chat_template),
        auth_token=options.auth_token,
        created=int(time.time()),
    )
    app = create_app(front, options.limits.max_request_bytes)
    return HttpServer(app, host, options.http_port, options.shutdown_grace_s, options.tls)


async def serve(options: GatewayOptions, host: str, port: int) -> int:
    """Serve until SIGTERM/SIGINT, or until the shard workers stall; then drain in-flight requests and
    return the exit status (EXIT_SHARDS_STALLED after a stall)."""
    keep_freed_heap(STEP_HEAP_KEPT_BYTES)
    time_pauses()
    checkpoint = Checkpoint(options.model_dir)
    tokenizer_file = options.model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"{tokenizer_file} is missing; the gateway needs the model's fast tokenizer file"
        )
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    vocab_size = checkpoint.config.vocab_size
    limits = dataclasses.replace(options.limits, max_top_k=min(options.limits.max_top_k, vocab_size))
    options = dataclasses.replace(options, limits=limits)
    # Requests past this size get RESOURCE_EXHAUSTED from gRPC itself, before any parsing.
    server_options = [
        *(option for option in SERVER_OPTIONS if option[0] != "grpc.max_receive_message_length"),
        ("grpc.max_receive_message_length", limits.max_request_bytes),
    ]
    interceptors = [
        RejectUndecodable(),
        *([BearerTokenAuth(options.auth_token)] if options.auth_token else []),
    ]
    server = grpc.aio.server(options=server_options, interceptors=interceptors)
    servicer = GenerationServicer(options, tokenizer, checkpoint)
    gateway_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    health = Health(server, [SERVICE_NAME])
    enable_reflection(server, [SERVICE_NAME])
    bound = bind(server, f"{host}:{port}", options.tls)
    http = _http_server(options, servicer, host) if options.http_port else None
    await server.start()
    if http is not None:
        http.start()
    await health.set(False)
    log.info(
        "gateway_listening",
        address=f"{host}:{bound}",
        shards=options.shard_targets,
        tls=options.tls.enabled,
        auth=bool(options.auth_token),
        http=f"{host}:{http.port}" if http is not None else None,
    )
    pool = ShardPool(
        options.shard_targets, vocab_size, options.step_deadline.first_step_timeout_s, options.shard_tls
    )
    stop = stop_event_on_signals()
    stalled: list[str] = []

    def shards_stalled(reason: str) -> None:
        log.error(
            "gateway_exiting",
            reason=reason,
            exit_code=EXIT_SHARDS_STALLED,
            action="its supervisor replaces the shard group",
        )
        stalled.append(reason)
        stop.set()

    connect = asyncio.ensure_future(_connect(servicer, pool, checkpoint, health, shards_stalled))
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({connect, waiter}, return_when=asyncio.FIRST_COMPLETED)
    failed = connect.done() and not connect.cancelled() and connect.exception() is not None
    if failed:
        log.error("gateway_start_failed", error=str(connect.exception()))
    elif connect.done():
        await stop.wait()
    connect.cancel()
    waiter.cancel()
    # Refuse new work, let in-flight streams finish within the grace period, then stop.
    servicer.admission.draining = True
    await health.shutting_down()
    engine = servicer.admission.engine
    in_flight = engine.in_flight if engine is not None else 0
    log.info("gateway_draining", in_flight=in_flight, grace_s=options.shutdown_grace_s)
    await asyncio.gather(server.stop(grace=options.shutdown_grace_s), *([http.stop()] if http else ()))
    if engine is not None:
        await engine.stop()
    await pool.close()
    log.info("gateway_stopped")
    if stalled:
        return EXIT_SHARDS_STALLED
    return 1 if failed else 0
