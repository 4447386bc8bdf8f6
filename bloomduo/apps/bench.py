"""`bloomduo bench`: time to first token, time per output token and throughput against concurrency.

Like text-generation-benchmark, it sweeps the number of concurrent streams with a fixed prompt length and a
fixed number of new tokens (greedy unless --temperature, EOS ignored), each stream sending its requests back
to back. With `--baseline transformers` it also measures transformers' `BloomForCausalLM.generate` on the
same checkpoint, in a separate process (bloomduo.apps.bench_baseline); with `--baseline ctranslate2,openvino`
the CPU engines people pick instead, CTranslate2 (bloomduo.apps.bench_peers) and OpenVINO GenAI
(bloomduo.apps.bench_openvino), each in its float and int8 variants (an optional extra). It prints the
stack's figures as ratios of every baseline's, side by side.
Before the levels run it measures the machine's floor (bloomduo.apps.machine_floor: memory read bandwidth
and GEMM rate against the checkpoint's bytes and FLOPs) and prints every level's TPOT and TTFT against it.

Heavy imports (torch, transformers, matplotlib, even grpc) stay inside functions: the CLI imports this
module to build its parser for every command.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloomduo.apps.launcher import Stack, StackOptions, free_port, shard_device
from bloomduo.core.dtypes import DTYPE_CHOICES
from bloomduo.shard_worker.config import QUANTIZE_CHOICES

if TYPE_CHECKING:
    from bloomduo.client import AsyncClient

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
# A level of 1 or 2 streams would otherwise give one or two samples, and percentiles of nothing.
MIN_REQUESTS_PER_LEVEL = 10
DEFAULT_TARGET = "localhost:50051"
# A worker's resident memory beyond its weights and KV cache: the interpreter, torch and its allocator,
# gRPC, oneDNN's scratch; the memory target's allowance.
WORKER_OVERHEAD_BYTES = 300 * 2**20
# Ordinary English, so that every tokenizer splits it into many short tokens.
_FILLER = (
    "The quick brown fox jumps over the lazy dog while the old river keeps running down to the sea, "
    "and the people of the town watch the boats come and go in the evening light. "
)


MAX_DISTINCT_PROMPTS = len(_FILLER.split())  # one per starting word of the filler


@dataclass(frozen=True)
class Peer:
    """A peer engine: the module that converts and measures it (see bench_peers), and what it needs."""

    module: str
    package: str  # what must be importable to measure it
    title: str
    # It can serve a repeated prompt from a cache, and is let to (--prefix-caching) when the stack can too.
    prefix_caching: bool = False


PEERS = {
    "ctranslate2": Peer("bloomduo.apps.bench_peers", "ctranslate2", "CTranslate2"),
    "openvino": Peer("bloomduo.apps.bench_openvino", "openvino_genai", "OpenVINO GenAI", prefix_caching=True),
}
BASELINES = ("transformers", *PEERS)
# How the measured requests reach the stack: its gRPC API, or its OpenAI-compatible HTTP front through the
# openai SDK (streamed /v1/completions), the way most LLM tools reach a server.
PROTOCOLS = ("grpc", "openai")
# How a baseline serves a level's streams, under its key in the JSON: every baseline one at a time, then
# transformers and CTranslate2 in static batches, OpenVINO GenAI by continuous batching.
WAYS = {
    "one_at_a_time": "one at a time",
    "static_batch": "static batch",
    "continuous_batching": "continuous batching",
}


class BenchError(Exception):
    """The benchmark cannot run or measured something inconsistent; the message says what."""


@dataclass(frozen=True)
class Sample:
    """One request's timings, in seconds."""

    ttft_s: float  # from sending the request (or queueing it, for the baseline) to its first token
    tpot_s: float  # (last token - first token) / (generated tokens - 1)
    generated_tokens: int


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks, as numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be between 0 and 100, not {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def distribution(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values),
    }


def summarize_level(concurrency: int, samples: Sequence[Sample], wall_s: float) -> dict[str, Any]:
    """One level's figures: the JSON row that stack and baseline levels share."""
    generated = sum(sample.generated_tokens for sample in samples)
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "generated_tokens": generated,
        "wall_s": wall_s,
        "tokens_per_s": generated / wall_s,
        "requests_per_s": len(samples) / wall_s,
        "ttft_s": distribution([sample.ttft_s for sample in samples]),
        "tpot_s": distribution([sample.tpot_s for sample in samples]),
    }


def requests_for_level(concurrency: int, requests_per_level: int | None) -> int:
    return requests_per_level or max(concurrency, MIN_REQUESTS_PER_LEVEL)


def add_baseline_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The load a baseline's own process is told to run: the same prompt, new tokens and levels as the
    stack's (bench_baseline.py for transformers, bench_peers.py for the peers)."""
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids of the prompt")
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--concurrency", type=parse_levels, required=True)
    parser.add_argument("--requests-per-level", type=int)
    parser.add_argument("--warmup", type=int, default=2, help="size of one unmeasured batch (0: none)")


def parse_levels(text: str) -> list[int]:
    """Parse "1,2,4" into [1, 2, 4]; as an argparse type, a bad list is a usage error."""
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be positive integers, not {text!r}")
    return levels


def parse_baselines(text: str) -> list[str]:
    """Parse "transformers,ctranslate2" (or "none") into the baselines to run, in the order given."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["none"]:
        return []
    unknown = [name for name in names if name not in BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected none or a comma-separated list of {', '.join(BASELINES)}, not {text!r}"
        )
    return list(dict.fromkeys(names))


def parse_protocols(text: str) -> list[str]:
    """Parse "grpc,openai" into the protocols to measure the stack through, in the order given."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names or any(name not in PROTOCOLS for name in names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(PROTOCOLS)}, not {text!r}"
        )
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("what to measure")
    target.add_argument(
        "--target",
        help=f"host:port of a running gateway (default {DEFAULT_TARGET}); "
        "a gateway that requires a token gets BLOOMDUO_AUTH_TOKEN",
    )
    target.add_argument(
        "--launch",
        action="store_true",
        help="start the stack on --model (and stop it afterwards) instead of using --target",
    )
    target.add_argument("--model", type=Path, help="checkpoint directory: for --launch and for --baseline")
    target.add_argument(
        "--num-shards",
        type=int,
        default=StackOptions.num_shards,
        help="with --launch: tensor-parallel degree",
    )
    target.add_argument(
        "--dtype",
        default=StackOptions.dtype,
        choices=DTYPE_CHOICES,
        help="with --launch: the stack's dtype (the baseline always uses the dtype the stack reports)",
    )
    target.add_argument(
        "--quantize",
        default=StackOptions.quantize,
        choices=QUANTIZE_CHOICES,
        help="with --launch: int8 weights on the workers (the floor then counts int8 bytes)",
    )
    target.add_argument(
        "--device", default=StackOptions.device, help="with --launch: cpu, cuda or npu; also the baseline's"
    )
    target.add_argument(
        "--threads-per-shard",
        type=_positive,
        default=StackOptions.threads_per_shard,
        help="torch threads per worker on cpu (default: cores / W): with --launch the stack's, with "
        "--target what the running stack was given; the floor's bandwidth and GEMM rate use W times it",
    )
    target.add_argument(
        "--baseline",
        type=parse_baselines,
        default=[],
        metavar="none|" + ",".join(BASELINES),
        help="also measure these on the same checkpoint, each one request at a time and batched per level: "
        "transformers' generate; ctranslate2 and openvino (float and int8 weights, converted once into "
        "$BLOOMDUO_CACHE/peers; need pip install 'bloomduo[peers]')",
    )

    target.add_argument(
        "--protocol",
        type=parse_protocols,
        default=["grpc"],
        help="how the measured requests reach the stack, comma-separated: grpc, openai (streamed "
        "/v1/completions through the openai SDK, pip install 'bloomduo[bench]'); with both, every level "
        "runs through each and the report gives HTTP's cost as a ratio",
    )
    target.add_argument(
        "--http-url",
        help="the gateway's HTTP front for --protocol openai (default: the launched stack's, else "
        "http://localhost:8080)",
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=parse_levels,
        default=list(DEFAULT_CONCURRENCY),
        help="comma-separated numbers of concurrent streams (default 1,2,4,8,16,32)",
    )
    load.add_argument("--prompt-tokens", type=_positive, default=32, help="prompt length in tokens")
    load.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="give each request its own prompt (default: one prompt for all, which the stack's prefix "
        "sharing serves from a running sequence's cache)",
    )
    load.add_argument("--new-tokens", type=_positive, default=64, help="tokens generated per request (>= 2)")
    load.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sample the stack's tokens at this temperature (default 0: greedy); peers decode greedily, so "
        "not with --baseline",
    )
    load.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus of the sampled tokens (default 1: all of them)"
    )
    load.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample among this many likeliest tokens (default 0: all of them)",
    )
    load.add_argument(
        "--requests-per-level",
        type=_positive,
        help=f"requests per level, shared by its streams (default max(streams, {MIN_REQUESTS_PER_LEVEL}))",
    )
    load.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="unmeasured requests sent together before measuring, to each system (default 2)",
    )

    load.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        help="measure the stack and every baseline this many times, round after round, and report each "
        "figure as its median over the rounds (default 1): on a shared machine whose speed drifts over "
        "minutes, one round's ratios between systems measured minutes apart can swing by a third",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, help="write every figure as JSON here")
    output.add_argument("--chart", type=Path, help="draw throughput and latency against concurrency (PNG)")


def run(args: argparse.Namespace) -> int:
    try:
        report = benchmark(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
    if args.chart:
        draw_chart(report, args.chart)
        print(f"wrote {args.chart}")
    return 0


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the stack, then (if asked) the baselines, `args.rounds` times over, and return the whole
    report: each figure the median of its rounds' (median_of), the tables derived from those."""
    from bloomduo.apps.machine_floor import against_floor

    _check_arguments(args)
    rounds = []
    for number in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"bench: round {number} of {args.rounds}", file=sys.stderr)
        rounds.append(_measure_round(args))
    report = median_of(rounds)
    report["config"]["rounds"] = args.rounds
    # what each round measured per system and level, to show the spread the medians hide
    report["round_figures"] = [_headline_figures(measured) for measured in rounds]
    floor = report["floor"] = name_mixed_weights(report["floor"], [measured["floor"] for measured in rounds])
    if "tpot_s" in floor:
        floor["levels"] = against_floor(floor, dict(systems(report)))
    report["ratios"] = ratios(report)
    report["side_by_side"] = side_by_side(report)
    report["targets"] = targets(report)
    return report


def name_mixed_weights(merged: dict[str, Any], round_floors: list[dict[str, Any]]) -> dict[str, Any]:
    """The merged floor, its weights named round by round where the rounds' workers held different ones.

    A bf16 worker's kernel chooser may take the compact blocks in one round and the plain ones in the next
    (their times at load can lie within a per cent): the merged floor's bytes are then the median of both
    layouts' bytes, which median_of alone would label with the first round's layout."""
    weights = [floor.get("weights") for floor in round_floors]
    if len(set(weights)) < 2:
        return merged
    by_round = "; ".join(f"round {number}: {held}" for number, held in enumerate(weights, 1))
    return {**merged, "weights": f"{by_round} (bytes: their median)"}


def median_of(reports: list[Any]) -> Any:
    """Reports of the same shape merged: every number the median of its values in the reports, every other
    value (text, flags, None) and anything whose shape differs between them the first report's."""
    first = reports[0]
    if len(reports) == 1:
        return first
    if isinstance(first, dict) and all(isinstance(r, dict) and r.keys() == first.keys() for r in reports):
        return {key: median_of([r[key] for r in reports]) for key in first}
    if isinstance(first, list) and all(isinstance(r, list) and len(r) == len(first) for r in reports):
        return [median_of(list(values)) for values in zip(*reports, strict=True)]
    numbers = [r for r in reports if isinstance(r, int | float) and not isinstance(r, bool)]
    if len(numbers) == len(reports) and any(number != first for number in numbers):
        return statistics.median(numbers)
    return first  # also a number every round agrees on, kept as it is (the median of [16, 16] is 16.0)


def _headline_figures(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One round's tokens/s, TTFT p50 and TPOT p50 per system and level."""
    return [
        {
            "system": name,
            "concurrency": level["concurrency"],
            "tokens_per_s": level["tokens_per_s"],
            "ttft_p50_s": level["ttft_s"]["p50"],
            "tpot_p50_s": level["tpot_s"]["p50"],
        }
        for name, levels in systems(report)
        for level in levels
    ]


def _measure_round(args: argparse.Namespace) -> dict[str, Any]:
    """One round: the stack (launched for it with --launch), then each baseline."""
    from bloomduo.apps.machine_floor import machine_class
    from bloomduo.client import BloomduoError

    machine = machine_class()
    stack = _launch(args) if args.launch else None
    try:
        target = stack.target if stack else args.target or DEFAULT_TARGET
        try:
            measured = asyncio.run(_measure_stack(args, target, stack))
        except BloomduoError as exc:
            raise BenchError(f"the stack at {target} failed a request: {exc}") from None
    finally:
        # Stopped before the baseline runs, so transformers has the machine to itself.
        if stack:
            stack.stop()

    prompt_ids = measured.pop("prompt_ids")
    served = measured["info"]["dtype"]
    if measured["memory"]:
        measured["memory"].update(checkpoint_sizes(args.model))
        shares = worker_weight_bytes(args.model, measured["info"]["num_shards"], served, args.quantize)
        measured["memory"]["worker_weight_bytes"] = shares
    if args.baseline and args.dtype not in ("auto", served):
        print(
            f"bench: the stack serves {served}, not --dtype {args.dtype}; "
            "the baselines use the stack's dtype",
            file=sys.stderr,
        )
    baselines: dict[str, dict[str, Any]] = {}
    for name in args.baseline:
        if name == "transformers":
            baselines[name] = _run_baseline(args, prompt_ids, served)
        else:
            baselines.update(_run_peer(args, name, prompt_ids, measured["info"]))
    baseline = baselines.get("transformers")

    return {
        "config": {
            "target": target,
            "launched": stack is not None,
            "model": str(args.model) if args.model else None,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "concurrency": args.concurrency,
            "requests_per_level": args.requests_per_level,
            "warmup": args.warmup,
            "distinct_prompts": args.distinct_prompts,
            "sampling": _sampling(args) or "greedy",
            "baseline": ",".join(args.baseline) or "none",
            "started_at": measured.pop("started_at"),
            "cpu_count": os.cpu_count(),
            "machine": machine,
            "threads_per_shard": args.threads_per_shard,
            "load_average": measured.pop("load_average"),
        },
        **measured,
        # transformers' figures, which the targets and `ratios` compare with (None without it)
        "baseline": baseline,
        # every baseline under its name: transformers, ctranslate2, ctranslate2 int8, openvino, openvino int8
        "baselines": baselines,
    }


def _check_arguments(args: argparse.Namespace) -> None:
    if args.new_tokens < 2:
        raise BenchError("--new-tokens must be at least 2: time per output token needs two tokens")
    if args.warmup < 0:
        raise BenchError("--warmup cannot be negative")
    if args.temperature < 0:
        raise BenchError(f"--temperature must be 0 (greedy) or more, not {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise BenchError(f"--top-p must be in (0, 1], not {args.top_p}")
    if args.top_k < 0:
        raise BenchError(f"--top-k must be 0 (all tokens) or more, not {args.top_k}")
    if (args.top_p < 1 or args.top_k) and not args.temperature:
        raise BenchError("--top-p and --top-k are sampling settings: give --temperature too")
    if args.temperature and args.baseline:
        raise BenchError(
            "--temperature samples the stack's tokens, but the peers' runners decode greedily: "
            "measure sampling without --baseline"
        )
    if args.launch and args.target:
        raise BenchError("give either --target (a running stack) or --launch, not both")
    if (args.launch or args.baseline) and args.model is None:
        raise BenchError("--launch and --baseline need --model DIR")
    if args.model is not None and not (args.model / "config.json").is_file():
        raise BenchError(f"--model {args.model} is not a checkpoint directory (no config.json)")
    # Checked before the stack starts, so a missing peer costs nothing but this message.
    for name in args.baseline:
        peer = PEERS.get(name)
        if peer and importlib.util.find_spec(peer.package) is None:
            raise BenchError(
                f"--baseline {name} needs {peer.title}, which is not installed: pip install 'bloomduo[peers]'"
            )
        if peer and not args.device.startswith("cpu"):
            raise BenchError(f"--baseline {name} runs on cpu only here, not {args.device}")


def _launch(args: argparse.Namespace) -> Stack:

    print(f"bench: starting {args.num_shards} shards and a gateway on {args.model}", file=sys.stderr)
    # As launcher.start_private_stack, plus --threads-per-shard: the floor is measured with the same threads.
    stack = Stack(
        StackOptions(
            model_dir=args.model.resolve(),
            num_shards=args.num_shards,
            device=args.device,
            dtype=args.dtype,
            quantize=args.quantize,
            port=free_port(),
            http_port=free_port() if "openai" in args.protocol else 0,
            threads_per_shard=args.threads_per_shard,
        )
    )
    try:
        stack.start()
    except (RuntimeError, TimeoutError) as exc:
        stack.stop()
        raise BenchError(f"the stack did not start: {exc}") from None
    except BaseException:
        stack.stop()
        raise
    return stack


async def _measure_stack(args: argparse.Namespace, target: str, stack: Stack | None) -> dict[str, Any]:
    from bloomduo.client import AsyncClient

    # No retries: a retried request would hide a failure and count its wait as time to first token.
    # The token is the one a secured gateway reads from the same variable.
    token = os.environ.get("BLOOMDUO_AUTH_TOKEN") or None
    async with AsyncClient(target, retries=0, token=token) as client:
        info = await client.info()
        prompt, prompt_ids = await build_prompt(client, args.prompt_tokens)
        prompts = [prompt]
        if args.distinct_prompts:
            # Every request of the run its own prompt while the variants last: the gateway keeps a finished
            # sequence's cache while idle, so a level reusing the warm-up's prompts had one of them copied.
            sent = len(args.protocol) * (
                args.warmup + sum(requests_for_level(c, args.requests_per_level) for c in args.concurrency)
            )
            for variant in range(1, min(sent, MAX_DISTINCT_PROMPTS)):
                prompts.append((await build_prompt(client, args.prompt_tokens, variant))[0])
        first_prompt = 0  # of the next request sent, among `prompts` (in turn)
        # Before the warm-up and the levels, while the stack is idle: the floor's rates need the machine.
        floor = measure_floor(args, info, target, launched=stack is not None)
        started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        # Other work on the machine skews every figure; the load average at the start tells a reader.
        load_average = os.getloadavg()[0]
        memory = {name: 0 for name in _stack_processes(stack)}
        kv_cache: list[int] = []
        by_protocol = {}
        for protocol in args.protocol:
            send = _grpc_sender(client) if protocol == "grpc" else await _openai_sender(args, stack, token)
            if args.warmup:
                print(f"bench: warming up over {protocol} ({args.warmup} requests)", file=sys.stderr)
                warmup_prompts = _from(prompts, first_prompt)
                await asyncio.gather(
                    *(send(warmup_prompts[i % len(prompts)], args) for i in range(args.warmup))
                )
                first_prompt += args.warmup
            levels = by_protocol[protocol] = []
            for level in args.concurrency:
                requests = requests_for_level(level, args.requests_per_level)
                levels.append(await _measure_level(send, _from(prompts, first_prompt), args, level, requests))
                first_prompt += requests
                # Sampled between levels, while the stack still holds every sequence's memory it allocated.
                for name, process in _stack_processes(stack).items():
                    memory[name] = max(memory[name], rss_bytes(process.pid))
                kv_cache = (await client.info()).load.worker_kv_cache_bytes  # caches only grow
    return {
        "started_at": started_at,
        "load_average": load_average,
        "info": {
            "model": info.model,
            "num_shards": info.num_shards,
            "dtype": info.dtype,
            "device": info.device,
        },
        "prompt_ids": prompt_ids,
        "floor": floor,
        # the first protocol's levels are the stack's in every comparison; each protocol's under its name
        "stack": {"levels": by_protocol[args.protocol[0]], "protocol": args.protocol[0]},
        "protocols": by_protocol,
        "memory": {"max_rss_bytes": memory, "kv_cache_bytes": kv_cache} if stack else None,
    }


_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def measure_floor(args: argparse.Namespace, info: Any, target: str, launched: bool) -> dict[str, Any]:
    """The machine's floor for the served model (machine_floor), or {"reason": why it was not measured}."""
    from bloomduo.apps import machine_floor

    device = info.device.split(",")[0]
    host = target.rsplit(":", 1)[0].strip("[]")
    if args.model is None:
        reason = "needs --model (the checkpoint's sizes)"
    elif not launched and host not in _LOOPBACK:
        reason = f"the stack runs on {host}, and the floor would be this machine's"
    elif not (device == "cpu" or device.startswith("cuda")):
        reason = f"measured on cpu and cuda only, not {device}"
    else:
        reason = None
    if reason is None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            reason = "the stack runs on cuda but this process sees no CUDA device"
    if reason:
        print(f"bench: no floor: {reason}", file=sys.stderr)
        return {"reason": reason}
    print(f"bench: measuring the floor (memory read bandwidth, GEMM rate) on {device}", file=sys.stderr)
    # Workers say "int8 (...)" or "int8-dynamic (...)" in their kernels when they hold int8 weights.
    schemes = {kernels.split(" ")[0] for kernels in info.worker_kernels}
    quantize = schemes.pop() if len(schemes) == 1 and schemes <= set(QUANTIZE_CHOICES[1:]) else "none"
    # ...and "blocks: compact; lm_head: compact" where they hold bf16 matrices in 12 bits a weight
    compact = frozenset(
        group
        for group in ("blocks", "lm_head")
        if info.worker_kernels and all(f"{group}: compact" in kernels for kernels in info.worker_kernels)
    )
    costs = machine_floor.model_costs(
        args.model,
        info.dtype,
        args.prompt_tokens,
        int8_matrices=quantize != "none",
        compact_groups=compact,
    )
    threads = machine_floor.stack_threads(info.num_shards, args.threads_per_shard)
    rates = machine_floor.measure_rates(
        device, info.dtype, costs["hidden_size"], info.num_shards, threads, quantize=quantize
    )
    return machine_floor.floors(costs, rates)


def checkpoint_sizes(model_dir: Path) -> dict[str, int]:
    """Bytes of every tensor of the checkpoint as stored, and of its word embeddings (the memory targets'
    yardsticks)."""
    from bloomduo.core.checkpoint import Checkpoint

    checkpoint = Checkpoint(model_dir)

    def size(name: str) -> int:
        return math.prod(checkpoint.shape(name)) * checkpoint.dtype(name).itemsize

    return {
        "checkpoint_bytes": sum(size(name) for name in checkpoint.names()),
        "embedding_bytes": size("word_embeddings.weight"),
    }


def worker_weight_bytes(model_dir: Path, world_size: int, dtype_name: str, quantize: str) -> list[int]:
    """Bytes of the weights each rank holds as served: its slices of the blocks, ln_f and the LM head in
    `dtype_name`, every Linear's weight as int8 plus a float32 scale per row when quantized."""
    from bloomduo.core.checkpoint import Checkpoint
    from bloomduo.core.dtypes import to_torch
    from bloomduo.shard_worker.quantize import NONE, linear_weights
    from bloomduo.shard_worker.tensor_parallel import build_meta_shard

    config, itemsize = Checkpoint(model_dir).config, to_torch(dtype_name).itemsize
    sizes = []
    for rank in range(world_size):
        model, _ = build_meta_shard(config, rank, world_size)
        int8 = linear_weights(model) if quantize != NONE else {}
        total = 0
        for name, param in model.named_parameters():
            total += param.numel() + param.shape[0] * 4 if name in int8 else param.numel() * itemsize
        sizes.append(total)
    return sizes


def _stack_processes(stack: Stack | None) -> dict[str, subprocess.Popen]:
    if stack is None:
        return {}
    processes = {"gateway": stack.gateway} if stack.gateway else {}
    processes.update({f"shard_{rank}": shard for rank, shard in enumerate(stack.shards)})
    return processes


def rss_bytes(pid: int) -> int:
    """Resident memory of a live process, from the VmRSS line of /proc/<pid>/status (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    return 0


async def build_prompt(client: AsyncClient, n_tokens: int, variant: int = 0) -> tuple[str, list[int]]:
    """A prompt of exactly n_tokens under the served tokenizer, and its ids, found with the Tokenize RPC.

    Variant k starts the filler text k words later, so different variants share (almost) no prefix.
    """
    words = _FILLER.split()
    shift = variant % len(words)
    text = " ".join(words[shift:] + words[:shift]) + " "
    while len(await client.tokenize(text)) < n_tokens:
        text += text
    # The shortest prefix with at least n_tokens, by bisection on its length in characters.
    low, high = 1, len(text)
    while low < high:
        middle = (low + high) // 2
        if len(await client.tokenize(text[:middle])) >= n_tokens:
            high = middle
        else:
            low = middle + 1
    # A BPE merge can make one more character cost one token fewer, so the count is not quite monotone in
    # the prefix length; the exact fit is at or just after the bisection's answer.
    for end in range(low, min(low + 16, len(text)) + 1):
        ids = await client.tokenize(text[:end])
        if len(ids) == n_tokens:
            return text[:end], ids
    raise BenchError(f"could not build a prompt of exactly {n_tokens} tokens")


Sender = Callable[[str, argparse.Namespace], Awaitable[Sample]]


def _grpc_sender(client: AsyncClient) -> Sender:
    return lambda prompt, args: _timed_request(client, prompt, args)


async def _openai_sender(args: argparse.Namespace, stack: Stack | None, token: str | None) -> Sender:
    """Streamed /v1/completions through the openai SDK, as tools that speak OpenAI's API send them."""
    try:
        import openai
    except ImportError:
        raise BenchError("--protocol openai needs the openai SDK: pip install 'bloomduo[bench]'") from None

    if stack is not None:
        url = f"http://127.0.0.1:{stack.options.http_port}"
    else:
        url = args.http_url or "http://localhost:8080"
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=token or "none", max_retries=0, timeout=600)
    try:
        model = (await client.models.list()).data[0].id
    except openai.APIError as exc:
        raise BenchError(f"the HTTP front at {url} did not list its model: {exc}") from None

    async def send(prompt: str, args: argparse.Namespace) -> Sample:
        chunk_times: list[float] = []
        generated = 0
        sent = time.perf_counter()
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=args.new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, **({"top_k": args.top_k} if args.top_k else {})},
        )
        async for chunk in stream:
            if chunk.choices:
                chunk_times.append(time.perf_counter())
            if chunk.usage is not None:
                generated = chunk.usage.completion_tokens
                prompt_tokens = chunk.usage.prompt_tokens
        if generated != args.new_tokens or len(chunk_times) < 2:
            raise BenchError(f"asked {url} for {args.new_tokens} tokens with ignore_eos, got {generated}")
        if prompt_tokens != args.prompt_tokens:
            raise BenchError(f"the prompt was {prompt_tokens} tokens over HTTP, not {args.prompt_tokens}")
        # A token whose text is still an incomplete character sends no chunk: count tokens from usage.
        return Sample(
            ttft_s=chunk_times[0] - sent,
            tpot_s=(chunk_times[-1] - chunk_times[0]) / (generated - 1),
            generated_tokens=generated,
        )

    return send


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The generate() arguments of a sampled run; none for greedy decoding."""
    if not args.temperature:
        return {}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}


async def _timed_request(client: AsyncClient, prompt: str, args: argparse.Namespace) -> Sample:
    token_times: list[float] = []
    result = None
    sent = time.perf_counter()
    stream = client.generate_stream(
        prompt, max_new_tokens=args.new_tokens, ignore_eos=True, **(_sampling(args) or {"do_sample": False})
    )
    async for event in stream:
        if event.token is not None:
            token_times.append(time.perf_counter())
        if event.result is not None:
            result = event.result
    if result is None or result.generated_tokens != args.new_tokens or len(token_times) != args.new_tokens:
        raise BenchError(
            f"asked for {args.new_tokens} tokens with ignore_eos, got {len(token_times)} streamed tokens "
            f"and a result of {result.generated_tokens if result else 'nothing'}"
        )
    if result.prompt_tokens != args.prompt_tokens:
        raise BenchError(f"the prompt was {result.prompt_tokens} tokens, not {args.prompt_tokens}")
    return Sample(
        ttft_s=token_times[0] - sent,
        tpot_s=(token_times[-1] - token_times[0]) / (len(token_times) - 1),
        generated_tokens=len(token_times),
    )


def _from(prompts: list[str], first: int) -> list[str]:
    """The prompts in turn from the first-th (counted round and round)."""
    first %= len(prompts)
    return prompts[first:] + prompts[:first]


async def _measure_level(
    send: Sender, prompts: list[str], args: argparse.Namespace, level: int, requests: int
) -> dict[str, Any]:
    samples: list[Sample] = []
    # Shared by the level's streams: each takes the next request as soon as its previous one finished.
    pending = iter(range(requests))

    async def stream() -> None:
        for number in pending:
            sample = await send(prompts[number % len(prompts)], args)
            samples.append(sample)
            progress("stack", level, len(samples), requests, sample)

    start = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(level)))
    summary = summarize_level(level, samples, time.perf_counter() - start)
    progress_level("stack", summary)
    return summary


def progress(system: str, level: int, done: int, total: int, sample: Sample) -> None:
    print(
        f"  {system:<24} {level:>3} streams  {done:>3}/{total:<3}  "
        f"TTFT {sample.ttft_s * 1000:8.1f} ms  TPOT {sample.tpot_s * 1000:7.2f} ms",
        file=sys.stderr,
        flush=True,
    )


def progress_level(system: str, summary: dict[str, Any]) -> None:
    print(
        f"{system} at {summary['concurrency']} streams: {summary['tokens_per_s']:.1f} tokens/s, TTFT p50 "
        f"{summary['ttft_s']['p50'] * 1000:.1f} ms, TPOT p50 {summary['tpot_s']['p50'] * 1000:.2f} ms",
        file=sys.stderr,
        flush=True,
    )


def _run_baseline(args: argparse.Namespace, prompt_ids: list[int], dtype: str) -> dict[str, Any]:
    """transformers in its own process, so its memory and threads never meet the stack's."""

    command = [
        sys.executable, "-m", "bloomduo.apps.bench_baseline",
        "--model", str(args.model.resolve()),
        "--dtype", dtype,
        "--device", shard_device(args.device, 0),
        *_load_arguments(args, prompt_ids),
    ]  # fmt: skip
    print("bench: measuring transformers (the stack is idle)", file=sys.stderr)
    # stderr passes through: it carries the baseline's progress lines.
    finished = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if finished.returncode != 0:
        raise BenchError(f"the transformers baseline exited with {finished.returncode}")
    return json.loads(finished.stdout)


def _load_arguments(args: argparse.Namespace, prompt_ids: list[int]) -> list[str]:
    """The flags of add_baseline_run_arguments: the load the stack was given."""
    command = [
        "--prompt-ids", ",".join(map(str, prompt_ids)),
        "--new-tokens", str(args.new_tokens),
        "--concurrency", ",".join(map(str, args.concurrency)),
        "--warmup", str(args.warmup),
    ]  # fmt: skip
    if args.requests_per_level:
        command += ["--requests-per-level", str(args.requests_per_level)]
    return command


def _run_peer(
    args: argparse.Namespace, name: str, prompt_ids: list[int], info: dict[str, Any]
) -> dict[str, Any]:
    """A peer's variants, each converted once into the cache and measured in a process of its own, with as
    many threads as the stack's workers had together."""
    from bloomduo.apps.demo_model import default_cache_dir
    from bloomduo.apps.machine_floor import stack_threads

    peer = PEERS[name]
    module = importlib.import_module(peer.module)
    threads = stack_threads(info["num_shards"], args.threads_per_shard)
    results = {}
    for variant in module.variants(info["dtype"]):
        converted = module.conversion_dir(default_cache_dir(), args.model, variant.stored)
        conversion_s = None
        if not module.is_converted(converted):
            print(
                f"bench: converting {args.model} for {variant.name} ({variant.stored}) into {converted}",
                file=sys.stderr,
            )
            conversion_s = _peer_process(
                peer, variant.name, ["convert", "--model", str(args.model.resolve()), "--out", str(converted),
                                     "--stored", variant.stored],
            )["conversion_s"]  # fmt: skip
        command = [
            "measure", "--name", variant.name, "--converted", str(converted), "--stored", variant.stored,
            "--compute", variant.compute, "--threads", str(threads), *_load_arguments(args, prompt_ids),
        ]  # fmt: skip
        if peer.prefix_caching and not args.distinct_prompts:
            command.append("--prefix-caching")
        print(f"bench: measuring {variant.name} (the stack is idle)", file=sys.stderr)
        results[variant.name] = {**_peer_process(peer, variant.name, command), "conversion_s": conversion_s}
    return results


def _peer_process(peer: Peer, name: str, command: list[str]) -> dict[str, Any]:
    finished = subprocess.run(
        [sys.executable, "-m", peer.module, *command], stdout=subprocess.PIPE, text=True
    )
    if finished.returncode != 0:
        raise BenchError(f"{name} ({command[0]}) exited with {finished.returncode}")
    return json.loads(finished.stdout)


def systems(report: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every system's levels under its display name: the stack (through each protocol measured), then each
    baseline's two ways."""
    protocols = report.get("protocols") or {"grpc": report["stack"]["levels"]}
    if list(protocols) == ["grpc"]:
        found = [("bloomduo", protocols["grpc"])]
    else:
        found = [(f"bloomduo over {protocol}", levels) for protocol, levels in protocols.items()]
    for name, baseline in (report.get("baselines") or {}).items():
        found += [(f"{name} {way}", baseline[key]) for key, way in WAYS.items() if key in baseline]
    return found


def side_by_side(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per baseline way and level: its figures and the stack's as a ratio of them (stack / baseline)."""
    stack = _by_level(report["stack"]["levels"])
    rows = []
    for name, levels in systems(report)[1:]:
        for level in levels:
            ours = stack.get(level["concurrency"])
            if ours is None:
                continue
            rows.append(
                {
                    "system": name,
                    "concurrency": level["concurrency"],
                    "tokens_per_s": level["tokens_per_s"],
                    "tpot_p50_s": level["tpot_s"]["p50"],
                    "ttft_p50_s": level["ttft_s"]["p50"],
                    "stack_tokens_per_s_ratio": ours["tokens_per_s"] / level["tokens_per_s"],
                    "stack_tpot_p50_ratio": ours["tpot_s"]["p50"] / level["tpot_s"]["p50"],
                    "stack_ttft_p50_ratio": ours["ttft_s"]["p50"] / level["ttft_s"]["p50"],
                }
            )
    return rows


def _by_level(levels: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {level["concurrency"]: level for level in levels}


def ratios(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level, stack / transformers: above 1 is better for tokens/s, below 1 for TPOT and TTFT."""
    if not report["baseline"]:
        return []
    one = _by_level(report["baseline"]["one_at_a_time"])
    batch = _by_level(report["baseline"]["static_batch"])
    rows = []
    for level in report["stack"]["levels"]:
        c = level["concurrency"]
        rows.append(
            {
                "concurrency": c,
                "tokens_per_s_vs_one_at_a_time": level["tokens_per_s"] / one[c]["tokens_per_s"],
                "tokens_per_s_vs_static_batch": level["tokens_per_s"] / batch[c]["tokens_per_s"],
                "tpot_p50_vs_one_at_a_time": level["tpot_s"]["p50"] / one[c]["tpot_s"]["p50"],
                "tpot_p50_vs_static_batch": level["tpot_s"]["p50"] / batch[c]["tpot_s"]["p50"],
                "ttft_p50_vs_one_at_a_time": level["ttft_s"]["p50"] / one[c]["ttft_s"]["p50"],
                "ttft_p50_vs_static_batch": level["ttft_s"]["p50"] / batch[c]["ttft_s"]["p50"],
            }
        )
    return rows


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The service's speed and memory targets against transformers measured in the same run, each PASS,
    FAIL or SKIP (a level or the baseline it needs was not run)."""
    stack = _by_level(report["stack"]["levels"])
    baseline = report["baseline"]
    one = _by_level(baseline["one_at_a_time"]) if baseline else {}
    batch = _by_level(baseline["static_batch"]) if baseline else {}
    checks = []

    def check(name: str, available: bool, missing: str, compare: Callable[[], tuple[bool, str]]) -> None:
        if available:
            passed, detail = compare()
            checks.append({"name": name, "status": "PASS" if passed else "FAIL", "detail": detail})
        else:
            checks.append({"name": name, "status": "SKIP", "detail": missing})

    def tpot() -> tuple[bool, str]:
        ours, theirs = stack[1]["tpot_s"]["p50"] * 1000, one[1]["tpot_s"]["p50"] * 1000
        return ours <= 0.8 * theirs, f"{ours:.2f} ms vs 0.8 x {theirs:.2f} = {0.8 * theirs:.2f} ms"

    def vs_one() -> tuple[bool, str]:
        ours, theirs = stack[16]["tokens_per_s"], one[16]["tokens_per_s"]
        return ours >= 10 * theirs, f"{ours:.1f} tokens/s vs 10 x {theirs:.1f} = {10 * theirs:.1f}"

    def vs_batch() -> tuple[bool, str]:
        ours, theirs = stack[16]["tokens_per_s"], batch[16]["tokens_per_s"]
        return ours >= 1.2 * theirs, f"{ours:.1f} tokens/s vs 1.2 x {theirs:.1f} = {1.2 * theirs:.1f}"

    memory = report["memory"]

    def worker_memory() -> tuple[bool, str]:
        rss = [size for name, size in memory["max_rss_bytes"].items() if name.startswith("shard_")]
        shares = zip(rss, memory["worker_weight_bytes"], memory["kv_cache_bytes"], strict=True)
        details, within = [], []
        for size, weights, kv in shares:
            details.append(f"{size / 2**20:.0f} MiB vs {weights / 2**20:.0f} + {kv / 2**20:.0f} + 300 MiB")
            within.append(size <= weights + kv + WORKER_OVERHEAD_BYTES)
        return all(within), "; ".join(details)

    def gateway_memory() -> tuple[bool, str]:
        rss, budget = memory["max_rss_bytes"]["gateway"], memory["embedding_bytes"] + 0.5e9
        return (
            rss <= budget,
            f"{rss / 2**20:.0f} MiB vs {memory['embedding_bytes'] / 2**20:.0f} + {0.5e9 / 2**20:.0f} MiB",
        )

    def ttft() -> tuple[bool, str]:
        at16, at1 = stack[16]["ttft_s"]["p50"] * 1000, stack[1]["ttft_s"]["p50"] * 1000
        return at16 <= 3 * at1, f"{at16:.1f} ms vs 3 x {at1:.1f} = {3 * at1:.1f} ms"

    with_baseline = "needs --baseline transformers and level"
    check("single-stream TPOT p50 <= 0.8 x transformers", 1 in stack and 1 in one, f"{with_baseline} 1", tpot)
    check(
        "16 streams: tokens/s >= 10 x transformers one at a time",
        16 in stack and 16 in one,
        f"{with_baseline} 16",
        vs_one,
    )
    check(
        "16 streams: tokens/s >= 1.2 x transformers static batch",
        16 in stack and 16 in batch,
        f"{with_baseline} 16",
        vs_batch,
    )
    check(
        "16 streams: TTFT p50 <= 3 x single-stream TTFT p50",
        1 in stack and 16 in stack,
        "needs levels 1 and 16",
        ttft,
    )
    measured_memory = bool(memory and memory["kv_cache_bytes"])
    check(
        "each worker's RSS <= its share of the weights + its KV cache + 300 MiB",
        measured_memory,
        "needs --launch",
        worker_memory,
    )
    check(
        "gateway's RSS <= embedding bytes + 0.5 GB",
        measured_memory and "gateway" in memory["max_rss_bytes"],
        "needs --launch",
        gateway_memory,
    )
    return checks


def print_report(report: dict[str, Any]) -> None:
    config, info = report["config"], report["info"]
    prompts = "a distinct prompt per request" if config["distinct_prompts"] else "one prompt for all requests"
    machine = config["machine"]
    sampling = config["sampling"]
    if sampling != "greedy":
        sampling = f"sampled at temperature {sampling['temperature']}, top-p {sampling['top_p']}" + (
            f", top-k {sampling['top_k']}" if sampling.get("top_k") else ""
        )
    print(
        f"\n{info['model']} on {info['num_shards']} shards ({info['dtype']}, {info['device']}) at "
        f"{config['target']}: {config['prompt_tokens']} prompt tokens ({prompts}), "
        f"{config['new_tokens']} new tokens, {sampling}; {config['cpu_count']} cores, "
        f"load average {config['load_average']:.2f} at the start"
    )
    bf16 = "native" if machine["onednn_bf16_native"] else "emulated"
    print(
        f"machine: {machine['cpu_model']}, {machine['cores']} cores to run on; torch CPU capability "
        f"{machine['cpu_capability']}, oneDNN bf16 {bf16}"
    )
    rounds = config.get("rounds", 1)
    if rounds > 1:
        print(f"every figure: the median of {rounds} rounds (each the stack, then each baseline)")
    header = (
        f"{'system':<34} {'streams':>7} {'requests':>8} {'tokens/s':>9} {'req/s':>7}"
        f"   {'TTFT p50/p90/p99 (ms)':<26} {'TPOT p50/p90/p99 (ms)':<24}"
    )
    print(header)
    print("-" * len(header))
    for name, levels in systems(report):
        for level in levels:
            ttft = "/".join(f"{level['ttft_s'][p] * 1000:.1f}" for p in ("p50", "p90", "p99"))
            tpot = "/".join(f"{level['tpot_s'][p] * 1000:.2f}" for p in ("p50", "p90", "p99"))
            print(
                f"{name:<34} {level['concurrency']:>7} {level['requests']:>8} {level['tokens_per_s']:>9.1f} "
                f"{level['requests_per_s']:>7.2f}   {ttft:<26} {tpot:<24}"
            )
    if rounds > 1:
        print_rounds(report["round_figures"])
    if report["memory"]:
        sizes = ", ".join(
            f"{name} {size / 2**20:.0f} MiB" for name, size in report["memory"]["max_rss_bytes"].items()
        )
        print(f"\nresident memory (VmRSS, max over the levels): {sizes}")
        kv = ", ".join(
            f"shard_{rank} {size / 2**20:.0f} MiB"
            for rank, size in enumerate(report["memory"]["kv_cache_bytes"])
        )
        print(
            f"KV cache allocated: {kv}; checkpoint {report['memory']['checkpoint_bytes'] / 2**20:.0f} MiB, "
            f"embeddings {report['memory']['embedding_bytes'] / 2**20:.0f} MiB"
        )
    for name, baseline in (report.get("baselines") or {}).items():
        print(
            f"{name}: {describe_baseline(baseline)}, "
            f"resident memory {baseline['max_rss_bytes'] / 2**20:.0f} MiB"
        )
    if report["side_by_side"]:
        print_side_by_side(report)
    if len(report.get("protocols") or {}) > 1:
        print_protocol_cost(report)
    print_floor(report["floor"], config["distinct_prompts"])
    print("\ntargets")
    for check in report["targets"]:
        print(f"  {check['status']:<4}  {check['name']}: {check['detail']}")


def print_rounds(round_figures: list[list[dict[str, Any]]]) -> None:
    """Each round's tokens/s, TTFT p50 and TPOT p50 per system and level, side by side."""
    print("\nper round: tokens/s | TTFT p50 ms | TPOT p50 ms")
    for row, first in enumerate(round_figures[0]):
        cells = [
            f"{figures[row]['tokens_per_s']:.1f} | {figures[row]['ttft_p50_s'] * 1000:.1f} | "
            f"{figures[row]['tpot_p50_s'] * 1000:.2f}"
            for figures in round_figures
        ]
        print(f"{first['system']:<34} {first['concurrency']:>7}   " + "    ".join(cells))


def protocol_cost(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level, each other protocol's figures as a ratio of the first's (usually HTTP against gRPC)."""
    (first, reference), *others = report["protocols"].items()
    by_level = _by_level(reference)
    rows = []
    for protocol, levels in others:
        for level in levels:
            base = by_level.get(level["concurrency"])
            if base is None:
                continue
            rows.append(
                {
                    "protocol": protocol,
                    "against": first,
                    "concurrency": level["concurrency"],
                    "tokens_per_s": level["tokens_per_s"] / base["tokens_per_s"],
                    "ttft_p50": level["ttft_s"]["p50"] / base["ttft_s"]["p50"],
                    "tpot_p50": level["tpot_s"]["p50"] / base["tpot_s"]["p50"],
                }
            )
    return rows


def print_protocol_cost(report: dict[str, Any]) -> None:
    print("\nprotocol cost (the same stack, one run; ratio to the first protocol)")
    print(f"  {'protocol':<20} {'streams':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TPOT p50':>9}")
    for row in protocol_cost(report):
        print(
            f"  {row['protocol'] + ' / ' + row['against']:<20} {row['concurrency']:>7} "
            f"{row['tokens_per_s']:>8.2f}x {row['ttft_p50']:>8.2f}x {row['tpot_p50']:>8.2f}x"
        )


def describe_baseline(baseline: dict[str, Any]) -> str:
    """Which engine, which versions and what it computes in, from its own process's report."""
    engine = baseline.get("engine", "transformers")
    if engine == "transformers":
        return f"transformers {baseline['transformers_version']}, {baseline['torch_threads']} threads"
    if engine == "ctranslate2":
        return (
            f"CTranslate2 {baseline['ctranslate2_version']}, stored {baseline['quantization']}, "
            f"computes in {baseline['compute_type']}, {baseline['intra_threads']} threads"
        )
    caching = "on" if baseline["prefix_caching"] else "off"
    return (
        f"OpenVINO GenAI {baseline['openvino_genai_version']} (OpenVINO {baseline['openvino_version']}), "
        f"{baseline['weight_format']} weights converted by {baseline['converter']}, computes in "
        f"{baseline['inference_precision']}, {baseline['threads']} threads, prefix cache {caching}"
    )


def print_side_by_side(report: dict[str, Any]) -> None:
    """One table: every baseline's figures next to the stack's at each level, and the stack's ratio."""
    machine = report["config"]["machine"]
    bf16 = "bf16 native" if machine["onednn_bf16_native"] else "bf16 emulated"
    stack = _by_level(report["stack"]["levels"])
    rounds = report["config"].get("rounds", 1)
    measured = "one run" if rounds == 1 else f"medians of {rounds} rounds"
    print(
        f"\nbloomduo against each baseline, {measured} on {machine['cpu_model']} "
        f"({machine['cpu_capability']}, {bf16}, {machine['cores']} cores); ÷: bloomduo / baseline (tokens/s: "
        "higher is better for "
        "bloomduo; TPOT, TTFT: lower is)"
    )
    header = (
        f"{'baseline':<34} {'streams':>7}  {'tok/s':>8} {'÷':>6}  {'TPOT ms':>8} {'÷':>6}  "
        f"{'TTFT ms':>8} {'÷':>6}"
    )
    print(header)
    print("-" * len(header))
    for level in report["stack"]["levels"]:
        c = level["concurrency"]
        print(
            f"{'bloomduo':<34} {c:>7}  {level['tokens_per_s']:>8.1f} {'':>6}  "
            f"{level['tpot_s']['p50'] * 1000:>8.2f} {'':>6}  {level['ttft_s']['p50'] * 1000:>8.1f} {'':>6}"
        )
        for row in report["side_by_side"]:
            if row["concurrency"] == c and c in stack:
                print(
                    f"{row['system']:<34} {c:>7}  {row['tokens_per_s']:>8.1f} "
                    f"{row['stack_tokens_per_s_ratio']:>6.2f}  {row['tpot_p50_s'] * 1000:>8.2f} "
                    f"{row['stack_tpot_p50_ratio']:>6.2f}  {row['ttft_p50_s'] * 1000:>8.1f} "
                    f"{row['stack_ttft_p50_ratio']:>6.2f}"
                )


def print_floor(floor: dict[str, Any], distinct_prompts: bool) -> None:
    """The floor block: the measured rates, the model's bytes and FLOPs, and each level as a multiple."""
    if "tpot_s" not in floor:
        print(f"\nfloor: not measured: {floor['reason']}")
        return
    if floor["threads"] is None:
        where = f"{floor['device']}, x {floor['parallel_devices']} devices"
        single = "one device"
    else:
        where = f"{floor['device']}, {floor['threads']} threads (the workers' together)"
        single = "one thread"
    shape = " x ".join(map(str, floor["gemm_shape"]))
    parts = floor["prompt_flops_parts"]
    print(f"\nfloor (measured before the levels on {where})")
    print(
        f"  memory read bandwidth {floor['read_bytes_per_s'] / 1e9:.1f} GB/s "
        f"({single} {floor['read_bytes_per_s_single'] / 1e9:.1f} GB/s; sum over "
        f"{floor['array_bytes'] / 2**20:.0f} MiB)"
    )
    print(
        f"  GEMM {floor['gemm_flop_per_s'] / 1e9:.1f} GFLOP/s, {floor['dtype']} activations "
        f"({floor['gemm_kernel']} {shape})"
    )
    print(
        f"  TPOT floor {floor['tpot_s'] * 1000:.2f} ms = {floor['decode_bytes'] / 1e9:.3f} GB per token "
        f"(blocks, ln_f and LM head in {floor['weights']}; KV cache reads left out) / bandwidth"
    )
    print(
        f"  TTFT floor {floor['ttft_s'] * 1000:.2f} ms ({floor['ttft_bound']}-bound): the longer of "
        f"{floor['prompt_flops'] / 1e9:.2f} GFLOP for {floor['prompt_tokens']} prompt tokens / GEMM rate = "
        f"{floor['ttft_compute_s'] * 1000:.2f} ms (block matrices {parts['blocks'] / 1e9:.2f}, causal "
        f"attention {parts['attention'] / 1e9:.3f}, LM head for the last row {parts['lm_head'] / 1e9:.3f}) "
        "and the weights' read time (the TPOT floor)"
    )
    header = f"  {'system':<34} {'streams':>7}  {'TPOT p50 ÷ floor':>16}  {'TTFT p50 ÷ floor':>16}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for row in floor["levels"]:
        print(
            f"  {row['system']:<34} {row['concurrency']:>7}  {row['tpot_p50_x_floor']:>16.2f}  "
            f"{row['ttft_p50_x_floor']:>16.2f}"
        )
    if not distinct_prompts:
        # A repeated prompt's prefill can come from a cached prefix, so its TTFT may fall below the floor.
        print("  (one prompt for all requests: the stack may reuse its cached prefill; --distinct-prompts)")


def draw_chart(report: dict[str, Any], path: Path) -> None:
    """Tokens/s, TTFT p50 and TPOT p50 against concurrency, one curve per system."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    styles = ["o-", "s--", "^--", "s:", "^:", "s-.", "^-."]
    series = [
        (name, levels, styles[index % len(styles)]) for index, (name, levels) in enumerate(systems(report))
    ]
    panels = [
        ("throughput", "tokens/s", lambda level: level["tokens_per_s"]),
        ("time to first token (p50)", "ms", lambda level: level["ttft_s"]["p50"] * 1000),
        ("time per output token (p50)", "ms", lambda level: level["tpot_s"]["p50"] * 1000),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.5), constrained_layout=True)
    levels = report["config"]["concurrency"]
    for axis, (title, unit, value) in zip(axes, panels, strict=True):
        for name, rows, style in series:
            axis.plot([row["concurrency"] for row in rows], [value(row) for row in rows], style, label=name)
        axis.set_title(title)
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(unit)
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
    axes[0].legend()
    info, config = report["info"], report["config"]
    figure.suptitle(
        f"{info['model']}, {info['num_shards']} shards, {info['dtype']} on {info['device']}: "
        f"{config['prompt_tokens']} prompt + {config['new_tokens']} new tokens"
    )
    figure.savefig(path, dpi=110)
    plt.close(figure)
