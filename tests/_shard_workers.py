"""Real `bloomduo shard` processes of one group on loopback, for tests that drive workers without a
gateway process (tests/test_engine_shards.py, tests/test_engine_loop.py)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from bloomduo.apps.launcher import CLI, free_ports, wait_serving


class ShardWorkers:
    """One group of real shard workers, rank r on loopback port ports[r] serving dtypes[r].

    start() (re)starts the whole group on the same ports with a fresh rendezvous port (the dead group's
    store may still hold the old one) and waits until every worker is SERVING; stop() ends every process.
    """

    def __init__(self, model_dir: Path, dtypes: Sequence[str] = ("float32",)) -> None:
        self.model_dir = model_dir
        self.dtypes = list(dtypes)
        self.ports = free_ports(len(self.dtypes))
        self.targets = [f"127.0.0.1:{port}" for port in self.ports]
        self.processes: list[subprocess.Popen] = []

    def command(self, rank: int, dist_init: str) -> list[str]:
        return [
            *CLI, "shard", "--model", str(self.model_dir), "--rank", str(rank),
            "--world-size", str(len(self.dtypes)), "--dist-init", dist_init,
            "--port", str(self.ports[rank]), "--dtype", self.dtypes[rank], "--threads", "1",
        ]  # fmt: skip

    def start(self, timeout_s: float = 120.0) -> None:
        (rendezvous,) = free_ports(1, exclude=self.ports)
        dist_init = f"tcp://127.0.0.1:{rendezvous}"
        self.processes = [subprocess.Popen(self.command(rank, dist_init)) for rank in range(len(self.dtypes))]
        for target in self.targets:
            wait_serving(target, timeout_s, self.processes)

    def kill(self) -> None:
        """SIGKILL every worker, as a crash would end them."""
        for process in self.processes:
            process.send_signal(signal.SIGKILL)
        for process in self.processes:
            process.wait(30)

    def stop(self) -> None:
        live = [process for process in self.processes if process.poll() is None]
        for process in live:
            process.send_signal(signal.SIGTERM)
        for process in live:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> ShardWorkers:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
