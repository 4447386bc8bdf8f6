"""The SDK spreads calls over replicas, retries on another one, and leaves one that died.

Two real replicas (`bloomduo up`, the tiny demo model, one shard worker each, in process groups of their
own) behind one `ipv4:` target: sequential and concurrent calls land on both, as each gateway's own
bloomduo_requests_total counts them. Then the replica serving a running stream is killed outright (SIGKILL
to its whole process group): the stream, which had yielded tokens, fails and is not retried, and every
request after it, from the same client and from a new one, succeeds on the other.

Where a retry goes, and that a replica which is not SERVING gets no calls, is checked exactly against
scripted in-process servers, which fail and change their health on demand.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bloomduo.apps.launcher import free_ports, wait_serving
from bloomduo.client import AsyncClient, BloomduoError, Client
from bloomduo.client.sdk import _CHANNEL_OPTIONS, _SERVICE
from bloomduo.core.serving import SERVER_OPTIONS
from bloomduo.v1 import gateway_pb2_grpc
from tests._scripted_gateway import ScriptedServicer

SHORT = {"max_new_tokens": 2, "ignore_eos": True}


@dataclass
class Replica:
    """One `bloomduo up` whose launcher, gateway and worker share a process group of their own."""

    process: subprocess.Popen
    target: str
    metrics_port: int

    def served(self) -> int:
        """Requests this gateway finished with outcome ok, by its own counter."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as scrape:
            text = scrape.read().decode()
        return round(
            sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "bloomduo_requests_total" and sample.labels["outcome"] == "ok"
            )
        )

    def running(self) -> int:
        with Client(self.target, retries=0, timeout=10) as bloom:
            return bloom.info().load.running_requests

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _replica_ports(count: int) -> list[tuple[int, int]]:
    """(gRPC port, metrics port) of `count` replicas, all different, each metrics port's next one free too:
    the launcher gives its worker P + 1. Picked apart, a replica's P + 1 was once another one's port."""
    taken: set[int] = set()
    ports: list[tuple[int, int]] = []
    while len(ports) < count:
        port, metrics_port = free_ports(2, exclude=taken)
        if metrics_port + 1 not in taken | {port} and _bindable(metrics_port + 1):
            taken |= {port, metrics_port, metrics_port + 1}
            ports.append((port, metrics_port))
    return ports


def _start_replica(model_dir: Path, cache: Path, port: int, metrics_port: int) -> Replica:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "bloomduo", "up", "--model", str(model_dir), "--num-shards", "1"),
            *("--port", str(port), "--http-port", "0", "--metrics-port", str(metrics_port)),
            *("--threads-per-shard", "1"),
        ],
        stdout=subprocess.DEVNULL,
        env={**os.environ, "BLOOMDUO_CACHE": str(cache)},
        start_new_session=True,  # its own process group: one killpg ends launcher, gateway and worker
    )
    return Replica(process, f"127.0.0.1:{port}", metrics_port)


@pytest.fixture(scope="module")
def replicas(
    demo_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Replica]]:
    model_dir, cache = demo_model(), tmp_path_factory.mktemp("cache")
    started: list[Replica] = []
    try:
        # Both start at once: on two cores their imports overlap with each other's loading.
        started = [_start_replica(model_dir, cache, *ports) for ports in _replica_ports(2)]
        for replica in started:
            wait_serving(replica.target, 120, [replica.process])
        yield started
    finally:
        for replica in started:
            replica.stop()


def balanced(replicas: list[Replica]) -> str:
    return "ipv4:" + ",".join(replica.target for replica in replicas)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_gateways_answer_health_watches(replicas: list[Replica]) -> None:
    """gRPC's client-side health checks, which keep a replica that is not SERVING out of the picks, watch
    the gateway's grpc.health.v1 (its request interceptor once broke every Watch)."""
    for replica in replicas:
        with grpc.insecure_channel(replica.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=_SERVICE), timeout=10
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()


def test_calls_spread_over_every_replica(replicas: list[Replica]) -> None:
    before = [replica.served() for replica in replicas]
    with Client(balanced(replicas), timeout=30) as bloom:
        for _ in range(12):
            assert bloom.generate("Hello", **SHORT).generated_tokens == 2
    _wait_for(lambda: sum(r.served() for r in replicas) == sum(before) + 12)
    sequential = [replica.served() - count for replica, count in zip(replicas, before, strict=True)]
    # Round robin alternates once both connections are up; the first calls may find one still connecting.
    assert min(sequential) >= 4, sequential

    async def concurrently() -> list[int]:
        async with AsyncClient(balanced(replicas), timeout=30) as bloom:
            # Calls made before a connection is up all go to the replicas already connected: warm up
            # until each replica has served this client once.
            warm = [replica.served() for replica in replicas]
            for _ in range(20):
                await bloom.generate("warm", **SHORT)
                if all(r.served() > count for r, count in zip(replicas, warm, strict=True)):
                    break
            before = [replica.served() for replica in replicas]
            results = await asyncio.gather(*(bloom.generate(f"Hi {i}", **SHORT) for i in range(8)))
        assert [result.generated_tokens for result in results] == [2] * 8
        return before

    before = asyncio.run(concurrently())
    _wait_for(lambda: sum(r.served() for r in replicas) == sum(before) + 8)
    concurrent = [replica.served() - count for replica, count in zip(replicas, before, strict=True)]
    assert min(concurrent) >= 3, concurrent
    # A dns: target with one address still works.
    with Client(f"dns:///{replicas[0].target}", timeout=30) as bloom:
        assert bloom.generate("Hello", **SHORT).generated_tokens == 2


def test_a_killed_replica_fails_only_its_running_stream(replicas: list[Replica]) -> None:
    """Runs last: it kills one of the module's replicas."""
    with Client(balanced(replicas), timeout=60, retries=3, backoff_s=0.2) as bloom:
        for _ in range(4):  # both connections up
            bloom.generate("warm", **SHORT)
        stream = bloom.generate_stream("A long one", max_new_tokens=2000, ignore_eos=True)
        received = [next(stream)]
        (victim,) = [replica for replica in replicas if replica.running() == 1]
        (survivor,) = [replica for replica in replicas if replica is not victim]
        before = survivor.served()
        victim.kill()
        # Its tokens were seen: a retry would repeat them, so the stream fails instead.
        with pytest.raises(BloomduoError) as caught:
            received.extend(stream)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert 1 <= len(received) < 2000 and all(event.result is None for event in received)
        # Every request after it goes to the survivor.
        for _ in range(8):
            assert bloom.generate("after", **SHORT).generated_tokens == 2
        for _ in range(2):
            events = list(bloom.generate_stream("after", **SHORT))
            assert events[-1].result is not None and events[-1].result.generated_tokens == 2

    async def concurrently() -> None:
        async with AsyncClient(balanced(replicas), timeout=60) as bloom:
            results = await asyncio.gather(*(bloom.generate(f"new {i}", **SHORT) for i in range(6)))
        assert [result.generated_tokens for result in results] == [2] * 6

    asyncio.run(concurrently())  # a client created after the kill, one address dead
    _wait_for(lambda: survivor.served() == before + 8 + 2 + 6)


# --- exact placement, against scripted servers --------------------------------------------------------


@contextmanager
def scripted_replicas(count: int) -> Iterator[list[tuple[ScriptedServicer, health.HealthServicer, str]]]:
    """`count` in-process gateways that fail on demand, each with a grpc.health.v1 service saying SERVING."""
    servers, started = [], []
    try:
        for _ in range(count):
            servicer, checks = ScriptedServicer(), health.HealthServicer()
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
            gateway_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
            health_pb2_grpc.add_HealthServicer_to_server(checks, server)
            checks.set(_SERVICE, health_pb2.HealthCheckResponse.SERVING)
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            servers.append(server)
            started.append((servicer, checks, f"127.0.0.1:{port}"))
        yield started
    finally:
        # Not stop(grace=None), which waits for gRPC's shutdown without a bound: a run hung in it once.
        for stopped in [server.stop(grace=0) for server in servers]:
            stopped.wait(timeout=10)


def _until_every_replica_answered(bloom: Client, servicers: list[ScriptedServicer]) -> None:
    """Call until each replica got a call: round robin then has a connection to every one."""

    def answered() -> bool:
        with suppress(BloomduoError):
            bloom.info()
        return all(servicer.calls for servicer in servicers)

    _wait_for(answered)
    for servicer in servicers:
        servicer.calls = 0


def test_a_retry_goes_to_the_next_replica() -> None:
    with scripted_replicas(2) as [(bad, _, bad_target), (good, _, good_target)]:
        bad.code = grpc.StatusCode.UNAVAILABLE
        target = f"ipv4:{bad_target},{good_target}"
        with Client(target, retries=0) as bloom:
            _until_every_replica_answered(bloom, [bad, good])
            failed = 0
            for _ in range(4):
                try:
                    bloom.tokenize("x")
                except BloomduoError:
                    failed += 1
            # Without retries, every other call lands on the failing replica: round robin alternates within
            # one picker, and gRPC rebuilds its picker, at a random index, when a connection's or health state
            # changes, so a run may hold a break in the rhythm.
            assert 1 <= failed <= 3
        with Client(target, retries=1, backoff_s=0.01) as bloom:
            _until_every_replica_answered(bloom, [bad, good])
            for _ in range(10):
                assert bloom.tokenize("x") == [1, 2]
            # A call picked onto the failing replica was tried once more, and that try went to the other (a
            # second try on it would have failed the call): about every call was picked onto it first (10 in
            # the rhythm, 9 if it began on the other; one or two fewer where the picker was rebuilt: 8 once in
            # a fresh-clone run).
            assert good.calls == 10 and bad.calls >= 7
            # So is a stream that failed before its first event.
            for _ in range(4):
                events = list(bloom.generate_stream("x"))
                assert events[-1].result is not None
            assert good.calls == 14
            # A stream that yielded an event first is not retried anywhere.
            bad.events_before_failure = 1
            calls = bad.calls + good.calls
            outcomes = []
            for _ in range(4):
                events = []
                try:
                    events.extend(bloom.generate_stream("x"))
                    outcomes.append(("ok", len(events)))
                except BloomduoError as exc:
                    outcomes.append((exc.code, len(events)))
            assert sorted(outcomes, key=str) == [("ok", 2)] * 2 + [(grpc.StatusCode.UNAVAILABLE, 1)] * 2
            assert bad.calls + good.calls == calls + 4


def test_a_replica_that_is_not_serving_gets_no_calls() -> None:
    with scripted_replicas(2) as [(first, first_health, first_target), (second, _, second_target)]:
        first_health.set(_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        with Client(f"ipv4:{first_target},{second_target}", retries=0) as bloom:
            for _ in range(6):
                bloom.tokenize("x")
            assert (first.calls, second.calls) == (0, 6)
            first_health.set(_SERVICE, health_pb2.HealthCheckResponse.SERVING)
            _wait_for(lambda: bloom.tokenize("x") and first.calls > 0)
            # Draining, say: out of the picks as soon as its Watch stream says so.
            first_health.enter_graceful_shutdown()
            time.sleep(0.2)
            calls = first.calls
            for _ in range(6):
                bloom.tokenize("x")
            assert first.calls == calls


def test_keepalive_pings_fit_the_gateways_policy() -> None:
    """A client that pinged more often than the gateway allows would be sent away (too_many_pings)."""
    client, server = dict(_CHANNEL_OPTIONS), dict(SERVER_OPTIONS)
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert client["grpc.keepalive_permit_without_calls"] == server["grpc.keepalive_permit_without_calls"] == 1
    # Keep pinging an idle connection: by default a client stops after two pings without data.
    assert client["grpc.http2.max_pings_without_data"] == 0
    assert client["grpc.keepalive_timeout_ms"] < client["grpc.keepalive_time_ms"]
