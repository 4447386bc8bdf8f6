"""`bloomduo bench` on the tiny demo model: the real stack, the real transformers baseline, real files."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess

import pytest

from bloomduo.apps import bench
from bloomduo.client import AsyncClient


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def _children() -> set[int]:
    result = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True)
    return {int(pid) for pid in result.stdout.split()}


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert bench.percentile(values, 0) == 1.0
    assert bench.percentile(values, 100) == 4.0
    assert bench.percentile(values, 50) == pytest.approx(2.5)
    assert bench.percentile(values, 90) == pytest.approx(3.7)  # numpy.percentile(values, 90)
    assert bench.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert bench.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        bench.percentile([], 50)
    with pytest.raises(ValueError):
        bench.percentile([1.0], 101)


def test_concurrency_levels_parse_sorted_and_positive() -> None:
    assert bench.parse_levels("4,1,2,2") == [1, 2, 4]
    for bad in ("", "0,1", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_levels(bad)
    assert bench.requests_for_level(1, None) == bench.MIN_REQUESTS_PER_LEVEL
    assert bench.requests_for_level(32, None) == 32
    assert bench.requests_for_level(32, 5) == 5


def test_prompts_have_exactly_the_asked_number_of_tokens(tiny_stack) -> None:
    async def lengths() -> list[int]:
        async with AsyncClient(tiny_stack.target) as client:
            found = []
            for n_tokens in (1, 13, 100):
                text, ids = await bench.build_prompt(client, n_tokens)
                assert await client.tokenize(text) == ids
                found.append(len(ids))
            return found

    assert asyncio.run(lengths()) == [1, 13, 100]


def test_prompt_variants_share_almost_no_prefix(tiny_stack) -> None:
    """--distinct-prompts must defeat prefix sharing: variants keep the length, not the start."""

    async def variants() -> list[list[int]]:
        async with AsyncClient(tiny_stack.target) as client:
            return [(await bench.build_prompt(client, 20, variant))[1] for variant in range(6)]

    found = asyncio.run(variants())
    assert all(len(ids) == 20 for ids in found)
    for i, first in enumerate(found):
        for second in found[i + 1 :]:
            shared = next((k for k, (a, b) in enumerate(zip(first, second, strict=True)) if a != b), 20)
            assert shared <= 2, (first, second)


def test_bench_against_the_stack_and_transformers(tiny_stack, demo_model, tmp_path, capsys) -> None:
    out, chart = tmp_path / "results.json", tmp_path / "chart.png"
    args = _parse(
        [
            "--target", tiny_stack.target, "--model", str(demo_model()), "--baseline", "transformers",
            "--concurrency", "1,2", "--prompt-tokens", "8", "--new-tokens", "6",
            "--requests-per-level", "3", "--warmup", "1", "--out", str(out), "--chart", str(chart),
        ]
    )  # fmt: skip
    assert bench.run(args) == 0

    report = json.loads(out.read_text())
    assert report["config"]["prompt_tokens"] == 8
    assert report["info"]["num_shards"] == 2 and report["info"]["dtype"] == "float32"
    assert report["memory"] is None  # only measured for a stack the bench launched
    baseline = report["baseline"]
    assert baseline["dtype"] == "float32" and baseline["torch_threads"] == os.cpu_count()
    systems = {
        "stack": report["stack"]["levels"],
        "one_at_a_time": baseline["one_at_a_time"],
        "static_batch": baseline["static_batch"],
    }
    for name, levels in systems.items():
        assert [level["concurrency"] for level in levels] == [1, 2], name
        for level in levels:
            # Static batches are whole: 2 streams and 3 requests make two batches of 2.
            expected = 4 if name == "static_batch" and level["concurrency"] == 2 else 3
            assert level["requests"] == expected, (name, level)
            assert level["generated_tokens"] == 6 * expected
            assert level["tokens_per_s"] == pytest.approx(level["generated_tokens"] / level["wall_s"])
            assert level["requests_per_s"] == pytest.approx(level["requests"] / level["wall_s"])
            for metric in ("ttft_s", "tpot_s"):
                figures = level[metric]
                assert 0 < figures["p50"] <= figures["p90"] <= figures["p99"], (name, metric, figures)
    assert [row["concurrency"] for row in report["ratios"]] == [1, 2]
    assert all(value > 0 for row in report["ratios"] for value in row.values())
    # no level 16, and memory is measured only for a stack the bench launched
    assert [check["status"] for check in report["targets"]][1:] == ["SKIP"] * 5
    assert report["targets"][0]["status"] in ("PASS", "FAIL")

    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    printed = capsys.readouterr().out
    assert "bloomduo / transformers" in printed
    assert "transformers static batch" in printed
    assert "targets" in printed


def test_bench_launches_measures_memory_and_stops_the_stack(demo_model, tmp_path, capsys) -> None:
    before = _children()
    out = tmp_path / "results.json"
    args = _parse(
        [
            "--launch", "--model", str(demo_model()), "--num-shards", "2", "--concurrency", "2",
            "--prompt-tokens", "4", "--new-tokens", "3", "--requests-per-level", "2", "--warmup", "0",
            "--distinct-prompts", "--out", str(out),
        ]
    )  # fmt: skip
    assert bench.run(args) == 0

    report = json.loads(out.read_text())
    assert report["config"]["launched"] is True and report["config"]["distinct_prompts"] is True
    assert report["baseline"] is None and report["ratios"] == []
    memory = report["memory"]["max_rss_bytes"]
    assert sorted(memory) == ["gateway", "shard_0", "shard_1"]
    assert all(size > 10 * 2**20 for size in memory.values())  # each process holds torch at least
    # The tiny demo in float32: 1030 x 96 embeddings; each rank's cache at least its 32 first slots.
    assert report["memory"]["embedding_bytes"] == 1030 * 96 * 4
    assert report["memory"]["checkpoint_bytes"] > report["memory"]["embedding_bytes"]
    assert [size >= 3 * 32 * 6 * 128 * 8 * 2 * 4 for size in report["memory"]["kv_cache_bytes"]] == [
        True,
        True,
    ]
    statuses = {check["name"]: check["status"] for check in report["targets"]}
    assert statuses["gateway's RSS <= embedding bytes + 0.5 GB"] == "PASS"
    assert statuses["each worker's RSS <= 0.6 x checkpoint bytes + its KV cache"] in ("PASS", "FAIL")
    assert report["stack"]["levels"][0]["generated_tokens"] == 6
    assert "bloomduo / transformers" not in capsys.readouterr().out
    assert _children() == before  # the launched stack is stopped


def test_bench_refuses_a_baseline_without_a_model(capsys) -> None:
    assert bench.run(_parse(["--baseline", "transformers"])) == 1
    assert "--model" in capsys.readouterr().err
