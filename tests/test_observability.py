"""Prometheus metrics and server reflection on a running stack started with --metrics-port."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bloomduo.client import AsyncClient, BloomduoError, Client
from bloomduo.core import metrics
from bloomduo.core.metrics import Outcome
from bloomduo.gateway.errors import RequestFailed
from tests.conftest import free_port_run, running_stack


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _value(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def _counted_outcomes() -> set[Outcome]:
    """The outcomes requests are counted under: literal labels, and those of the failures admission counts."""
    root = Path(__file__).parents[1]
    counted: set[Outcome] = set()
    for path in [
        path for folder in ("gateway", "shard_worker", "bloomduo") for path in (root / folder).rglob("*.py")
    ]:
        for label in re.findall(r"\bREQUESTS\.labels\(\s*([^,]+),", path.read_text()):
            if label == "exc.outcome":  # a RequestFailed's, below
                continue
            literal = re.fullmatch(r'"(.*)"|(?:metrics\.)?Outcome\.(\w+)', label)
            assert literal, f"{path}: REQUESTS counted under {label}, neither a literal nor an Outcome"
            counted.add(Outcome(literal[1]) if literal[1] is not None else Outcome[literal[2]])
    failures, found = [RequestFailed], []
    while failures:
        subclasses = failures.pop().__subclasses__()
        failures += subclasses
        found += subclasses
    return counted | {failure.outcome for failure in found}


def test_requests_total_counts_exactly_the_outcomes_its_help_names() -> None:
    assert _counted_outcomes() == set(Outcome)
    help_text = metrics.REQUESTS._documentation
    assert re.search(r"\((.*)\)", help_text)[1].split(", ") == [outcome.value for outcome in Outcome]


def test_metrics_count_what_happened(demo_model) -> None:
    metrics_port = free_port_run(3)  # the gateway's, then each worker's
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
        assert _value(gateway, "bloomduo_gc_frozen_objects") > 10_000  # torch, gRPC and the tokenizer
        for rank in range(2):
            worker = _scrape(metrics_port + 1 + rank)
            assert _value(worker, "bloomduo_worker_step_seconds_count") >= 5
            assert _value(worker, "bloomduo_gc_frozen_objects") > 10_000


_FREEZE_A_LOADED_HEAP = """
import gc, json
import torch  # a heap the size of a service's
from prometheus_client import REGISTRY
from bloomduo.core import gc_pauses
alive = len(gc.get_objects())
gc_pauses.time_pauses()
gc_pauses.time_pauses()
frozen = gc_pauses.freeze_loaded_heap()
walked = len(gc.get_objects())
gc.collect()
print(json.dumps({
    "alive": alive, "frozen": frozen, "walked": walked,
    "gauge": REGISTRY.get_sample_value("bloomduo_gc_frozen_objects"),
    "full": REGISTRY.get_sample_value("bloomduo_gc_pause_seconds_count", {"generation": "2"}),
}))
"""


def test_a_loaded_heap_is_frozen_out_of_later_collections_and_their_pauses_are_timed() -> None:
    """A fresh interpreter: what torch left alive is exempt from full collections, which then walk only
    what came after; each collection is timed once, however often the timer was installed."""
    run = subprocess.run(
        [sys.executable, "-c", _FREEZE_A_LOADED_HEAP], capture_output=True, text=True, check=True
    )
    seen = json.loads(run.stdout.splitlines()[-1])  # after the log line
    assert seen["alive"] > 20_000
    assert seen["frozen"] > 0.9 * seen["alive"]
    assert seen["walked"] < 1_000
    assert seen["gauge"] == seen["frozen"]
    assert seen["full"] == 2  # the freeze's own collection, then gc.collect()


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


def test_a_prompt_starting_like_a_running_one_copies_its_cache(demo_model) -> None:
    """Prefix sharing: same tokens and log-probabilities as computing the prompt, fewer tokens computed."""
    metrics_port = free_port_run(3)  # the gateway's, then each worker's
    prompt = "One long system prompt shared by every user, then the question:"
    longer = prompt + " and what follows it"
    greedy = {"max_new_tokens": 8, "ignore_eos": True, "details": True}
    with (
        running_stack(demo_model(), num_shards=2, metrics_port=metrics_port) as stack,
        Client(stack.target) as bloom,
    ):
        alone = {}
        for text in (prompt, longer):
            alone[text] = bloom.generate(text, **greedy)
            # Kept while the stack idles, `prompt`'s cache would give `longer` its start: this one's is kept.
            bloom.generate("Something else entirely", max_new_tokens=1)
        assert _value(_scrape(metrics_port), "bloomduo_prefix_tokens_shared_total") == 0
        prompt_ids, longer_ids = bloom.tokenize(prompt), bloom.tokenize(longer)

        donor = bloom.generate_stream(prompt, max_new_tokens=400, ignore_eos=True)
        next(donor)  # its prompt is in the workers' caches now, and it keeps running
        shared = {text: bloom.generate(text, **greedy) for text in (prompt, longer)}
        for _ in donor:
            pass
        counted = _value(_scrape(metrics_port), "bloomduo_prefix_tokens_shared_total")

        # A burst of one new prompt: one request computes it, the others copy it, whether they arrive
        # while it runs or in the very step it starts in (they then wait that one step).
        burst = "A third prompt that four users send at the same moment, word for word"
        burst_ids = bloom.tokenize(burst)

        async def together() -> list:
            async with AsyncClient(stack.target) as client:
                return await asyncio.gather(
                    *(client.generate(burst, max_new_tokens=60, ignore_eos=True) for _ in range(4))
                )

        texts = {result.text for result in asyncio.run(together())}
        burst_counted = _value(_scrape(metrics_port), "bloomduo_prefix_tokens_shared_total") - counted
    assert len(texts) == 1
    assert burst_counted == 3 * (len(burst_ids) - 1)

    for text in (prompt, longer):
        assert [t.id for t in shared[text].tokens] == [t.id for t in alone[text].tokens], text
        for mine, theirs in zip(shared[text].tokens, alone[text].tokens, strict=True):
            assert abs(mine.logprob - theirs.logprob) < 1e-4
    common = next(
        (i for i, (a, b) in enumerate(zip(prompt_ids, longer_ids, strict=False)) if a != b), len(prompt_ids)
    )
    # all of the identical prompt but its last token; at least the common start of the longer one
    assert counted >= len(prompt_ids) - 1 + common
    assert counted <= len(prompt_ids) - 1 + len(longer_ids) - 1
