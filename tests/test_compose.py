"""The compose files run the same CLI the tests run: every service command parses with its parser.

docker-compose.yml is the CPU stack; docker-compose.ascend.yml and docker-compose.cuda.yml are
overrides that give each shard worker one chip. `docker-compose config` (no docker engine needed)
validates each combination and prints the merged file that these tests then check.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bloomduo.apps.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
OVERRIDES = {"ascend": ROOT / "docker-compose.ascend.yml", "cuda": ROOT / "docker-compose.cuda.yml"}
SHARDS = ("shard0", "shard1")


def docker_compose(*files: Path, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run `docker-compose -f FILE... config ARGS` and return the finished process (checked)."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed: run .ci/install-system-deps (as root) first")
    command = ["docker-compose", "--project-directory", str(ROOT)]
    for file in files:
        command += ["-f", str(file)]
    result = subprocess.run([*command, "config", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result


def merged(override: str) -> dict[str, Any]:
    """The base file merged with one override, as docker-compose itself merges them."""
    return yaml.safe_load(docker_compose(COMPOSE, OVERRIDES[override]).stdout)


def check_stack(services: dict[str, Any]) -> list:
    """Assert the shard and gateway commands form one group; return the parsed shard commands."""
    parser = build_parser()
    commands = {name: service["command"] for name, service in services.items() if "command" in service}
    assert set(commands) == {*SHARDS, "gateway"}
    for name, command in commands.items():
        args = parser.parse_args([str(word) for word in command])
        assert args.command in ("shard", "gateway"), name
    shards = [parser.parse_args([str(word) for word in commands[name]]) for name in SHARDS]
    gateway = parser.parse_args([str(word) for word in commands["gateway"]])
    assert [s.rank for s in shards] == [0, 1] and {s.world_size for s in shards} == {2}
    assert len({s.dist_init for s in shards}) == 1
    # Where the workers share one network namespace (the host's) they need distinct ports.
    host_network = all(services[name].get("network_mode") == "host" for name in SHARDS)
    hosts = ["127.0.0.1"] * len(SHARDS) if host_network else list(SHARDS)
    expected = [f"{host}:{s.port}" for host, s in zip(hosts, shards, strict=True)]
    assert gateway.shards.split(",") == expected
    assert len(set(expected)) == len(SHARDS)
    # Only the gateway is published; workers stay inside the compose network (or host loopback).
    assert all("ports" not in services[name] for name in SHARDS)
    if host_network:
        assert {s.host for s in shards} == {"127.0.0.1"}
    for name, shard in zip(SHARDS, shards, strict=True):
        probe = services[name]["healthcheck"]["test"]
        assert probe[:2] == ["CMD", "bloomduo"]
        health = parser.parse_args(probe[2:])
        assert health.command == "health" and health.target.endswith(f":{shard.port}"), name
    return shards


def test_every_compose_command_parses_with_the_cli() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    shards = check_stack(services)
    assert {s.device for s in shards} == {"cpu"}


def test_healthchecks_use_the_cli_health_command() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    parser = build_parser()
    for name in (*SHARDS, "gateway"):
        probe = services[name]["healthcheck"]["test"]
        assert probe[:2] == ["CMD", "bloomduo"]
        assert parser.parse_args(probe[2:]).command == "health"


@pytest.mark.parametrize("override", [None, *OVERRIDES])
def test_docker_compose_accepts_the_files(override: str | None) -> None:
    files = (COMPOSE,) if override is None else (COMPOSE, OVERRIDES[override])
    docker_compose(*files, args=("-q",))


def test_base_file_as_docker_compose_reads_it() -> None:
    services = yaml.safe_load(docker_compose(COMPOSE).stdout)["services"]
    check_stack(services)
    assert services["gateway"]["restart"] == "unless-stopped"


def _seconds(duration: str) -> float:
    """A compose duration as docker-compose config writes it, e.g. "1m30s" or "5s"."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[unit] for n, unit in re.findall(r"([0-9.]+)(ms|h|m|s)", duration))


def test_restart_policy_healthchecks_and_dependencies_agree() -> None:
    """Every service that serves comes back by itself after any exit (a worker leaving a broken group with
    code 3, the gateway with code 4 after a stall); the one-shot model step runs once and is waited for by
    its exit; each probe can finish within its healthcheck's timeout."""
    services = yaml.safe_load(docker_compose(COMPOSE).stdout)["services"]
    parser = build_parser()
    for name in (*SHARDS, "gateway"):
        service = services[name]
        assert service["restart"] in ("unless-stopped", "always"), name
        # Only the one-shot step is waited for: a worker or gateway is never restarted by compose's
        # depends_on, and the gateway waits for its workers itself.
        assert set(service["depends_on"]) == {"demo-model"}, name
        assert service["depends_on"]["demo-model"]["condition"] == "service_completed_successfully"
        check = service["healthcheck"]
        probe = parser.parse_args(check["test"][2:])
        assert probe.timeout < _seconds(check["timeout"]), name
        assert _seconds(check["start_period"]) >= 60, name  # loading a real checkpoint takes minutes
    assert services["demo-model"].get("restart", "no") == "no"


def test_ascend_override_gives_each_worker_its_own_chip() -> None:
    services = merged("ascend")["services"]
    shards = check_stack(services)
    for rank, (name, shard) in enumerate(zip(SHARDS, shards, strict=True)):
        service = services[name]
        # One chip per container, numbered 0 inside it.
        davinci = [d for d in service["devices"] if d.startswith("/dev/davinci") and d[-1].isdigit()]
        assert davinci == [f"/dev/davinci{rank}"], name
        assert {"/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"} <= set(service["devices"])
        assert service["environment"]["ASCEND_RT_VISIBLE_DEVICES"] == "0"
        assert (shard.device, shard.dtype) == ("npu:0", "float16")
        assert int(service["environment"]["HCCL_EXEC_TIMEOUT"]) % 68 == 0  # 310P's granularity
        assert any(v.startswith("/usr/local/Ascend/driver:") for v in service["volumes"])
        assert service["build"]["args"]["EXTRAS"] == "npu"
    assert "devices" not in services["gateway"]


def test_cuda_override_gives_each_worker_its_own_gpu() -> None:
    services = merged("cuda")["services"]
    shards = check_stack(services)
    for rank, (name, shard) in enumerate(zip(SHARDS, shards, strict=True)):
        (reservation,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert reservation["driver"] == "nvidia" and reservation["device_ids"] == [str(rank)]
        assert (shard.device, shard.dtype) == ("cuda:0", "float16")
    assert "deploy" not in services["gateway"]
