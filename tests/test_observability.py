"""Prometheus metrics and server reflection on a running stack started with --metrics-port."""

from __future__ import annotations

import re
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bloomduo.launcher import free_port
from client import BloomduoError, Client
from tests.conftest import running_stack


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _value(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def test_metrics_count_what_happened(demo_model) -> None:
    metrics_port = free_port()
    with running_stack(demo_model(), num_shards=2, metrics_port=metrics_port) as stack:
        with Client(stack.target) as bloom:
            for _ in range(3):
                bloom.generate("count me", max_new_tokens=5, ignore_eos=True)
            with pytest.raises(BloomduoError):
                bloom.generate("", max_new_tokens=5)
        gateway = _scrape(metrics_port)
        assert _value(gateway, "bloomduo_requests_total", '{finish_reason="length",outcome="ok"}') == 3
        assert (
            _value(gateway, "bloomduo_requests_total", '{finish_reason="",outcome="invalid_argument"}') == 1
        )
        assert _value(gateway, "bloomduo_time_to_first_token_seconds_count") == 3
        assert _value(gateway, "bloomduo_time_per_output_token_seconds_count") == 3
        assert _value(gateway, "bloomduo_generated_tokens_sum") == 15
        assert _value(gateway, "bloomduo_step_phase_seconds_count", '{phase="shards"}') >= 5
        assert _value(gateway, "bloomduo_queue_size") == 0
        for rank in range(2):
            worker = _scrape(metrics_port + 1 + rank)
            assert _value(worker, "bloomduo_worker_step_seconds_count") >= 5


def test_reflection_lists_the_services(tiny_stack) -> None:
    targets = {
        tiny_stack.target: "bloomduo.v1.GenerationService",
        tiny_stack.shard_targets[0]: "bloomduo.v1.ShardService",
    }
    for target, service in targets.items():
        with grpc.insecure_channel(target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in response.list_services_response.service}
        assert {service, "grpc.health.v1.Health"} <= names
