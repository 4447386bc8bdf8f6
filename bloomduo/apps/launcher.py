"""`bloomduo up`: W shard workers and the gateway as separate processes, like text-generation-launcher.

`run_stack` supervises them with one loop, the same from the first start to the last stop (`Supervisor`).
A fault reaches it in one of three ways, and all end in the same repair:

- a process exits: it crashed or was killed (a signal, the OOM killer), a worker left its broken process
  group (code 3), or the gateway found its workers stalled (EXIT_SHARDS_STALLED);
- a process gives its grpc.health.v1 probes no reply for --liveness-timeout seconds (`HealthProbe`): it
  is frozen (stopped, or its event loop stuck), gets SIGKILL, and has exited;
- the gateway has not said SERVING for --ready-timeout seconds since it stopped saying it (or since the
  last repair): something hangs that nothing above saw, e.g. a process stuck before it listens; every
  process is replaced.

The repair: a dead gateway is started again; a dead worker, or a gateway that exited because its workers
stalled, means the group is broken, so every worker of it gets SIGKILL (a broken group holds nothing a
graceful stop would save, and a frozen worker ignores SIGTERM) and a fresh group starts on a fresh
rendezvous. Each repair is counted, and only more than --max-restarts within --restart-window seconds
(a crash loop, not a fault) makes `up` give up with exit 1, during start-up as much as after it.

Why the gateway reports a stall by exiting: it is the only process that knows what a step should cost
(gateway/engine.py `Engine.step_deadline`), and an exit status is the one signal every supervisor reads:
this loop, docker's restart policy, systemd, Kubernetes. The workers of a stalled step are alive, so only
a supervisor that can kill them (this one) replaces them at once; where none can (docker-compose, one
container per worker), the gateway's exit closes their step streams and their own watchdog ends them
(shard_worker/step_runner.py `StepRunner`, the wedge grace).
"""

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
from bloomduo.gateway.config import EXIT_SHARDS_STALLED, RequestLimits, SchedulerSettings, StepDeadline
from bloomduo.shard_worker.config import QUANTIZE_CHOICES

log = get_logger(__name__)


CLI = [sys.executable, "-m", "bloomduo"]
SUPERVISE_PERIOD_S = 0.2  # how often the supervisor looks at its processes
PROBE_PERIOD_S = 1.0  # how often it sends each process a health probe
PROBE_TIMEOUT_S = 2.0


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
        metadata={
            "help": "auto: the checkpoint's dtype (float16 on npu; float32 with --quantize int8-dynamic "
            "through fbgemm, where bloomduo's kernels were not built)",
            "choices": DTYPE_CHOICES,
        },
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
    liveness_timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "seconds a process may leave its health probes without any reply before it is killed",
            "flag": "--liveness-timeout",
        },
    )
    max_restarts: int = field(
        default=10,
        metadata={"help": "more repairs than this within --restart-window are a crash loop: `up` gives up"},
    )
    restart_window_s: float = field(
        default=300.0,
        metadata={"help": "seconds over which --max-restarts counts", "flag": "--restart-window"},
    )
    limits: RequestLimits = field(default_factory=RequestLimits)
    # Also sizes the workers' KV caches: one slot per sequence the gateway may run at once.
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    step_deadline: StepDeadline = field(default_factory=StepDeadline)
    ready_timeout_s: float = field(
        default=600.0,
        metadata={
            "help": "seconds the stack may go without serving (loading, after a repair) before all of it is "
            "restarted",
            "flag": "--ready-timeout",
        },
    )
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
            *to_flags(opts.limits), *to_flags(opts.scheduler), *to_flags(opts.step_deadline),
            *opts.gateway_args,
            *(("--metrics-port", str(opts.metrics_port)) if opts.metrics_port else ()),
        ]  # fmt: skip

    def launch(self) -> None:
        """Start every process and return at once (run_stack supervises them)."""
        self.shards = [subprocess.Popen(command) for command in self.shard_commands()]
        self.launch_gateway()
        log.info(
            "stack_starting", shards=len(self.shards), target=self.target, model=str(self.options.model_dir)
        )

    def start(self) -> None:
        """Start every process and wait until the gateway serves; any exit meanwhile raises RuntimeError.
        For tools and tests that hold a stack without supervising it."""
        self.launch()
        wait_serving(
            self.target, self.options.ready_timeout_s, [*self.shards, self.gateway], self.options.tls_root
        )

    def launch_gateway(self) -> None:
        self.gateway = subprocess.Popen(self.gateway_command())

    def replace_gateway(self) -> None:
        _kill([self.gateway])
        self.launch_gateway()

    def replace_shards(self) -> None:
        """A fresh shard group in place of a broken one: a survivor's process group broke with its peer."""
        _kill(self.shards)
        # A fresh rendezvous port: the old one may still be held by the dead group's store.
        self.dist_init = f"tcp://127.0.0.1:{free_ports(1, exclude=self._promised_ports())[0]}"
        self.shards = [subprocess.Popen(command) for command in self.shard_commands()]

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


def _kill(processes: list[subprocess.Popen | None]) -> None:
    for process in processes:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


def _stopped(pid: int) -> bool:
    """The process is stopped by a signal (SIGSTOP, SIGTSTP) or a tracer: it runs no code until continued."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("T", "t")
    except OSError:  # gone, or no /proc: nothing to say
        return False


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


class HealthProbe:
    """grpc.health.v1 probes of one process, one at a time, without ever blocking the supervisor.

    A probe that ends in DEADLINE_EXCEEDED got no reply at all: something holds the port (a stopped
    process's socket still accepts connections) but does not run. Any other end is a reply, a refusal
    included (before a process listens, or once a draining gateway stopped listening, the kernel refuses
    the connection), unless the process is stopped: a refusal then says nothing of it.
    """

    def __init__(self, target: str, root_certificates: bytes | None = None) -> None:
        # Reconnect within a second of a restarted process listening again, not after gRPC's usual backoff.
        options = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]
        self.channel = (
            grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options)
            if root_certificates
            else grpc.insecure_channel(target, options)
        )
        self.check = health_pb2_grpc.HealthStub(self.channel).Check
        self.call: grpc.Future | None = None
        self.restarted()

    def restarted(self) -> None:
        """Its process was started again: forget the last one's answers."""
        if self.call is not None:
            self.call.cancel()
        self.call = None
        self.sent_at = float("-inf")
        self.replied_at = time.monotonic()
        self.serving = False

    def poll(self, pid: int) -> None:
        """Read the probe in flight if it ended, and send the next one when it is time."""
        now = time.monotonic()
        if self.call is not None:
            if not self.call.done():
                return
            try:
                self.serving = self.call.result().status == health_pb2.HealthCheckResponse.SERVING
                self.replied_at = now
            except grpc.RpcError as exc:
                self.serving = False
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED and not _stopped(pid):
                    self.replied_at = now
            self.call = None
        if now - self.sent_at >= PROBE_PERIOD_S:
            self.sent_at = now
            self.call = self.check.future(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)

    @property
    def silent_s(self) -> float:
        return time.monotonic() - self.replied_at

    def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        self.channel.close()


class Supervisor:
    """The one loop that watches a launched stack and repairs it (the module's docstring says how)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.gateway_probe = HealthProbe(stack.target, stack.options.tls_root)
        self.shard_probes = [HealthProbe(target) for target in stack.shard_targets]
        self.restarts: list[float] = []
        # When not serving by then, the stack is hung (None while it serves).
        self.ready_by: float | None = time.monotonic() + stack.options.ready_timeout_s

    def run(self) -> int:
        """Supervise until interrupted (KeyboardInterrupt); returns 1 when it gives up."""
        announced = False
        while True:
            time.sleep(SUPERVISE_PERIOD_S)
            self._kill_frozen()
            shards, gateway = self._broken()
            if shards or gateway:
                if not self._within_budget():
                    return 1
                self._repair(shards, gateway)
            elif self.gateway_probe.serving:
                self.ready_by = None
                if not announced:
                    announced = True
                    self._announce()
            elif self.ready_by is None:
                self.ready_by = time.monotonic() + self.stack.options.ready_timeout_s

    def _announce(self) -> None:
        opts = self.stack.options
        http = f" and HTTP (OpenAI, TGI) on port {opts.http_port}" if opts.http_port else ""
        print(
            f"bloomduo is serving {opts.model_dir.name} on {self.stack.target}{http} (Ctrl-C stops it)",
            flush=True,
        )

    def _broken(self) -> tuple[bool, bool]:
        """Whether the shard group, and whether the gateway, must be replaced; logs why."""
        stack = self.stack
        dead_shards = [process for process in stack.shards if process.poll() is not None]
        for process in dead_shards:
            log.error(
                "shard_exited", pid=process.pid, returncode=process.returncode, action="replace the group"
            )
        gateway_dead = stack.gateway is not None and stack.gateway.poll() is not None
        stalled = gateway_dead and stack.gateway.returncode == EXIT_SHARDS_STALLED
        if gateway_dead:
            action = "restart it and replace the group" if stalled else "restart it"
            log.error("gateway_exited", returncode=stack.gateway.returncode, action=action)
        hung = self.ready_by is not None and time.monotonic() > self.ready_by
        if hung:
            log.error(
                "stack_not_ready", waited_s=stack.options.ready_timeout_s, action="replace every process"
            )
        return bool(dead_shards) or stalled or hung, gateway_dead or hung

    def _repair(self, shards: bool, gateway: bool) -> None:
        if shards:
            self.stack.replace_shards()
            for probe in self.shard_probes:
                probe.restarted()
        if gateway:
            self.stack.replace_gateway()
            self.gateway_probe.restarted()
        self.ready_by = time.monotonic() + self.stack.options.ready_timeout_s

    def _kill_frozen(self) -> None:
        watched = [
            (self.stack.gateway, self.gateway_probe),
            *zip(self.stack.shards, self.shard_probes, strict=True),
        ]
        for process, probe in watched:
            if process is None or process.poll() is not None:
                continue
            probe.poll(process.pid)
            if probe.silent_s > self.stack.options.liveness_timeout_s:
                log.error(
                    "process_frozen", pid=process.pid, silent_s=round(probe.silent_s, 1), action="SIGKILL"
                )
                process.kill()
                process.wait()

    def _within_budget(self) -> bool:
        opts = self.stack.options
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < opts.restart_window_s] + [now]
        if len(self.restarts) > opts.max_restarts:
            log.error(
                "stack_failed",
                reason=f"{len(self.restarts)} repairs in {opts.restart_window_s:.0f} s; giving up",
            )
            return False
        return True

    def close(self) -> None:
        for probe in (self.gateway_probe, *self.shard_probes):
            probe.close()


def run_stack(options: StackOptions) -> int:
    """Serve until Ctrl-C or SIGTERM (exit 0), repairing what fails (Supervisor); always stop everything."""
    stack = Stack(options)
    signal.signal(signal.SIGTERM, _interrupt)
    supervisor = Supervisor(stack)
    try:
        stack.launch()
        return supervisor.run()
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C must not interrupt the orderly stop and orphan the workers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log.info("stack_stopping")
        supervisor.close()
        stack.stop()
