"""`bloomduo up` as a user runs it: demo model by default, separate processes, clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bloomduo.apps.launcher import Stack, StackOptions, free_port, free_ports
from bloomduo.client import Client


def _children(pid: int) -> list[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(line) for line in result.stdout.split()]


def test_ports_are_never_handed_out_twice() -> None:
    """A gateway and a worker once got the same port (both bound it: gRPC sets SO_REUSEPORT)."""
    ports = free_ports(32)
    assert len(set(ports)) == 32
    assert not set(free_ports(32, exclude=set(ports))) & set(ports)
    gateway = free_port()
    stack = Stack(StackOptions(Path("model"), num_shards=4, port=gateway, metrics_port=gateway + 100))
    taken = [int(target.rsplit(":", 1)[1]) for target in stack.shard_targets]
    taken.append(int(stack.dist_init.rsplit(":", 1)[1]))
    assert len(set(taken)) == 5 and not set(taken) & {gateway, *range(gateway + 100, gateway + 105)}


def test_up_serves_the_demo_model_and_stops_cleanly(tmp_path) -> None:
    port, http_port = free_ports(2)  # HTTP off its default 8080, which this machine may not have free
    env = {**os.environ, "BLOOMDUO_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "bloomduo", "up", "--port", str(port), "--threads-per-shard", "1"),
            *("--http-port", str(http_port)),
            *("--max-batch-size", "6", "--no-burst-wait"),  # forwarded to the gateway, and to the workers
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stdout.readline()  # printed once every process is ready
        assert f"127.0.0.1:{port}" in line, line
        children = _children(process.pid)
        assert len(children) == 3  # two shard workers and the gateway
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children}
        ranks = {int(c[c.index(b"--rank") + 1]): pid for pid, c in commands.items() if b"--rank" in c}
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= 2:  # each worker on cores of its own
            assert [os.sched_getaffinity(ranks[rank]) for rank in (0, 1)] == [{cores[0]}, {cores[1]}]
        with Client(f"127.0.0.1:{port}") as bloom:
            info = bloom.info()
            assert info.num_shards == 2
            assert info.limits["max_batch_size"] == 6
            # each worker allocated KV slots for exactly the gateway's batch size
            config = json.loads(next((tmp_path / "cache").glob("demo-tiny-*/config.json")).read_text())
            per_slot = 2 * config["n_layer"] * 128 * config["hidden_size"] // 2 * 4  # K and V, half the heads
            assert info.load.worker_kv_cache_bytes == [6 * per_slot] * 2
            assert bloom.generate("Hello", max_new_tokens=5, ignore_eos=True).generated_tokens == 5
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=10) as health:
            assert health.status == 200  # up's HTTP front, on the port it was given
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        time.sleep(0.5)
        assert all(not os.path.exists(f"/proc/{pid}") for pid in children)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_worker_refuses_cores_it_may_not_use(tmp_path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bloomduo", "shard", "--model", str(tmp_path), "--rank", "0"),
            *("--world-size", "1", "--dist-init", "tcp://127.0.0.1:1", "--port", "1"),
            *("--cpu-cores", "0,4096"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--cpu-cores '0,4096' must be a comma-separated list of the cores" in result.stderr


def test_thread_counts_are_whole_and_positive() -> None:
    """The gateway computes on one thread unless told otherwise: its OpenMP team would spin on the workers'
    cores after every op. Both services refuse a count that is not a whole number of 1 or more."""
    from bloomduo.apps.cli import build_parser

    assert build_parser().parse_args(["gateway", "--model", "m", "--shards", "a:1"]).threads == 1
    for service in (["gateway", "--shards", "a:1"], ["shard", "--rank", "0", "--world-size", "1"]):
        for count, error in (("0", "must be 1 or more, not 0"), ("two", "must be a whole number, not 'two'")):
            result = subprocess.run(
                [sys.executable, "-m", "bloomduo", *service, "--model", "m", "--threads", count]
                + (["--dist-init", "tcp://127.0.0.1:1", "--port", "1"] if service[0] == "shard" else []),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 2 and f"argument --threads: {error}" in result.stderr, result.stderr
