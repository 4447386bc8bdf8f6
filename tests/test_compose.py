"""docker-compose.yml runs the same CLI the tests run: every service command parses with its parser."""

from __future__ import annotations

from pathlib import Path

import yaml

from bloomduo.cli import build_parser

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


def test_every_compose_command_parses_with_the_cli() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    parser = build_parser()
    commands = {name: service["command"] for name, service in services.items() if "command" in service}
    assert set(commands) == {"shard0", "shard1", "gateway"}
    for name, command in commands.items():
        args = parser.parse_args(command)
        assert args.command in ("shard", "gateway"), name
    shards = [parser.parse_args(commands[name]) for name in ("shard0", "shard1")]
    gateway = parser.parse_args(commands["gateway"])
    assert [s.rank for s in shards] == [0, 1] and {s.world_size for s in shards} == {2}
    assert len({s.dist_init for s in shards}) == 1
    assert gateway.shards.split(",") == [
        f"{name}:{s.port}" for name, s in zip(("shard0", "shard1"), shards, strict=True)
    ]
    # Only the gateway is published; workers stay inside the compose network.
    assert all("ports" not in services[name] for name in ("shard0", "shard1"))


def test_healthchecks_use_the_cli_health_command() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    parser = build_parser()
    for name in ("shard0", "shard1", "gateway"):
        probe = services[name]["healthcheck"]["test"]
        assert probe[:2] == ["CMD", "bloomduo"]
        assert parser.parse_args(probe[2:]).command == "health"
