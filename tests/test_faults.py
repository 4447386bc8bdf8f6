"""Faults on the real stack: a worker killed mid-generation or during start-up, a worker frozen mid-step,
a gateway restart, cancellation, drain."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bloomduo.apps.launcher import free_ports
from bloomduo.client import BloomduoError, Client
from tests.conftest import running_stack

LONG = {"max_new_tokens": 1500, "ignore_eos": True}


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            )
        except grpc.RpcError:
            return -1


def _wait_for(predicate, timeout_s: float, interval_s: float = 0.1) -> float:
    """Seconds until predicate() held; fails the test after timeout_s."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"condition not reached within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - started


def _stream_until_error(target: str, errors: list, first_token: threading.Event) -> None:
    try:
        with Client(target) as bloom:
            for _ in bloom.generate_stream("A long story", **LONG):
                first_token.set()
    except BloomduoError as exc:
        errors.append((exc, time.monotonic()))


def _children(pid: int) -> dict[int, str]:
    """pid's child processes and their command lines (one that exits meanwhile is left out)."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    children = {}
    for child in found:
        with contextlib.suppress(OSError):
            children[int(child)] = Path(f"/proc/{child}/cmdline").read_text().replace("\0", " ")
    return children


def _worker(up: subprocess.Popen, rank: int) -> tuple[int, str]:
    """The pid and address of `up`'s shard worker of this rank, once it runs."""
    found: list[tuple[int, str]] = []

    def started() -> bool:
        for pid, command in _children(up.pid).items():
            words = command.split()
            if "shard" in words and words[words.index("--rank") + 1] == str(rank):
                found.append((pid, f"127.0.0.1:{words[words.index('--port') + 1]}"))
        return bool(found)

    _wait_for(started, timeout_s=30)
    return found[-1]


@contextlib.contextmanager
def bloomduo_up(tmp_path, wait: bool = True) -> Iterator[tuple[subprocess.Popen, str]]:
    """`bloomduo up` on the demo model, as a user runs it: the launcher supervises its processes. With
    wait, once it said it serves; else at once (its stdout says when it serves)."""
    port, http_port = free_ports(2)  # HTTP off its default 8080, which this machine may not have free
    env = {**os.environ, "BLOOMDUO_CACHE": str(tmp_path / "cache")}
    up = subprocess.Popen(
        [sys.executable, "-m", "bloomduo", "up", "--port", str(port), "--threads-per-shard", "1",
         "--http-port", str(http_port)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        if wait:
            assert target in up.stdout.readline()
        yield up, target
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0


def _serving(target: str) -> bool:
    return _health(target) == health_pb2.HealthCheckResponse.SERVING


def test_killed_worker_fails_requests_fast_and_the_stack_heals(tmp_path) -> None:
    with bloomduo_up(tmp_path) as (up, target):
        with Client(target) as bloom:
            before = bloom.generate("The same prompt", max_new_tokens=24, ignore_eos=True, details=True)
        victim, _ = _worker(up, rank=1)
        survivor, _ = _worker(up, rank=0)

        errors: list = []
        first_token = threading.Event()
        streamer = threading.Thread(target=_stream_until_error, args=(target, errors, first_token))
        streamer.start()
        assert first_token.wait(60)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        streamer.join(30)
        assert not streamer.is_alive()
        (error, failed_at), *_ = errors
        assert error.code == grpc.StatusCode.UNAVAILABLE and "shard" in error.message
        assert failed_at - killed_at < 10
        assert _health(target) == health_pb2.HealthCheckResponse.NOT_SERVING
        # The pair re-forms in fresh processes (the survivor does not stay in the broken group) and the
        # gateway serves again by itself.
        _wait_for(lambda: _zombie(survivor), timeout_s=30)
        healed_in = _wait_for(lambda: _serving(target), timeout_s=120)
        with Client(target) as bloom:
            after = bloom.generate("The same prompt", max_new_tokens=24, ignore_eos=True, details=True)
        assert [t.id for t in after.tokens] == [t.id for t in before.tokens]
        print(f"failed in {failed_at - killed_at:.2f} s, serving again after {healed_in:.1f} s")


def test_a_worker_killed_during_start_up_is_replaced_and_the_stack_serves(tmp_path) -> None:
    """`up` once took any exit before its first SERVING for a failed start and stopped everything."""
    with bloomduo_up(tmp_path, wait=False) as (up, target):
        victim, address = _worker(up, rank=1)
        # A worker listens once imported, then loads; the gateway, slower to import, listens later.
        _wait_for(lambda: _health(address) != -1, timeout_s=60, interval_s=0.02)
        assert not _serving(target)
        os.kill(victim, signal.SIGKILL)
        assert target in up.stdout.readline()  # printed once it serves, after the repair
        assert _worker(up, rank=1)[0] != victim
        with Client(target) as bloom:
            assert bloom.generate("after the repair", max_new_tokens=4, ignore_eos=True).generated_tokens == 4


def test_a_frozen_worker_fails_its_requests_within_seconds_and_is_killed(tmp_path) -> None:
    """SIGSTOP mid-step, as a hung chip or a wedged collective looks from outside: the step's deadline,
    not gRPC's keepalive a minute later, fails the requests, and the frozen group is replaced."""
    with bloomduo_up(tmp_path) as (up, target):
        with Client(target) as bloom:
            before = bloom.generate("The same prompt", max_new_tokens=24, ignore_eos=True, details=True)
        victim, _ = _worker(up, rank=1)
        errors: list = []
        first_token = threading.Event()
        streamer = threading.Thread(target=_stream_until_error, args=(target, errors, first_token))
        streamer.start()
        assert first_token.wait(60)
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            streamer.join(30)
            assert not streamer.is_alive()
            (error, failed_at), *_ = errors
            assert error.code == grpc.StatusCode.UNAVAILABLE and "stalled" in error.message, error
            assert failed_at - stopped_at < 10
            # A stopped process ignores SIGTERM: only SIGKILL ends it.
            _wait_for(lambda: _zombie(victim), timeout_s=30)
            healed_in = _wait_for(lambda: _serving(target), timeout_s=30)
        finally:
            if not _zombie(victim):  # failed before the repair: leave no stopped process behind
                os.kill(victim, signal.SIGCONT)
        with Client(target) as bloom:
            after = bloom.generate("The same prompt", max_new_tokens=24, ignore_eos=True, details=True)
        assert [t.id for t in after.tokens] == [t.id for t in before.tokens]
        print(f"failed in {failed_at - stopped_at:.2f} s, serving again {healed_in:.1f} s after that")


def test_killed_gateway_is_restarted_and_leaves_no_orphaned_cache(tmp_path) -> None:
    with bloomduo_up(tmp_path) as (up, target):
        gateway = next(pid for pid, cmd in _children(up.pid).items() if " gateway " in cmd)
        errors: list = []
        first_token = threading.Event()
        streamer = threading.Thread(target=_stream_until_error, args=(target, errors, first_token))
        streamer.start()
        assert first_token.wait(60)
        os.kill(gateway, signal.SIGKILL)
        streamer.join(30)
        assert errors and errors[0][0].code == grpc.StatusCode.UNAVAILABLE
        # A worker may have been mid-step when its gateway died; it then leaves its group and the
        # launcher re-forms it. Either way the stack comes back with every cache empty.
        _wait_for(lambda: _serving(target) and _idle(target), timeout_s=120)
        with Client(target) as bloom:
            assert bloom.generate("again", max_new_tokens=3).generated_tokens == 3


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_cancel_and_deadline_free_the_kv_cache(tiny_stack) -> None:
    with Client(tiny_stack.target) as bloom:
        stream = bloom.generate_stream("Cancel me", **LONG)
        for _ in range(3):
            next(stream)
        assert max(bloom.info(timeout=5).load.worker_cached_sequences) == 1
        stream.close()  # the client goes away mid-generation
        _wait_for(lambda: _idle(tiny_stack.target), timeout_s=5)

        with pytest.raises(BloomduoError) as caught:
            Client(tiny_stack.target, timeout=0.5).generate("Too slow", **LONG)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_for(lambda: _idle(tiny_stack.target), timeout_s=5)
        assert bloom.generate("next one", max_new_tokens=3).generated_tokens == 3


def _idle(target: str) -> bool:
    with Client(target) as bloom:
        load = bloom.info(timeout=5).load
    # A finished request's cache may stay for a next turn (kept_sequences); a cancelled one's never does.
    return (
        load.running_requests == 0
        and load.waiting_requests == 0
        and set(load.worker_cached_sequences) == {load.kept_sequences}
    )


def test_overload_is_refused_at_once(demo_model) -> None:
    gateway_args = ("--max-concurrent-requests", "2")
    with (
        running_stack(demo_model(), num_shards=2, gateway_args=gateway_args) as stack,
        Client(stack.target) as bloom,
    ):
        streams = [bloom.generate_stream("busy", **LONG) for _ in range(2)]
        for stream in streams:
            next(stream)
        started = time.monotonic()
        with pytest.raises(BloomduoError) as caught:
            bloom.generate("one too many", max_new_tokens=2)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in caught.value.message and time.monotonic() - started < 2
        for stream in streams:
            stream.close()
        _wait_for(lambda: _idle(stack.target), timeout_s=5)
        assert bloom.generate("room again", max_new_tokens=2).generated_tokens == 2


def test_sigterm_drains_in_flight_streams_and_refuses_new_ones(demo_model) -> None:
    with running_stack(demo_model(), num_shards=2) as stack:
        with Client(stack.target) as bloom:
            stream = bloom.generate_stream("drain me", max_new_tokens=300, ignore_eos=True)
            next(stream)
            stack.gateway.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(BloomduoError) as caught:
                Client(stack.target).generate("too late", max_new_tokens=2)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            events = list(stream)
            assert events[-1].result is not None and events[-1].result.generated_tokens == 300
        assert stack.gateway.wait(timeout=30) == 0
