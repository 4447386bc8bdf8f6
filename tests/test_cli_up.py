"""`bloomduo up` as a user runs it: demo model by default, separate processes, clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bloomduo.launcher import free_port
from client import Client


def _children(pid: int) -> list[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(line) for line in result.stdout.split()]


def test_up_serves_the_demo_model_and_stops_cleanly(tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "BLOOMDUO_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "bloomduo.cli", "up", "--port", str(port), "--threads-per-shard", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stdout.readline()  # printed once every process is ready
        assert f"127.0.0.1:{port}" in line, line
        children = _children(process.pid)
        assert len(children) == 3  # two shard workers and the gateway
        with Client(f"127.0.0.1:{port}") as bloom:
            assert bloom.info().num_shards == 2
            assert bloom.generate("Hello", max_new_tokens=5, ignore_eos=True).generated_tokens == 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        time.sleep(0.5)
        assert all(not os.path.exists(f"/proc/{pid}") for pid in children)
    finally:
        if process.poll() is None:
            process.kill()
