"""What every bloomduo gRPC server shares: message limits, keepalive, health, graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from bloomduo.core.logs import get_logger

log = get_logger(__name__)

# What the gateway keeps of its freed heap for the next step (libc.keep_freed_heap): a 16-row sampled step's
# logits rows, their wire bytes and their float32 copy are ~40 MiB there. Workers keep glibc's defaults: a
# kept heap put their RSS over its bound (share of the weights + KV cache + 300 MiB).
STEP_HEAP_KEPT_BYTES = 64 << 20
# A prefill of bloom-7b1 at 2048 tokens in float32 is 32 MiB of hidden states; leave room above it.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# The version of shard.proto's meaning this code speaks, in ShardInfoResponse: raised whenever a change makes
# a peer of the previous version compute something else from the same messages, since proto3 silently drops
# fields the other side does not know. 1: workers apply a greedy sequence's repetition penalty. 2: the
# penalty travels as a double (field 9; a version-1 worker would find none and skip it).
SHARD_PROTOCOL_VERSION = 2

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Server reflection, so grpcurl and grpcui work without the .proto files."""
    reflection.enable_server_reflection(
        [*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], server
    )


class Health:
    """grpc.health.v1 for the server as a whole ("") and for each named service."""

    def __init__(self, server: grpc.aio.Server, services: Iterable[str]) -> None:
        self.servicer = health_aio.HealthServicer()
        self.services = ["", *services]
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, serving: bool) -> None:
        for service in self.services:
            await self.servicer.set(service, SERVING if serving else NOT_SERVING)

    async def shutting_down(self) -> None:
        await self.servicer.enter_graceful_shutdown()


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one side of a TLS connection. `ca` set on a server: clients must present a
    certificate it signed (mutual TLS); on a client: the CA the server's certificate must chain to."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise ValueError("TLS on a server needs both a certificate and its key (--tls-cert, --tls-key)")
        ca = self.ca.read_bytes() if self.ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


NO_TLS = TlsFiles()


def secure_or_insecure_channel(target: str, tls: TlsFiles) -> grpc.aio.Channel:
    if tls.enabled:
        return grpc.aio.secure_channel(target, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def bind(server: grpc.aio.Server, address: str, tls: TlsFiles = NO_TLS) -> int:
    """Bind a port (TLS when `tls` has a certificate) and return the port bound (address may end in :0)."""
    if tls.enabled:
        port = server.add_secure_port(address, tls.server_credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}: the address is in use or not local to this machine")
    return port


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so servers drain instead of dying mid-request."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
