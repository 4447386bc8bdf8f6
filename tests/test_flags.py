"""Flags derived from the settings dataclasses: `up` forwards settings objects, and the services' own
parsers rebuild exactly those objects from the forwarded flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bloomduo.apps.cli import build_parser
from bloomduo.apps.flags import from_args, to_flags
from bloomduo.apps.launcher import Stack, StackOptions
from bloomduo.gateway.config import GatewayOptions, RequestLimits, SchedulerSettings
from bloomduo.shard_worker.config import ShardOptions

CHANGED_LIMITS = RequestLimits(max_input_tokens=77, max_total_tokens=99, max_concurrent_requests=5)
CHANGED_SCHEDULER = SchedulerSettings(
    max_batch_size=6,
    max_batch_prefill_tokens=50,
    max_waiting_steps=1,
    prefix_sharing=False,
    prefix_cache_tokens=7,
    burst_wait=False,
)


def _defaults_flagged(settings_type: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(settings_type) if "help" in f.metadata]


def test_defaults_give_no_flags_and_parse_back_to_defaults() -> None:
    assert to_flags(RequestLimits()) == [] and to_flags(SchedulerSettings()) == []
    args = build_parser().parse_args(["gateway", "--model", "m", "--shards", "a:1"])
    assert from_args(RequestLimits, args) == RequestLimits()
    assert from_args(SchedulerSettings, args) == SchedulerSettings()


@pytest.mark.parametrize("settings", [CHANGED_LIMITS, CHANGED_SCHEDULER])
def test_every_changed_setting_round_trips_through_the_gateway_parser(settings) -> None:
    flags = to_flags(settings)
    args = build_parser().parse_args(["gateway", "--model", "m", "--shards", "a:1", *flags])
    assert from_args(type(settings), args) == settings
    # every flagged field differs from its default here, so each one was forwarded
    assert len([f for f in flags if f.startswith("--")]) == len(_defaults_flagged(type(settings)))


def test_up_forwards_its_settings_to_the_gateway_and_sizes_the_workers_caches() -> None:
    parser = build_parser()
    up = parser.parse_args(
        ["up", *to_flags(CHANGED_LIMITS), *to_flags(CHANGED_SCHEDULER), "--num-shards", "3"]
    )
    options = from_args(
        StackOptions,
        up,
        model_dir=Path("/m"),
        limits=from_args(RequestLimits, up),
        scheduler=from_args(SchedulerSettings, up),
    )
    assert options.num_shards == 3 and options.limits == CHANGED_LIMITS
    stack = Stack(options)

    gateway = parser.parse_args(stack.gateway_command()[3:])  # after "python -m bloomduo"
    assert from_args(RequestLimits, gateway) == CHANGED_LIMITS
    assert from_args(SchedulerSettings, gateway) == CHANGED_SCHEDULER
    for command in stack.shard_commands():
        shard = parser.parse_args(command[3:])
        worker = from_args(ShardOptions, shard, model_dir=shard.model, rank=0, world_size=3, dist_init="")
        assert worker.kv_cache_slots == CHANGED_SCHEDULER.max_batch_size


def test_flag_defaults_and_help_come_from_the_fields(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gateway", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for settings_type in (RequestLimits, SchedulerSettings, GatewayOptions):
        for field in _defaults_flagged(settings_type):
            assert " ".join(field.metadata["help"].split()[:4]) in help_text
    shard = ["shard", "--model", "m", "--rank", "0", "--world-size", "1", "--dist-init", "tcp://x:1"]
    args = build_parser().parse_args([*shard, "--port", "1"])
    assert (args.device, args.dtype, args.kv_cache_slots) == ("cpu", "auto", ShardOptions.kv_cache_slots)
