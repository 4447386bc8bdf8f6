"""Chaos: faults injected at random moments into a real `bloomduo up` under steady load.

`bloomduo up` (tiny demo model, two workers) serves gRPC and HTTP clients sending requests back to back
while faults hit a random worker or the gateway: SIGKILL, SIGSTOP (SIGCONT some seconds later, or never)
and SIGTERM, during plain load, during a long prompt's prefill, during start-up and during the recovery
from another fault. After every fault:

- every request ended in a complete result or a retryable refusal (gRPC UNAVAILABLE or RESOURCE_EXHAUSTED,
  HTTP 503 or 429, or, while the gateway itself is down, a refused or dropped connection): none lost, none
  past its deadline;
- the stack serves again within SERVING_BOUND_S of the fault;
- a fixed greedy probe gives the same tokens as before the first fault.

Detection is read from the stack's own logs: the first event after the fault in which a process noticed
it (the gateway failing requests or draining, the launcher seeing an exit or a frozen process, a worker
leaving its group). A fault no process had to notice (a SIGSTOP continued before any deadline) counts
as tolerated.

After the run: Info shows no request and no cached sequence, `up` stops with exit 0, and nothing is left:
no process it started, no shared-memory segment, no port. Resident memory of each role, idle, stays
within RSS_GROWTH of what it was after the warm-up.

`test_chaos_short` (default suite) injects one fault of each kind; `test_chaos` (`-m chaos`,
scripts/chaos.sh) injects BLOOMDUO_CHAOS_FAULTS (30) within BLOOMDUO_CHAOS_MAX_S (1800) seconds, drawn
with BLOOMDUO_CHAOS_SEED, and prints the table the README's reliability section shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from bloomduo.apps.launcher import free_ports
from bloomduo.client import AsyncClient, BloomduoError, Client
from tests.test_faults import _health, _worker

FAULTS = int(os.environ.get("BLOOMDUO_CHAOS_FAULTS", 30))
MAX_S = float(os.environ.get("BLOOMDUO_CHAOS_MAX_S", 1800))
SEED = int(os.environ.get("BLOOMDUO_CHAOS_SEED", random.randrange(2**32)))
GRPC_CLIENTS, HTTP_CLIENTS = 4, 2
# Each request's deadline: past every bound a fault is detected within (liveness 10 s, stall 5 s, a
# worker's drain 5 s), so a fault must end a request before its deadline does.
REQUEST_DEADLINE_S = 30.0
SERVING_BOUND_S = 30.0
# What a fault must be noticed within: a killed or stopping process at once, a worker stopped mid-step by
# its step's deadline (5 s at the least), any other stopped process by the launcher's liveness bound (10 s
# without a reply to probes sent every second).
SIGNALLED_BOUND_S, MID_STEP_BOUND_S, FROZEN_BOUND_S = 2.0, 10.0, 12.0
QUIET_S = 15.0  # a fault nothing noticed by then was tolerated (or healed by itself)
RSS_GROWTH = 1.25
SERVING = health_pb2.HealthCheckResponse.SERVING
LONG_PROMPT = "A much longer prompt about many things, " * 40  # ~700 tokens: a prefill of many chunks
PROMPTS = ["Once upon a time", "The capital of France is", "北京是中国的首都", LONG_PROMPT]
PROBE = ("The same question, every time:", 16)
# Log events in which a process noticed a fault (the gateway, the launcher, a worker).
NOTICED = {
    "shards_lost", "gateway_exiting", "gateway_draining", "process_frozen", "shard_exited",
    "gateway_exited", "stack_not_ready", "shard_group_broken", "shard_stopping",
}  # fmt: skip
# Outcomes of a request; the first three are fine, the rest fail the run.
OK, REFUSED, DOOR_DOWN = "ok", "refused", "gateway down"
HUNG, ERROR = "hung", "error"


@dataclass
class Ledger:
    """Every request's outcome (requests are sent from several threads)."""

    started: int = 0
    outcomes: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        with self.lock:
            self.started += 1

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome in (HUNG, ERROR):
                self.errors.append(detail)

    @property
    def lost(self) -> int:
        return self.started - sum(self.outcomes.values())


@dataclass
class Fault:
    kind: str  # SIGKILL, SIGSTOP, SIGTERM
    target: str  # gateway, shard0, shard1
    moment: str  # start-up, load, prefill, recovery
    at: float  # time.time() of the signal
    cont_after_s: float | None = None  # SIGSTOP: SIGCONT this much later (None: never)
    detected_s: float | None = None  # None: nothing had to notice it
    serving_s: float = 0.0  # from the signal to SERVING again (0: it never stopped serving)
    same_tokens: bool = True

    def __str__(self) -> str:
        kind = self.kind
        if kind == "SIGSTOP":
            kind += (
                " (never SIGCONT)"
                if self.cont_after_s is None
                else f" (SIGCONT {self.cont_after_s:.0f} s on)"
            )
        detected = "tolerated" if self.detected_s is None else f"detected in {self.detected_s:.2f} s"
        return f"{kind} {self.target} during {self.moment}: {detected}, serving after {self.serving_s:.1f} s"


class Stack:
    """A `bloomduo up` of its own: the launcher, its children's pids as they come and go, its logs."""

    def __init__(self, tmp_path: Path) -> None:
        self.port, self.http_port = free_ports(2)
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = tmp_path / "up.log"
        self.log = self.log_path.open("w")
        self.up = subprocess.Popen(
            [sys.executable, "-m", "bloomduo", "up", "--port", str(self.port),
             "--http-port", str(self.http_port), "--threads-per-shard", "1",
             "--max-batch-prefill-tokens", "64",  # long prompts take many steps to prefill
             "--max-restarts", "1000"],  # a chaos run repairs far more often than a crash loop would
            stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "BLOOMDUO_CACHE": str(tmp_path / "cache")},
        )  # fmt: skip
        self.seen: dict[int, str] = {}  # every pid the stack ran, with its command line
        self.ports: set[int] = {self.port, self.http_port}

    def children(self) -> dict[int, str]:
        """The launcher's live processes and theirs (a worker's shared-memory resource tracker)."""
        found: dict[int, str] = {}
        parents = [self.up.pid]
        while parents:
            listed = subprocess.run(["pgrep", "-P", str(parents.pop())], capture_output=True, text=True)
            for pid in map(int, listed.stdout.split()):
                with contextlib.suppress(OSError):
                    found[pid] = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
                    parents.append(pid)
        self.seen.update(found)
        for command in found.values():
            words = command.split()
            for flag in ("--port", "--dist-init"):
                if flag in words:
                    self.ports.add(int(words[words.index(flag) + 1].rsplit(":", 1)[-1]))
        return found

    def pid(self, role: str) -> int:
        """The pid of "gateway", "shard0" or "shard1", once it runs (it may be restarting)."""
        if role != "gateway":
            return _worker(self.up, int(role.removeprefix("shard")))[0]
        deadline = time.monotonic() + 30
        while not (gateways := [pid for pid, command in self.children().items() if " gateway " in command]):
            assert time.monotonic() < deadline, "no gateway process for 30 s"
            time.sleep(0.1)
        return gateways[0]

    def serving(self) -> bool:
        return _health(self.target) == SERVING

    def noticed_after(self, since: float) -> float | None:
        """Wall time of the first log event after `since` in which a process noticed a fault."""
        self.log.flush()
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") in NOTICED:
                    at = datetime.datetime.fromisoformat(event["timestamp"]).timestamp()
                    if at >= since:
                        return at
        return None

    def lifecycle(self) -> list[str]:
        """The log's lines but the requests' own (what the processes did, not what they served)."""
        self.log.flush()
        lines = self.log_path.read_text().splitlines()
        return [line for line in lines if line.strip() and '"request_id"' not in line]

    def stop(self) -> int:
        self.children()
        self.up.send_signal(signal.SIGTERM)
        try:
            return self.up.wait(timeout=90)
        finally:
            self.log.close()


def _wait(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def _probe(target: str) -> list[int]:
    prompt, tokens = PROBE
    with Client(target, timeout=REQUEST_DEADLINE_S, retries=5) as bloom:
        result = bloom.generate(prompt, max_new_tokens=tokens, ignore_eos=True, details=True)
    return [token.id for token in result.tokens]


# --- load -------------------------------------------------------------------------------------------


async def _counted(ledger: Ledger, request: Awaitable[str]) -> str:
    """The request's outcome, in the ledger; every failure is counted, none escapes uncounted."""
    ledger.start()
    try:
        outcome = await asyncio.wait_for(request, REQUEST_DEADLINE_S + 5)
    except TimeoutError:
        outcome, detail = HUNG, "no answer past the request's deadline"
    except Exception as exc:
        outcome, detail = ERROR, f"{type(exc).__name__}: {exc}"
    else:
        detail = ""
    ledger.add(outcome, detail)
    return outcome


async def _grpc_request(
    bloom: AsyncClient, rng: random.Random, prompt: str | None = None, tokens: int | None = None
) -> str:
    """One request (a random one unless told its prompt and length); returns its outcome."""
    prompt, tokens = prompt or rng.choice(PROMPTS), tokens or rng.choice([4, 8, 16, 32])
    params = {"max_new_tokens": tokens, "ignore_eos": True, "timeout": REQUEST_DEADLINE_S}
    if rng.random() < 0.3:
        params.update(do_sample=True, seed=rng.randrange(2**31))
    try:
        if rng.random() < 0.5:
            result = await bloom.generate(prompt, **params)
        else:
            result = None
            async for event in bloom.generate_stream(prompt, **params):
                result = event.result
        assert result is not None and result.generated_tokens == tokens, result
        return OK
    except BloomduoError as exc:
        if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return REFUSED
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return HUNG
        raise


def _http_request(port: int, model: str, rng: random.Random) -> str:
    tokens = rng.choice([4, 8, 16])
    body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": tokens, "temperature": 0}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({**body, "ignore_eos": True}).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_DEADLINE_S) as response:
            answer = json.loads(response.read())
        assert answer["usage"]["completion_tokens"] == tokens, answer
        return OK
    except urllib.error.HTTPError as exc:
        if exc.code in (503, 429):
            return REFUSED
        raise
    except TimeoutError:
        return HUNG
    except (urllib.error.URLError, ConnectionError, HTTPException) as exc:
        # Nothing listening, or the connection dropped: the gateway process is down or just died.
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            return HUNG
        if isinstance(reason, ConnectionError | HTTPException):
            return DOOR_DOWN
        raise


class Load:
    """GRPC_CLIENTS gRPC and HTTP_CLIENTS HTTP clients sending requests back to back, on a thread of its
    own, until stopped."""

    def __init__(self, stack: Stack, model: str, seed: int) -> None:
        self.stack, self.model, self.seed = stack, model, seed
        self.ledger = Ledger()
        self.running = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._clients()), daemon=True)

    def __enter__(self) -> Ledger:
        self.running.set()
        self.thread.start()
        return self.ledger

    def __exit__(self, *exc_info: object) -> None:
        self.running.clear()
        self.thread.join(REQUEST_DEADLINE_S + 30)
        assert not self.thread.is_alive(), "the load did not stop: a request hangs"

    async def _count(self, request: Awaitable[str]) -> None:
        if await _counted(self.ledger, request) != OK:
            await asyncio.sleep(0.2)  # a refused client backs off a little

    async def _grpc_client(self, rng: random.Random) -> None:
        async with AsyncClient(self.stack.target, retries=0) as bloom:
            while self.running.is_set():
                await self._count(_grpc_request(bloom, rng))

    async def _http_client(self, rng: random.Random) -> None:
        while self.running.is_set():
            await self._count(asyncio.to_thread(_http_request, self.stack.http_port, self.model, rng))

    async def _clients(self) -> None:
        rngs = [random.Random(self.seed + i) for i in range(GRPC_CLIENTS + HTTP_CLIENTS)]
        await asyncio.gather(
            *(self._grpc_client(rng) for rng in rngs[:GRPC_CLIENTS]),
            *(self._http_client(rng) for rng in rngs[GRPC_CLIENTS:]),
        )


# --- faults ------------------------------------------------------------------------------------------


def _signal(pid: int, kind: str) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone: the fault found it dead
        os.kill(pid, getattr(signal, kind))


def _inject(stack: Stack, fault: Fault) -> None:
    pid = stack.pid(fault.target)
    fault.at = time.time()
    _signal(pid, fault.kind)
    if fault.kind == "SIGSTOP" and fault.cont_after_s is not None:
        threading.Timer(fault.cont_after_s, _signal, (pid, "SIGCONT")).start()


def _prefill_then(stack: Stack, fault: Fault, ledger: Ledger, rng: random.Random) -> None:
    """Send a long prompt, and inject the fault while it is being prefilled (64 tokens a step)."""

    own_rng = random.Random(rng.random())  # the sender's thread draws from its own

    async def long_prompt() -> None:
        async with AsyncClient(stack.target, retries=0) as bloom:
            await _counted(ledger, _grpc_request(bloom, own_rng, LONG_PROMPT, 4))

    sender = threading.Thread(target=asyncio.run, args=(long_prompt(),))
    sender.start()
    time.sleep(rng.uniform(0.0, 0.15))
    _inject(stack, fault)
    sender.join(REQUEST_DEADLINE_S + 10)


def _detected(stack: Stack, fault: Fault) -> None:
    noticed = stack.noticed_after(fault.at)
    fault.detected_s = None if noticed is None else noticed - fault.at


def _settle(stack: Stack, fault: Fault, reference: list[int]) -> None:
    """Wait until the stack noticed the fault and serves again, or shows nothing had to notice it; then
    probe it. Fills in the fault's figures, timed from its signal."""
    left_serving, serving = False, True
    quiet_s = QUIET_S + (fault.cont_after_s or 0.0)
    looked = 0.0
    while (elapsed := time.time() - fault.at) < SERVING_BOUND_S + quiet_s:
        serving = stack.serving()
        left_serving = left_serving or not serving
        if serving and (left_serving or elapsed > quiet_s):
            break
        if time.monotonic() - looked > 0.5:  # processes started by a repair, for the leak checks
            looked = time.monotonic()
            stack.children()
        time.sleep(0.05)
    _detected(stack, fault)
    fault.serving_s = elapsed if left_serving else 0.0
    fault.same_tokens = serving and _probe(stack.target) == reference


def _draw(rng: random.Random) -> Fault:
    kind = rng.choice(["SIGKILL", "SIGSTOP", "SIGTERM"])
    cont = None if rng.random() < 0.5 else rng.uniform(1.0, 20.0)
    return Fault(
        kind=kind,
        target=rng.choice(["gateway", "shard0", "shard1"]),
        moment=rng.choices(["load", "prefill", "recovery"], weights=[5, 2, 2])[0],
        at=0.0,
        cont_after_s=cont if kind == "SIGSTOP" else None,
    )


def _run_fault(
    stack: Stack, fault: Fault, ledger: Ledger, rng: random.Random, reference: list[int]
) -> list[Fault]:
    """Inject one fault at its moment (two for "recovery": the second while the first is repaired)."""
    if fault.moment == "prefill":
        _prefill_then(stack, fault, ledger, rng)
        faults = [fault]
    elif fault.moment == "recovery":
        first = Fault("SIGKILL", rng.choice(["shard0", "shard1"]), "load", 0.0)
        old = stack.pid(fault.target)
        _inject(stack, first)
        # The second fault hits the repair: new processes starting, or the gateway re-connecting.
        assert _wait(lambda: stack.pid(fault.target) != old or not stack.serving(), timeout_s=15)
        time.sleep(rng.uniform(0.0, 2.0))
        _inject(stack, fault)
        faults = [first, fault]
    else:
        time.sleep(rng.uniform(0.5, 3.0))
        _inject(stack, fault)
        faults = [fault]
    _settle(stack, fault, reference)
    # The first of a pair was noticed by itself, and repaired with the second.
    for earlier in faults[:-1]:
        _detected(stack, earlier)
        earlier.serving_s = fault.serving_s + fault.at - earlier.at
        earlier.same_tokens = fault.same_tokens
    return faults


# --- leaks ------------------------------------------------------------------------------------------


def _running(pid: int, command: str) -> bool:
    """`pid` still runs `command` (the number may have gone to another process since)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ") == command
    except OSError:
        return False


def _shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("bloomduo_ar_")}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _roles_rss(stack: Stack) -> dict[str, float]:
    roles = {"launcher": stack.up.pid, **{role: stack.pid(role) for role in ("gateway", "shard0", "shard1")}}
    return {role: _rss_mb(pid) for role, pid in roles.items()}


def _idle(target: str) -> bool:
    with Client(target, timeout=10) as bloom:
        load = bloom.info().load
    held = {load.kept_sequences}  # the last request's cache, kept for a next turn
    return not (load.running_requests or load.waiting_requests) and set(load.worker_cached_sequences) == held


def _port_free(port: int) -> bool:
    """Nothing listens on it (connections of killed processes may linger in TIME_WAIT: that holds nothing)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- the run -----------------------------------------------------------------------------------------


@dataclass
class Run:
    faults: list[Fault]
    ledger: Ledger
    rss_before: dict[str, float]
    rss_after: dict[str, float]
    elapsed_s: float


@contextlib.contextmanager
def _stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path)
    try:
        yield stack
    except BaseException:
        # A failure in CI leaves only this output behind: the seed replays the run, the events say why.
        print(f"seed {SEED} (BLOOMDUO_CHAOS_SEED={SEED} replays it); the stack's events, requests left out:")
        print(*stack.lifecycle()[-60:], sep="\n")
        raise
    finally:
        if stack.up.poll() is None:
            stack.up.kill()
            for pid in stack.children():
                _signal(pid, "SIGKILL")


def chaos(tmp_path: Path, planned: list[Fault] | None, count: int, seed: int, max_s: float) -> Run:
    """Start a stack, inject `planned` faults (else `count` drawn ones) under load, stop it; check the
    leaks. The start-up fault comes first whatever the plan."""
    rng = random.Random(seed)
    shm_before = _shm_segments()
    with _stack(tmp_path) as stack:
        # Start-up: a worker hit as soon as it runs, before the stack ever served.
        startup = Fault(rng.choice(["SIGKILL", "SIGTERM"]), rng.choice(["shard0", "shard1"]), "start-up", 0.0)
        _inject(stack, startup)
        assert stack.target in stack.up.stdout.readline(), "up never served after a start-up fault"
        startup.serving_s = time.time() - startup.at
        _detected(stack, startup)
        reference = _probe(stack.target)
        faults = [startup]
        model = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}/v1/models").read())
        started = time.monotonic()
        with Load(stack, model["data"][0]["id"], seed) as ledger:
            time.sleep(5)  # warm-up: every cache and buffer at its working size
            rss_before = _roles_rss(stack)
            plan = list(planned) if planned is not None else [_draw(rng) for _ in range(count)]
            while plan and len(faults) < count + 1 and time.monotonic() - started < max_s:
                faults += _run_fault(stack, plan.pop(0), ledger, rng, reference)
                print(faults[-1], flush=True)
        assert _wait(lambda: _idle(stack.target), timeout_s=30), "requests or KV caches left after the load"
        rss_after = _roles_rss(stack)
        elapsed = time.monotonic() - started
        assert stack.stop() == 0
    time.sleep(1)  # a killed worker's resource tracker exits once it sees its parent gone
    orphans = {pid: command for pid, command in stack.seen.items() if _running(pid, command)}
    assert not orphans, f"processes left behind: {orphans}"
    assert _wait(lambda: not (_shm_segments() - shm_before), timeout_s=5), "shared memory left behind"
    held = sorted(port for port in stack.ports if not _port_free(port))
    assert not held, f"ports still held: {held}"
    return Run(faults, ledger, rss_before, rss_after, elapsed)


def _detect_bound(fault: Fault) -> float:
    if fault.kind != "SIGSTOP":
        return SIGNALLED_BOUND_S
    # Under steady load a worker is always in a step, but not while it starts again after a repair.
    mid_step = fault.target != "gateway" and fault.moment in ("load", "prefill")
    return MID_STEP_BOUND_S if mid_step else FROZEN_BOUND_S


def _check(run: Run) -> None:
    ledger = run.ledger
    assert ledger.lost == 0, f"{ledger.lost} requests lost"
    assert not ledger.errors, Counter(ledger.errors).most_common(5)
    assert ledger.outcomes[OK] > 0
    for fault in run.faults:
        assert fault.serving_s <= SERVING_BOUND_S, fault
        assert fault.detected_s is None or fault.detected_s <= _detect_bound(fault), fault
        assert fault.same_tokens, f"the probe's tokens changed after {fault}"
    for role, before in run.rss_before.items():
        assert run.rss_after[role] <= before * RSS_GROWTH + 20, (
            f"{role}: {before:.0f} -> {run.rss_after[role]:.0f} MB"
        )


def _table(run: Run) -> str:
    by_kind: dict[str, list[Fault]] = {}
    for fault in run.faults:
        by_kind.setdefault(f"{fault.kind} {'gateway' if fault.target == 'gateway' else 'worker'}", []).append(
            fault
        )
    lines = [
        "| fault | injected | recovered | tolerated | worst detect s | worst SERVING again s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, faults in sorted(by_kind.items()):
        detected = [f.detected_s for f in faults if f.detected_s is not None]
        recovered = sum(f.same_tokens and f.serving_s <= SERVING_BOUND_S for f in faults)
        lines.append(
            f"| {name} | {len(faults)} | {recovered} | {len(faults) - len(detected)} | "
            f"{max(detected, default=0):.1f} | {max(f.serving_s for f in faults):.1f} |"
        )
    o = run.ledger.outcomes
    lines.append(
        f"\nrequests: {run.ledger.started} started, {o[OK]} complete, {o[REFUSED]} refused (UNAVAILABLE / "
        f"RESOURCE_EXHAUSTED / 503 / 429), {o[DOOR_DOWN]} with the gateway down, {o[HUNG]} hung, "
        f"{o[ERROR]} other errors, {run.ledger.lost} lost; {run.elapsed_s:.0f} s under load; idle MB "
        + ", ".join(
            f"{role} {run.rss_before[role]:.0f} -> {run.rss_after[role]:.0f}" for role in run.rss_before
        )
    )
    return "\n".join(lines)


def test_chaos_short(tmp_path: Path) -> None:
    """One fault of each kind, in the default suite: a worker killed, a worker frozen for good while a
    long prompt is prefilled, the gateway told to stop, the gateway frozen for good (and a worker hit
    during start-up)."""
    plan = [
        Fault("SIGKILL", "shard1", "load", 0.0),
        Fault("SIGSTOP", "shard0", "prefill", 0.0),
        Fault("SIGTERM", "gateway", "load", 0.0),
        Fault("SIGSTOP", "gateway", "load", 0.0),
    ]
    run = chaos(tmp_path, plan, len(plan), seed=SEED, max_s=300)
    print(f"\nseed {SEED}\n{_table(run)}")
    _check(run)
    assert all(fault.detected_s is not None for fault in run.faults[1:]), [str(f) for f in run.faults]


@pytest.mark.chaos
@pytest.mark.timeout(MAX_S + 600)
def test_chaos(tmp_path: Path) -> None:
    run = chaos(tmp_path, None, FAULTS, seed=SEED, max_s=MAX_S)
    print(f"\nchaos: {len(run.faults)} faults, seed {SEED}\n{_table(run)}", flush=True)
    _check(run)
    assert len(run.faults) >= min(FAULTS, 30) or run.elapsed_s >= MAX_S
