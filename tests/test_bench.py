"""`bloomduo bench` on the tiny demo model: the real stack, the real transformers baseline, real files."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bloomduo.apps import bench, machine_floor
from bloomduo.apps.shard_weights import shard_weights
from bloomduo.client import AsyncClient
from bloomduo.shard_worker import cpu_kernels, native
from bloomduo.shard_worker.tensor_parallel import load_shard
from tests.conftest import free_port_run, running_stack


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


def _positive_finite(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_machine_class_names_the_cpu() -> None:
    machine = machine_floor.machine_class()
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["cpu_capability"] in ("DEFAULT", "NO AVX", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256")
    assert isinstance(machine["onednn_bf16_native"], bool)
    assert machine["cores"] == len(os.sched_getaffinity(0)) and machine["cpu_count"] == os.cpu_count()
    assert machine["cpu_model"]


def test_machine_rates_are_measured_and_positive() -> None:
    """Real kernels, short budgets; nothing about how fast (the machine is shared)."""
    threads_before = torch.get_num_threads()
    threads = machine_floor.stack_threads(2, None)
    assert threads == 2 * max(1, len(os.sched_getaffinity(0)) // 2)
    assert machine_floor.stack_threads(3, 2) == 6
    rates = machine_floor.measure_rates("cpu", "float32", 96, num_shards=2, threads=threads, budget_s=0.05)
    assert torch.get_num_threads() == threads_before  # the bench process's own setting is given back
    assert rates["device"] == "cpu" and rates["threads"] == threads and rates["parallel_devices"] == 1
    assert rates["array_bytes"] >= 256 * 2**20  # well past any L3 of this class of machine
    for key in ("read_bytes_per_s_single", "read_bytes_per_s", "gemm_flop_per_s"):
        assert _positive_finite(rates[key]), (key, rates)
    assert rates["gemm_shape"] == [machine_floor.GEMM_ROWS, 96, 384] and rates["gemm_kernel"] == "F.linear"

    # bf16: the workers' oneDNN-packed kernel competes where oneDNN runs bf16 natively, their tiled kernel
    # everywhere, and where bf16 is emulated their row-block kernel and the float32 GEMM they may run on
    # widened weights.
    rates = machine_floor.gemm_rates("cpu", "bfloat16", 64, threads=1, budget_s=0.05, workers=2)
    assert all(_positive_finite(rate) for rate in rates.values()), rates
    packs = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    want = {"F.linear", "bloomduo tiled bf16 x 2 workers"}
    want |= {"oneDNN packed linear"} if packs else set()
    emulated = {"bloomduo row-blocks bf16 x 2 workers", "F.linear float32 (bf16 weights widened)"}
    want |= emulated if cpu_kernels.bf16_is_emulated() else set()
    assert set(rates) == want
    rate, kernel = machine_floor.fastest(rates)
    assert rate == max(rates.values()) and rates[kernel] == rate

    # int8 matrices: the int8 GEMM the workers' --quantize runs competes too; bloomduo's kernels run one
    # thread per call, so each of the workers runs one at once. Weight-only int8 multiplies in float: the
    # integer GEMM of int8-dynamic is not its to run, and must not set its floor.
    rates = machine_floor.gemm_rates(
        "cpu", "float32", 256, threads=1, budget_s=0.05, quantize="int8-dynamic", workers=2
    )
    vnni = native.runs_vnni()
    int8 = "bloomduo int8 (dynamic, native vnni) x 2 workers" if vnni else "int8 (dynamic, fbgemm)"
    assert set(rates) == {"F.linear", int8} and all(_positive_finite(rate) for rate in rates.values())
    rates = machine_floor.gemm_rates(
        "cpu", "float32", 256, threads=1, budget_s=0.05, quantize="int8", workers=2
    )
    own = native.available() and native.best_isa() >= native.AVX2
    int8 = (
        "bloomduo int8 (weight-only, native) x 2 workers"
        if own
        else "int8 (weight-only, dequantized per call)"
    )
    assert set(rates) == {"F.linear", int8} and all(_positive_finite(rate) for rate in rates.values())


def _expected_costs(model_dir: Path, itemsize: int, tokens: int) -> tuple[int, int]:
    """Decode bytes and prompt FLOPs of a BLOOM from its config alone, independently of model_costs."""
    config = json.loads((model_dir / "config.json").read_text())
    h, layers, vocab = config["hidden_size"], config["n_layer"], config["vocab_size"]
    # per block: qkv 3h^2 + 3h, dense h^2 + h, two LayerNorms 4h, MLP 4h^2 + 4h and 4h^2 + h
    block_elements = 12 * h * h + 13 * h
    decode_bytes = (layers * block_elements + 2 * h + vocab * h) * itemsize  # + ln_f + LM head
    flops = 2 * tokens * layers * 12 * h * h + 2 * h * tokens * (tokens + 1) * layers + 2 * vocab * h
    return decode_bytes, flops


def test_floor_arithmetic_from_the_checkpoint(demo_model, tmp_path) -> None:
    model_dir = demo_model()
    bf16 = machine_floor.model_costs(model_dir, "bfloat16", 32)
    fp32 = machine_floor.model_costs(model_dir, "float32", 7)
    assert (bf16["decode_bytes"], bf16["prompt_flops"]) == _expected_costs(model_dir, 2, 32)
    assert (fp32["decode_bytes"], fp32["prompt_flops"]) == _expected_costs(model_dir, 4, 7)
    assert sum(bf16["decode_bytes_parts"].values()) == bf16["decode_bytes"]
    assert sum(bf16["prompt_flops_parts"].values()) == bf16["prompt_flops"]
    assert bf16["decode_bytes_parts"]["lm_head"] == 1030 * 96 * 2  # the tiny demo's vocabulary x hidden

    # --quantize: every matrix at one byte plus a float32 scale per row; vectors stay bfloat16.
    int8 = machine_floor.model_costs(model_dir, "bfloat16", 32, int8_matrices=True)
    config = json.loads((model_dir / "config.json").read_text())
    h, layers, vocab = config["hidden_size"], config["n_layer"], config["vocab_size"]
    matrices, rows = 12 * h * h, 3 * h + h + 4 * h + h  # qkv, dense, h_to_4h, 4h_to_h
    vectors = 13 * h * layers + 2 * h
    assert int8["decode_bytes"] == layers * (matrices + 4 * rows) + vectors * 2 + vocab * (h + 4)
    assert int8["prompt_flops"] == bf16["prompt_flops"]

    # compact workers (Info's kernels say which groups): those matrices at 12 bits a weight
    compact = machine_floor.model_costs(
        model_dir, "bfloat16", 32, compact_groups=frozenset({"blocks", "lm_head"})
    )
    assert (
        compact["decode_bytes"]
        == layers * matrices * 3 // 2 + (13 * h * layers + 2 * h) * 2 + vocab * h * 3 // 2
    )
    head_only = machine_floor.model_costs(model_dir, "bfloat16", 32, compact_groups=frozenset({"lm_head"}))
    assert head_only["decode_bytes"] == bf16["decode_bytes"] - vocab * h // 2
    assert "12 bits" in compact["weights"] and compact["prompt_flops"] == bf16["prompt_flops"]

    # A checkpoint cut for 2 ranks: the same matrices, plus each rank's own copy of the replicated vectors.
    cut = machine_floor.model_costs(shard_weights(model_dir, 2, tmp_path / "cut"), "bfloat16", 32)
    assert cut["prompt_flops"] == bf16["prompt_flops"]
    assert bf16["decode_bytes"] < cut["decode_bytes"] < 1.05 * bf16["decode_bytes"]

    memory_bound = machine_floor.floors(bf16, {"read_bytes_per_s": 1e6, "gemm_flop_per_s": 1e12})
    assert memory_bound["tpot_s"] == pytest.approx(bf16["decode_bytes"] / 1e6)
    assert memory_bound["ttft_compute_s"] == pytest.approx(bf16["prompt_flops"] / 1e12)
    assert memory_bound["ttft_s"] == memory_bound["tpot_s"] and memory_bound["ttft_bound"] == "memory"
    compute_bound = machine_floor.floors(bf16, {"read_bytes_per_s": 1e12, "gemm_flop_per_s": 1e6})
    assert compute_bound["ttft_s"] == pytest.approx(bf16["prompt_flops"] / 1e6)
    assert compute_bound["ttft_bound"] == "compute"

    level = {"concurrency": 4, "tpot_s": {"p50": 3.0}, "ttft_s": {"p50": 5.0}}
    [row] = machine_floor.against_floor(compute_bound, {"bloomduo": [level]})
    assert row["tpot_p50_x_floor"] == pytest.approx(3.0 / compute_bound["tpot_s"])
    assert row["ttft_p50_x_floor"] == pytest.approx(5.0 / compute_bound["ttft_s"])


def test_no_floor_for_a_stack_on_another_machine(demo_model) -> None:
    info = SimpleNamespace(device="cpu,cpu", num_shards=2, dtype="float32")
    args = _parse(["--model", str(demo_model())])
    floor = bench.measure_floor(args, info, "bloom.example.com:50051", launched=False)
    assert floor == {"reason": "the stack runs on bloom.example.com, and the floor would be this machine's"}
    npu = SimpleNamespace(device="npu:0,npu:1", num_shards=2, dtype="float16")
    assert bench.measure_floor(args, npu, "x:1", launched=True) == {
        "reason": "measured on cpu and cuda only, not npu:0"
    }
    assert "--model" in bench.measure_floor(_parse([]), info, "127.0.0.1:1", launched=False)["reason"]


def _check_floor(report: dict, printed: str, systems: dict[str, list[dict]], threads: int) -> None:
    """The report's floor: measured figures, its arithmetic, every level against it, in JSON and text."""
    floor = report["floor"]
    machine = report["config"]["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"torch CPU capability {machine['cpu_capability']}" in printed
    assert floor["device"] == "cpu" and floor["threads"] == threads and floor["dtype"] == "float32"
    for key in ("read_bytes_per_s_single", "read_bytes_per_s", "gemm_flop_per_s", "tpot_s", "ttft_s"):
        assert _positive_finite(floor[key]), (key, floor)
    model_dir = Path(report["config"]["model"])
    decode_bytes, flops = _expected_costs(model_dir, 4, report["config"]["prompt_tokens"])
    assert floor["tpot_s"] == pytest.approx(decode_bytes / floor["read_bytes_per_s"])
    assert floor["ttft_s"] == pytest.approx(max(flops / floor["gemm_flop_per_s"], floor["tpot_s"]))
    rows = {(row["system"], row["concurrency"]): row for row in floor["levels"]}
    assert len(rows) == sum(len(levels) for levels in systems.values())
    for system, levels in systems.items():
        for level in levels:
            row = rows[system, level["concurrency"]]
            assert row["tpot_p50_x_floor"] == pytest.approx(level["tpot_s"]["p50"] / floor["tpot_s"])
            assert row["ttft_p50_x_floor"] == pytest.approx(level["ttft_s"]["p50"] / floor["ttft_s"])
            assert f"{row['tpot_p50_x_floor']:>16.2f}  {row['ttft_p50_x_floor']:>16.2f}" in printed
    assert f"floor (measured before the levels on cpu, {threads} threads" in printed
    assert f"TPOT floor {floor['tpot_s'] * 1000:.2f} ms" in printed
    assert f"memory read bandwidth {floor['read_bytes_per_s'] / 1e9:.1f} GB/s" in printed


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


def test_distinct_prompts_give_the_stack_nothing_to_copy(demo_model, tmp_path) -> None:
    """With --distinct-prompts no request of a run starts like another, the warm-up's and other levels'
    included: the gateway keeps an idle sequence's cache, and a level reusing the warm-up's prompts had the
    first of them copied rather than computed."""
    metrics_port = free_port_run(3)  # the gateway's, then each worker's
    with running_stack(demo_model(), num_shards=2, metrics_port=metrics_port) as stack:
        args = _parse(
            [
                "--target", stack.target, "--threads-per-shard", "1", "--concurrency", "1",
                "--prompt-tokens", "8", "--new-tokens", "2", "--requests-per-level", "2", "--warmup", "1",
                "--distinct-prompts", "--out", str(tmp_path / "results.json"),
            ]
        )  # fmt: skip
        assert bench.run(args) == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
    shared = re.search(r"^bloomduo_prefix_tokens_shared_total (\S+)$", metrics, re.MULTILINE)
    assert shared and float(shared.group(1)) == 0


def test_the_chat_turns_script_times_a_first_and_a_next_turn(tiny_stack) -> None:
    """scripts/chat_turns.py gives the README's next-turn figures: it must keep running."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "chat_turns.py"
    options = [
        "--target",
        tiny_stack.target,
        "--prompt-tokens",
        "12",
        "--new-tokens",
        "3",
        "--conversations",
        "2",
    ]
    done = subprocess.run(
        [sys.executable, str(script), *options],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    turns = [line for line in done.stdout.splitlines() if line.startswith("conversation ")]
    assert len(turns) == 2 and "median over 2: first turn (12 tokens)" in done.stdout, done.stdout


def test_bench_against_the_stack_and_transformers(tiny_stack, demo_model, tmp_path, capsys) -> None:
    out, chart = tmp_path / "results.json", tmp_path / "chart.png"
    args = _parse(
        [
            "--target", tiny_stack.target, "--model", str(demo_model()), "--baseline", "transformers",
            "--threads-per-shard", "1",
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
    assert list(report["baselines"]) == ["transformers"] and report["baselines"]["transformers"] == baseline
    assert report["config"]["baseline"] == "transformers"
    # no level 16, and memory is measured only for a stack the bench launched
    assert [check["status"] for check in report["targets"]][1:] == ["SKIP"] * 5
    assert report["targets"][0]["status"] in ("PASS", "FAIL")

    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    printed = capsys.readouterr().out
    # tiny_stack's workers run one thread each; told so, the floor uses the same two.
    names = {
        "stack": "bloomduo",
        "one_at_a_time": "transformers one at a time",
        "static_batch": "transformers static batch",
    }
    _check_floor(report, printed, {names[key]: levels for key, levels in systems.items()}, threads=2)
    assert "the stack may reuse its cached prefill" in printed  # one prompt for all requests
    assert "bloomduo against each baseline, one run on" in printed
    assert "transformers static batch" in printed
    assert "targets" in printed


def test_bench_launches_measures_memory_and_stops_the_stack(demo_model, tmp_path, capsys) -> None:
    before = _children()
    out = tmp_path / "results.json"
    args = _parse(
        [
            "--launch", "--model", str(demo_model()), "--num-shards", "2", "--concurrency", "2",
            "--prompt-tokens", "4", "--new-tokens", "3", "--requests-per-level", "2", "--warmup", "0",
            "--distinct-prompts", "--threads-per-shard", "1", "--out", str(out),
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
    worker_target = "each worker's RSS <= its share of the weights + its KV cache + 300 MiB"
    assert statuses[worker_target] in ("PASS", "FAIL")
    shards = [load_shard(demo_model(), rank, 2, device="cpu", dtype=torch.float32) for rank in range(2)]
    held = [sum(p.nbytes for p in shard.parameters()) for shard in shards]
    assert report["memory"]["worker_weight_bytes"] == held  # each rank's share, as a worker loads it
    assert report["stack"]["levels"][0]["generated_tokens"] == 6
    printed = capsys.readouterr().out
    _check_floor(report, printed, {"bloomduo": report["stack"]["levels"]}, threads=2)
    assert "the stack may reuse its cached prefill" not in printed  # distinct prompts
    assert "bloomduo against each baseline" not in printed
    assert _children() == before  # the launched stack is stopped


def test_bench_through_grpc_and_the_openai_http_front_in_one_run(demo_model, tmp_path, capsys) -> None:
    """The same levels through each protocol, streamed /v1/completions by the real openai SDK, and HTTP's
    cost as a ratio to gRPC."""
    out = tmp_path / "results.json"
    args = _parse(
        [
            "--launch", "--model", str(demo_model()), "--num-shards", "2", "--concurrency", "1,2",
            "--prompt-tokens", "5", "--new-tokens", "4", "--requests-per-level", "2", "--warmup", "1",
            "--distinct-prompts", "--threads-per-shard", "1", "--protocol", "grpc,openai", "--out", str(out),
        ]
    )  # fmt: skip
    assert bench.run(args) == 0

    report = json.loads(out.read_text())
    assert list(report["protocols"]) == ["grpc", "openai"] and report["stack"]["protocol"] == "grpc"
    assert report["stack"]["levels"] == report["protocols"]["grpc"]
    for levels in report["protocols"].values():
        assert [level["concurrency"] for level in levels] == [1, 2]
        assert all(level["generated_tokens"] == 2 * 4 and level["ttft_s"]["p50"] > 0 for level in levels)
    cost = bench.protocol_cost(report)
    assert [(row["protocol"], row["against"], row["concurrency"]) for row in cost] == [
        ("openai", "grpc", 1),
        ("openai", "grpc", 2),
    ]
    assert all(math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0 for row in cost)
    printed = capsys.readouterr().out
    assert "bloomduo over openai" in printed and "protocol cost" in printed and "openai / grpc" in printed


def test_protocol_lists_parse() -> None:
    assert bench.parse_protocols("openai, grpc,openai") == ["openai", "grpc"]
    assert _parse([]).protocol == ["grpc"]
    for bad in ("", "http", "grpc,tgi"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_protocols(bad)


def test_bench_samples_the_stacks_tokens_when_asked(tiny_stack, tmp_path, capsys) -> None:
    out = tmp_path / "results.json"
    args = _parse(
        [
            "--target", tiny_stack.target, "--threads-per-shard", "1", "--concurrency", "2",
            "--prompt-tokens", "8", "--new-tokens", "6", "--requests-per-level", "2", "--warmup", "0",
            "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--out", str(out),
        ]
    )  # fmt: skip
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    assert report["config"]["sampling"] == {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 20}
    (level,) = report["stack"]["levels"]
    assert level["requests"] == 2 and level["generated_tokens"] == 12
    assert "sampled at temperature 0.8, top-p 0.9, top-k 20" in capsys.readouterr().out


def test_rounds_merge_into_medians_of_every_figure() -> None:
    rounds = [
        {"levels": [{"tokens_per_s": t, "ttft_s": {"p50": f}}], "name": n, "ok": ok, "gone": None}
        for t, f, n, ok in ((10.0, 0.3, "a", True), (30.0, 0.1, "b", False), (20.0, 0.2, "c", False))
    ]
    merged = bench.median_of(rounds)
    want = {"levels": [{"tokens_per_s": 20.0, "ttft_s": {"p50": 0.2}}], "name": "a", "ok": True, "gone": None}
    assert merged == want
    assert bench.median_of([{"x": [1, 2]}, {"x": [3]}]) == {"x": [1, 2]}  # shapes differ: the first round's
    assert bench.median_of([{"x": 1}]) == {"x": 1}
    streams = bench.median_of([{"concurrency": 16}, {"concurrency": 16}])["concurrency"]
    assert streams == 16 and isinstance(streams, int)  # not 16.0: the tables print it as a count


def test_a_floor_over_rounds_whose_workers_held_different_weights_names_each_rounds() -> None:
    plain = {"weights": "bfloat16", "decode_bytes": 1118.0}
    compact = {"weights": "bfloat16, blocks and lm_head in 12 bits (compact)", "decode_bytes": 839.0}
    merged = bench.median_of([plain, compact])
    assert merged["weights"] == "bfloat16"  # median_of alone: the first round's label on both rounds' bytes
    named = bench.name_mixed_weights(merged, [plain, compact])
    assert named["weights"] == (
        "round 1: bfloat16; round 2: bfloat16, blocks and lm_head in 12 bits (compact) (bytes: their median)"
    )
    assert named["decode_bytes"] == merged["decode_bytes"] == 978.5
    assert bench.name_mixed_weights(plain, [plain, dict(plain)]) is plain
    unmeasured = {"reason": "the stack runs elsewhere"}
    assert bench.name_mixed_weights(unmeasured, [unmeasured, unmeasured]) is unmeasured


def test_bench_rounds_report_medians_and_each_rounds_figures(tiny_stack, tmp_path, capsys) -> None:
    out = tmp_path / "results.json"
    args = _parse(
        [
            "--target", tiny_stack.target, "--threads-per-shard", "1", "--concurrency", "1,2",
            "--prompt-tokens", "8", "--new-tokens", "6", "--requests-per-level", "2", "--warmup", "0",
            "--rounds", "3", "--out", str(out),
        ]
    )  # fmt: skip
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    assert report["config"]["rounds"] == 3 and len(report["round_figures"]) == 3
    for index, level in enumerate(report["stack"]["levels"]):
        per_round = [figures[index] for figures in report["round_figures"]]
        assert [f["concurrency"] for f in per_round] == [level["concurrency"]] * 3
        assert level["tokens_per_s"] == statistics.median(f["tokens_per_s"] for f in per_round)
        assert level["ttft_s"]["p50"] == statistics.median(f["ttft_p50_s"] for f in per_round)
    printed = capsys.readouterr().out
    assert "the median of 3 rounds" in printed and "per round: tokens/s" in printed


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--temperature", "-1"], "--temperature must be 0 (greedy) or more"),
        (["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "0.5"], "give --temperature too"),
        (["--top-k", "5"], "give --temperature too"),
        (["--temperature", "1", "--top-k", "-2"], "--top-k must be 0 (all tokens) or more"),
        (["--temperature", "1", "--baseline", "transformers", "--model", "."], "without --baseline"),
    ],
)
def test_bench_refuses_sampling_settings_it_cannot_honour(flags, complaint, capsys) -> None:
    assert bench.run(_parse(flags)) == 1
    assert complaint in capsys.readouterr().err


def test_bench_refuses_a_baseline_without_a_model(capsys) -> None:
    assert bench.run(_parse(["--baseline", "transformers"])) == 1
    assert "--model" in capsys.readouterr().err


def test_baseline_lists_parse() -> None:
    assert bench.parse_baselines("none") == []
    assert bench.parse_baselines("transformers,ctranslate2") == ["transformers", "ctranslate2"]
    assert bench.parse_baselines("ctranslate2, transformers,ctranslate2") == ["ctranslate2", "transformers"]
    assert bench.parse_baselines("openvino,transformers") == ["openvino", "transformers"]
    assert _parse([]).baseline == []
    for bad in ("", "vllm", "none,transformers", "transformers,vllm"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_baselines(bad)


@pytest.mark.parametrize("peer", ["ctranslate2", "openvino"])
def test_a_missing_peer_is_a_clear_error(peer, demo_model, monkeypatch, capsys) -> None:
    """Without the peer's package the bench names the fix before starting anything."""
    package = bench.PEERS[peer].package
    monkeypatch.setitem(sys.modules, package, None)  # find_spec answers None, as when not installed
    before = _children()
    args = _parse(["--launch", "--model", str(demo_model()), "--baseline", f"transformers,{peer}"])
    assert bench.run(args) == 1
    err = capsys.readouterr().err
    assert f"--baseline {peer} needs {bench.PEERS[peer].title}" in err
    assert "pip install 'bloomduo[peers]'" in err
    assert _children() == before  # no stack was started


needs_ct2 = pytest.mark.skipif(
    importlib.util.find_spec("ctranslate2") is None,
    reason="ctranslate2 is not installed (pip install 'bloomduo[peers]')",
)


@needs_ct2
def test_ct2_float_greedy_tokens_equal_transformers(demo_model, tmp_path) -> None:
    """A real check of the conversion: on the tiny float32 model, CT2's float variant picks transformers'
    greedy tokens, streamed and batched."""
    from transformers import BloomForCausalLM

    from bloomduo.apps import bench_peers

    model_dir = demo_model()
    [float_variant, int8_variant] = bench_peers.variants("float32")
    assert (float_variant.stored, float_variant.compute) == ("float32", "float32")
    assert (int8_variant.stored, int8_variant.compute) == ("int8_float32", "int8_float32")
    converted = tmp_path / "ct2"
    assert bench_peers.main(["convert", "--model", str(model_dir), "--out", str(converted),
                             "--stored", "float32"]) == 0  # fmt: skip
    engine = bench_peers.Ct2(converted, "float32", threads=1, new_tokens=12)
    assert engine.generator.compute_type == "float32"
    prompt = [5, 100, 200, 37, 900, 12, 15, 44, 321, 7]
    ids, times = engine.stream(prompt)
    assert len(times) == 12 and times == sorted(times)
    model = BloomForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )[0, len(prompt):].tolist()  # fmt: skip
    assert ids == expected
    assert len(engine.batch(prompt, 3)) == 12


@needs_ct2
def test_bench_with_ctranslate2_converts_once(demo_model, tmp_path, monkeypatch, capsys) -> None:
    """A real short bench with CTranslate2 as the baseline; a second run reuses the cached conversions."""
    from bloomduo.apps import bench_peers

    monkeypatch.setenv("BLOOMDUO_CACHE", str(tmp_path / "cache"))
    model_dir = demo_model()
    before = _children()

    def run_once(out: Path) -> dict:
        args = _parse(
            [
                "--launch", "--model", str(model_dir), "--num-shards", "2", "--threads-per-shard", "1",
                "--baseline", "ctranslate2", "--concurrency", "1,2", "--prompt-tokens", "6",
                "--new-tokens", "4", "--requests-per-level", "2", "--warmup", "1", "--out", str(out),
            ]
        )  # fmt: skip
        assert bench.run(args) == 0
        return json.loads(out.read_text())

    report = run_once(tmp_path / "first.json")
    printed = capsys.readouterr().out
    assert report["baseline"] is None and report["ratios"] == []  # transformers was not asked for
    assert list(report["baselines"]) == ["ctranslate2", "ctranslate2 int8"]
    for name, quantization, compute in (
        ("ctranslate2", "float32", "float32"),
        ("ctranslate2 int8", "int8_float32", "int8_float32"),
    ):
        peer = report["baselines"][name]
        assert peer["quantization"] == quantization and peer["compute_type"] == compute
        assert peer["intra_threads"] == 2  # the stack's two workers, one thread each
        assert peer["conversion_s"] > 0 and peer["max_rss_bytes"] > 0
        converted = Path(peer["converted"])
        assert converted == bench_peers.conversion_dir(tmp_path / "cache", model_dir, quantization)
        assert converted.parent == tmp_path / "cache" / "peers" / "ctranslate2"
        assert converted.name.startswith(f"{model_dir.name}-") and converted.name.endswith(f"-{quantization}")
        for way in ("one_at_a_time", "static_batch"):
            levels = peer[way]
            assert [level["concurrency"] for level in levels] == [1, 2]
            for level in levels:
                assert level["generated_tokens"] == 4 * level["requests"]
                assert level["tpot_s"]["p50"] > 0 and level["ttft_s"]["p50"] > 0
        assert f"{name}: CTranslate2 " in printed and f"computes in {compute}" in printed
    rows = {(row["system"], row["concurrency"]) for row in report["side_by_side"]}
    assert rows == {
        (f"{name} {way}", c)
        for name in ("ctranslate2", "ctranslate2 int8")
        for way in ("one at a time", "static batch")
        for c in (1, 2)
    }
    assert all(row["stack_tokens_per_s_ratio"] > 0 for row in report["side_by_side"])
    assert "bloomduo against each baseline, one run on" in printed
    assert report["config"]["machine"]["cpu_model"] in printed
    floor_systems = {row["system"] for row in report["floor"]["levels"]}
    assert "ctranslate2 int8 static batch" in floor_systems

    model_bins = {name: Path(peer["converted"], "model.bin").stat().st_mtime_ns
                  for name, peer in report["baselines"].items()}  # fmt: skip
    again = run_once(tmp_path / "second.json")
    err = capsys.readouterr().err
    assert "bench: converting" not in err  # the converter did not run again
    for name, peer in again["baselines"].items():
        assert peer["conversion_s"] is None
        assert Path(peer["converted"], "model.bin").stat().st_mtime_ns == model_bins[name]
    assert _children() == before


needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino_genai") is None,
    reason="openvino-genai is not installed (pip install 'bloomduo[peers]')",
)


def test_openvino_variants_and_where_their_conversions_go(demo_model, tmp_path) -> None:
    from bloomduo.apps import bench_openvino

    [fp32, int8] = bench_openvino.variants("bfloat16")
    assert (fp32.name, fp32.stored, fp32.compute) == ("openvino", "fp32", "bf16")
    assert (int8.name, int8.stored, int8.compute) == ("openvino int8", "int8", "bf16")
    assert [variant.compute for variant in bench_openvino.variants("float32")] == ["f32", "f32"]

    model_dir = Path(shutil.copytree(demo_model(), tmp_path / "bloom"))
    converted = bench_openvino.conversion_dir(tmp_path / "cache", model_dir, "int8")
    assert converted.parent == tmp_path / "cache" / "peers" / "openvino"
    assert converted.name.startswith("bloom-") and converted.name.endswith("-int8")
    assert not bench_openvino.is_converted(converted)
    # Weights rewritten in place make the cached conversion stale.
    weights = model_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert bench_openvino.conversion_dir(tmp_path / "cache", model_dir, "int8") != converted
    # The converter's environment is the project's, never pinned apart from the runtime that measures.
    requirements = bench_openvino.converter_requirements()
    for package in bench_openvino.OPENVINO_PACKAGES:
        assert f"{package}=={bench_openvino.installed_version(package)}" in requirements
    assert not any(requirement.startswith("optimum-intel") for requirement in requirements)  # --no-deps


@pytest.fixture(scope="module")
def openvino_fp32(demo_model: Callable[..., Path]) -> Iterator[tuple[Path, Path]]:
    """The tiny demo model converted with fp32 weights into the peer cache, the way the bench does it
    (the first use creates the converter's environment there); its conversions are removed afterwards."""
    from bloomduo.apps import bench_openvino
    from bloomduo.apps.demo_model import default_cache_dir

    model_dir = demo_model()
    converted = bench_openvino.conversion_dir(default_cache_dir(), model_dir, "fp32")
    assert bench_openvino.main(["convert", "--model", str(model_dir), "--out", str(converted),
                                "--stored", "fp32"]) == 0  # fmt: skip
    yield model_dir, converted
    for variant in bench_openvino.variants("float32"):  # int8 is there only if the bench test ran
        shutil.rmtree(bench_openvino.conversion_dir(default_cache_dir(), model_dir, variant.stored), True)


@needs_openvino
def test_openvino_fp32_tokens_and_logprobs_equal_transformers(openvino_fp32) -> None:
    """A real check of the conversion and of both pipelines: on the tiny float32 model, computing in f32,
    GenAI picks transformers' greedy tokens one at a time and batched, and its log-probabilities match."""
    from transformers import BloomForCausalLM

    from bloomduo.apps import bench_openvino
    from bloomduo.apps.demo_model import default_cache_dir

    model_dir, converted = openvino_fp32
    assert bench_openvino.is_converted(converted)
    assert (converted / "openvino_tokenizer.xml").is_file() and (converted / "conversion.log").is_file()
    model = BloomForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = [5, 100, 200, 37, 900, 12, 15, 44, 321, 7]
    with torch.inference_mode():
        expected = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )[0, len(prompt):].tolist()  # fmt: skip
        reference = torch.log_softmax(model(torch.tensor([prompt + expected])).logits[0], dim=-1)

    engine = bench_openvino.OpenVino(converted, "f32", threads=1, new_tokens=12, prefix_caching=False)
    ids, times = engine.stream(engine.single(), prompt)
    assert ids == expected and len(times) == 12 and times == sorted(times)
    batched = engine.batched()
    results = batched.generate([bench_openvino.prompt_tensor(prompt)] * 3, [engine.config] * 3)
    assert [list(result.m_generation_ids[0]) for result in results] == [expected] * 3
    level = engine.closed_loop("openvino", batched, prompt, level=2, requests=3)
    assert (level["concurrency"], level["requests"], level["generated_tokens"]) == (2, 3, 36)
    assert level["ttft_s"]["p50"] > 0 and level["tpot_s"]["p50"] > 0

    logprobs = bench_openvino.model_logprobs(model_dir, prompt + expected, default_cache_dir(), "fp32")
    assert logprobs.shape == tuple(reference.shape) == (22, 1030)
    assert logprobs.argmax(axis=-1)[len(prompt) - 1 : -1].tolist() == expected
    torch.testing.assert_close(torch.from_numpy(logprobs), reference, atol=2e-4, rtol=0)


@needs_openvino
def test_bench_with_openvino_converts_once(openvino_fp32, tmp_path, capsys) -> None:
    """A real short bench with OpenVINO GenAI as the baseline: the fp32 conversion the fixture made is
    reused, int8 is converted once, and a second run converts nothing."""
    from bloomduo.apps import bench_openvino
    from bloomduo.apps.demo_model import default_cache_dir

    model_dir, fp32_converted = openvino_fp32
    # `bloomduo eval`'s peer rows (test_eval.py) convert int8 into the same cache: this test converts it
    shutil.rmtree(bench_openvino.conversion_dir(default_cache_dir(), model_dir, "int8"), True)
    before = _children()

    def run_once(out: Path, *extra: str) -> dict:
        args = _parse(
            [
                "--launch", "--model", str(model_dir), "--num-shards", "2", "--threads-per-shard", "1",
                "--baseline", "openvino", "--concurrency", "1,2", "--prompt-tokens", "6",
                "--new-tokens", "4", "--requests-per-level", "3", "--warmup", "1", "--out", str(out), *extra,
            ]
        )  # fmt: skip
        assert bench.run(args) == 0
        return json.loads(out.read_text())

    report = run_once(tmp_path / "first.json", "--distinct-prompts")
    printed = capsys.readouterr().out
    assert report["baseline"] is None and list(report["baselines"]) == ["openvino", "openvino int8"]
    for name, weight_format in (("openvino", "fp32"), ("openvino int8", "int8")):
        peer = report["baselines"][name]
        assert peer["engine"] == "openvino" and peer["weight_format"] == weight_format
        assert peer["inference_precision"] == "f32"  # the stack serves the tiny model in float32
        assert peer["threads"] == 2  # the stack's two workers, one thread each
        assert peer["prefix_caching"] is False  # distinct prompts: the stack has no cached prompt either
        assert peer["openvino_genai_version"] == bench_openvino.installed_version("openvino-genai")
        assert Path(peer["converted"]) == bench_openvino.conversion_dir(
            default_cache_dir(), model_dir, weight_format
        )
        assert peer["max_rss_bytes"] > 0 and "static_batch" not in peer
        for way in ("one_at_a_time", "continuous_batching"):
            assert [level["concurrency"] for level in peer[way]] == [1, 2]
            for level in peer[way]:
                assert level["requests"] == 3 and level["generated_tokens"] == 12
                assert level["tpot_s"]["p50"] > 0 and level["ttft_s"]["p50"] > 0
        assert peer["continuous_batching"][0] == peer["one_at_a_time"][0]  # one stream: the same server
        assert f"{name}: OpenVINO GenAI {peer['openvino_genai_version']}" in printed
        assert f"{weight_format} weights converted by optimum-intel" in printed
    assert report["baselines"]["openvino"]["conversion_s"] is None  # the fixture's conversion
    assert report["baselines"]["openvino int8"]["conversion_s"] > 0
    rows = {(row["system"], row["concurrency"]) for row in report["side_by_side"]}
    assert rows == {
        (f"{name} {way}", c)
        for name in ("openvino", "openvino int8")
        for way in ("one at a time", "continuous batching")
        for c in (1, 2)
    }
    assert "openvino int8 continuous batching" in printed
    assert "openvino int8 continuous batching" in {row["system"] for row in report["floor"]["levels"]}

    int8_model = Path(report["baselines"]["openvino int8"]["converted"], "openvino_model.bin")
    int8_mtime = int8_model.stat().st_mtime_ns
    again = run_once(tmp_path / "second.json")
    assert "bench: converting" not in capsys.readouterr().err  # the converter did not run again
    assert [peer["conversion_s"] for peer in again["baselines"].values()] == [None, None]
    assert int8_model.stat().st_mtime_ns == int8_mtime
    # One prompt for all requests: the stack may serve it from its prefix cache, and GenAI may too.
    assert [peer["prefix_caching"] for peer in again["baselines"].values()] == [True, True]
    assert fp32_converted.is_dir() and _children() == before
