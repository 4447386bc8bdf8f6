"""`bloomduo up`: W shard workers and the gateway as separate processes, like text-generation-launcher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bloomduo.apps.flags import to_flags
from bloomduo.core.dtypes import DTYPE_CHOICES
from bloomduo.core.logs import get_logger
from bloomduo.gateway.config import RequestLimits, SchedulerSettings
from bloomduo.shard_worker.config import QUANTIZE_CHOICES

log = get_logger(__name__)


CLI = [sys.executable, "-m", "bloomduo"]
MAX_RESTARTS = 10  # within RESTART_WINDOW_S: more means a crash loop, not a fault to heal
RESTART_WINDOW_S = 300.0


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1", exclude: Collection[int] = ()) -> list[int]:
    """`count` different free ports, none in `exclude` (ports already promised to another process).

    Every probe socket stays bound until all are picked: a port released at once can be handed out
    again, and gRPC's SO_REUSEPORT would then let a gateway and a worker share it.
    """
    probes: list[socket.socket] = []
    try:
        picked: list[int] = []
        while len(picked) < count:
            sock = socket.socket()
            probes.append(sock)
            sock.bind((host, 0))
            if (port := sock.getsockname()[1]) not in exclude:
                picked.append(port)
        return picked
    finally:
        for sock in probes:
            sock.close()


def wait_serving(
    target: str,
    timeout_s: float,
    processes: list[subprocess.Popen] | None = None,
    root_certificates: bytes | None = None,
) -> None:
    """Block until target's grpc.health.v1 says SERVING; fail early if one of `processes` dies.

    With root_certificates the probe speaks TLS and trusts those PEM certificates.
    """
    deadline = time.monotonic() + timeout_s
    channel = (
        grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))
        if root_certificates
        else grpc.insecure_channel(target)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            for process in processes or ():
                if process.poll() is not None:
                    raise RuntimeError(f"{' '.join(process.args[-6:])} exited with {process.returncode}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} not serving after {timeout_s:.0f} s")
            time.sleep(0.2)


@dataclass(frozen=True)
class StackOptions:
    """What `bloomduo up` starts; the fields with a "help" are its flags (bloomduo.apps.flags)."""

    model_dir: Path
    num_shards: int = field(default=2, metadata={"help": "tensor-parallel degree (divides n_head)"})
    device: str = field(
        default="cpu", metadata={"help": "cpu, cuda or npu (rank r uses chip r) or e.g. cuda:0"}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "auto: the checkpoint's dtype (float16 on npu)", "choices": DTYPE_CHOICES},
    )
    host: str = field(
        default="127.0.0.1", metadata={"help": "public address of the gateway (0.0.0.0 for all)"}
    )
    port: int = field(default=50051, metadata={"help": "the gateway's public port"})
    http_port: int = field(
        default=8080, metadata={"help": "the gateway's OpenAI and TGI HTTP port on the same host (0: off)"}
    )
    quantize: str = field(
        default="none",
        metadata={
            "help": "int8 weights on every worker: int8 or int8-dynamic (see bloomduo shard)",
            "choices": QUANTIZE_CHOICES,
        },
    )
    threads_per_shard: int | None = field(
        default=None, metadata={"help": "torch threads per worker on cpu (default: cores / W)"}
    )
    metrics_port: int | None = field(
        default=None, metadata={"help": "Prometheus /metrics of the gateway on P, of worker r on P+1+r"}
    )
    limits: RequestLimits = field(default_factory=RequestLimits)
    # Also sizes the workers' KV caches: one slot per sequence the gateway may run at once.
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    ready_timeout_s: float = 600.0
    gateway_args: tuple[str, ...] = ()  # extra `bloomduo gateway` flags, e.g. its TLS files
    shard_args: tuple[str, ...] = ()  # extra `bloomduo shard` flags, e.g. their TLS files
    # PEM the readiness probe trusts when the gateway serves TLS (its certificate chain, or its CA)
    tls_root: bytes | None = None


def shard_device(device: str, rank: int) -> str:
    """cpu stays cpu; "cuda" or "npu" without an index puts rank r on chip r."""
    if device == "cpu" or ":" in device:
        return device
    return f"{device}:{rank}"


class Stack:
    """The running processes of one `bloomduo up`."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.shards: list[subprocess.Popen] = []
        self.gateway: subprocess.Popen | None = None
        self.target = f"{'127.0.0.1' if options.host in ('0.0.0.0', '::') else options.host}:{options.port}"
        # Workers listen on loopback only: the gateway is the one public door.
        self.shard_targets: list[str] = []
        *shard_ports, rendezvous = free_ports(options.num_shards + 1, exclude=self._promised_ports())
        self.shard_targets = [f"127.0.0.1:{port}" for port in shard_ports]
        self.dist_init = f"tcp://127.0.0.1:{rendezvous}"

    def _promised_ports(self) -> set[int]:
        """Ports this stack's processes listen on already (or will): the gateway's and its metrics'."""
        opts = self.options
        metrics = (
            range(opts.metrics_port, opts.metrics_port + opts.num_shards + 1) if opts.metrics_port else ()
        )
        shards = (int(target.rsplit(":", 1)[1]) for target in self.shard_targets)
        return {opts.port, opts.http_port, *metrics, *shards} - {0}

    def shard_commands(self) -> list[list[str]]:
        """One `bloomduo shard` per rank: the same CLI docker-compose runs."""
        opts = self.options
        cores = sorted(os.sched_getaffinity(0))
        threads = opts.threads_per_shard or max(1, len(cores) // opts.num_shards)
        # CPU workers that fit get cores of their own: a worker's step is 48 all-reduces, each waiting for
        # the slower rank, so a worker moved between cores (or its cache with it) slows both.
        pinned = opts.device == "cpu" and threads * opts.num_shards <= len(cores)
        own_cores = [
            ("--cpu-cores", ",".join(map(str, cores[rank * threads : (rank + 1) * threads])))
            if pinned
            else ()
            for rank in range(opts.num_shards)
        ]
        return [
            [
                *CLI, "shard", "--model", str(opts.model_dir), "--rank", str(rank),
                "--world-size", str(opts.num_shards), "--dist-init", self.dist_init,
                "--host", host, "--port", port, "--device", shard_device(opts.device, rank),
                "--dtype", opts.dtype, "--quantize", opts.quantize, "--threads", str(threads),
                *own_cores[rank],
                *(("--metrics-port", str(opts.metrics_port + 1 + rank)) if opts.metrics_port else ()),
                "--kv-cache-slots", str(opts.scheduler.max_batch_size),
                *opts.shard_args,
            ]
            for rank, (host, port) in enumerate(target.rsplit(":", 1) for target in self.shard_targets)
        ]  # fmt: skip

    def gateway_command(self) -> list[str]:
        opts = self.options
        return [
            *CLI, "gateway", "--model", str(opts.model_dir), "--shards", ",".join(self.shard_targets),
            "--host", opts.host, "--port", str(opts.port), "--http-port", str(opts.http_port),
            *to_flags(opts.limits), *to_flags(opts.scheduler), *opts.gateway_args,
            *(("--metrics-port", str(opts.metrics_port)) if opts.metrics_port else ()),
        ]  # fmt: skip

    def start(self) -> None:
        self.shards = [subprocess.Popen(command) for command in self.shard_commands()]
        self.gateway = subprocess.Popen(self.gateway_command())
        log.info(
            "stack_starting", shards=len(self.shards), target=self.target, model=str(self.options.model_dir)
        )
        wait_serving(
            self.target, self.options.ready_timeout_s, [*self.shards, self.gateway], self.options.tls_root
        )

    def restart_shards(self) -> None:
        """Replace the whole shard group: a survivor's process group is broken along with its peer."""
        _terminate(self.shards, timeout_s=5.0)
        # A fresh rendezvous port: the old one may still be held by the dead group's store.
        self.dist_init = f"tcp://127.0.0.1:{free_ports(1, exclude=self._promised_ports())[0]}"
        self.shards = [subprocess.Popen(command) for command in self.shard_commands()]

    def restart_gateway(self) -> None:
        _terminate([self.gateway], timeout_s=5.0)
        self.gateway = subprocess.Popen(self.gateway_command())

    def stop(self, timeout_s: float = 40.0) -> None:
        """Gateway first (it drains its streams), then the workers; kill whatever outlives the timeout."""
        _terminate([self.gateway], timeout_s)
        _terminate(self.shards, timeout_s)


def start_private_stack(model_dir: Path, num_shards: int, device: str, dtype: str) -> Stack:
    """A stack on a free loopback port for tools that need one for a while (bench, eval); stop() it.
    They speak gRPC, so no HTTP port is taken."""
    stack = Stack(
        StackOptions(
            model_dir=model_dir.resolve(),
            num_shards=num_shards,
            device=device,
            dtype=dtype,
            port=free_port(),
            http_port=0,
        )
    )
    try:
        stack.start()
    except BaseException:
        stack.stop()
        raise
    return stack


def _terminate(processes: list[subprocess.Popen | None], timeout_s: float) -> None:
    live = [p for p in processes if p is not None and p.poll() is None]
    for process in live:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in live:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("process_killed", pid=process.pid, reason="did not stop after SIGTERM")
            process.kill()
            process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_stack(options: StackOptions) -> int:
    """Serve until Ctrl-C or SIGTERM (exit 0), restarting what dies; always stop everything."""
    stack = Stack(options)
    signal.signal(signal.SIGTERM, _interrupt)
    restarts: list[float] = []
    try:
        stack.start()
        http = f" and HTTP (OpenAI, TGI) on port {options.http_port}" if options.http_port else ""
        print(
            f"bloomduo is serving {options.model_dir.name} on {stack.target}{http} (Ctrl-C stops it)",
            flush=True,
        )
        while True:
            time.sleep(0.2)
            dead_shards = [p for p in stack.shards if p.poll() is not None]
            gateway_dead = stack.gateway is not None and stack.gateway.poll() is not None
            if not dead_shards and not gateway_dead:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(restarts) > MAX_RESTARTS:
                log.error(
                    "stack_failed", reason=f"{len(restarts)} restarts in {RESTART_WINDOW_S:.0f} s; giving up"
                )
                return 1
            for process in dead_shards:
                log.error(
                    "shard_exited", pid=process.pid, returncode=process.returncode, action="restart group"
                )
            if dead_shards:
                stack.restart_shards()
            if gateway_dead:
                log.error("gateway_exited", returncode=stack.gateway.returncode, action="restart")
                stack.restart_gateway()
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as exc:
        log.error("stack_failed", error=str(exc))
        return 1
    finally:
        # A second Ctrl-C must not interrupt the orderly stop and orphan the workers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log.info("stack_stopping")
        stack.stop()
