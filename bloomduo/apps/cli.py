"""The `bloomduo` command: run the stack or one of its services, query it, make and cut models."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bloomduo.apps import bench, shard_weights
from bloomduo.apps import eval as evaluation
from bloomduo.apps.flags import add_flags, from_args
from bloomduo.apps.launcher import StackOptions
from bloomduo.core.dtypes import FLOAT_DTYPES
from bloomduo.core.logs import configure_logging
from bloomduo.core.metrics import serve_metrics
from bloomduo.gateway.config import GatewayOptions, RequestLimits, SchedulerSettings, StepDeadline
from bloomduo.shard_worker.config import ShardOptions


def _add_model(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        required=required,
        help="BLOOM checkpoint directory in Hugging Face layout (config.json, *.safetensors, tokenizer.json)"
        + ("" if required else "; default: the embedded demo model, generated once into the cache"),
    )


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--typical-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    parser.add_argument("--truncate", type=int)
    parser.add_argument("--ignore-eos", action="store_true")


def _add_public_doors(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate of the public port (TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--auth-token-file",
        type=Path,
        help="require 'authorization: Bearer <token>' with the token in this file "
        "(or in the BLOOMDUO_AUTH_TOKEN environment variable)",
    )


def _auth_token(path: Path | None) -> str | None:
    if path is not None:
        return path.read_text().strip()
    return os.environ.get("BLOOMDUO_AUTH_TOKEN") or None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _add_gateway_settings(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, RequestLimits, "request limits")
    add_flags(parser, SchedulerSettings, "batching")
    add_flags(parser, StepDeadline, "stalled workers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bloomduo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the shard workers and the gateway, and serve until Ctrl-C")
    _add_model(up, required=False)
    add_flags(up, StackOptions)
    _add_public_doors(up)
    _add_gateway_settings(up)

    gateway = commands.add_parser("gateway", help="run the gateway alone (docker-compose runs it like this)")
    _add_model(gateway, required=True)
    gateway.add_argument(
        "--shards", required=True, help="comma-separated host:port of every shard worker of the group"
    )
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=50051)
    _add_gateway_settings(gateway)
    add_flags(gateway, GatewayOptions)
    gateway.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    gateway.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch threads for the gateway's own tensors (embeddings, sampling); more than one leaves an "
        "OpenMP team spinning after each op on cores the workers may compute on (default: 1)",
    )
    _add_public_doors(gateway)
    gateway.add_argument("--shard-tls-ca", type=Path, help="CA of the workers' certificates (TLS to workers)")
    gateway.add_argument(
        "--shard-tls-cert", type=Path, help="client certificate for workers that require mTLS"
    )
    gateway.add_argument("--shard-tls-key", type=Path, help="private key of --shard-tls-cert")

    shard = commands.add_parser("shard", help="run one shard worker (rank r of W)")
    _add_model(shard, required=True)
    shard.add_argument("--rank", type=int, required=True)
    shard.add_argument("--world-size", type=int, required=True)
    shard.add_argument(
        "--dist-init",
        required=True,
        help="torch.distributed rendezvous of the group, e.g. tcp://127.0.0.1:29500",
    )
    shard.add_argument("--host", default="127.0.0.1")
    shard.add_argument("--port", type=int, required=True)
    add_flags(shard, ShardOptions)
    shard.add_argument("--threads", type=_positive_int, help="torch threads on cpu (default: torch's own)")
    shard.add_argument(
        "--cpu-cores",
        help="comma-separated cores to run on, e.g. 0,1 (`up` gives each cpu worker its own when they fit)",
    )
    shard.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    shard.add_argument("--tls-cert", type=Path, help="PEM certificate of this worker (TLS)")
    shard.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    shard.add_argument(
        "--tls-ca", type=Path, help="require gateway client certificates signed by this CA (mTLS)"
    )

    generate = commands.add_parser("generate", help="stream a completion from a running gateway")
    generate.add_argument("prompt")
    generate.add_argument("--target", default="localhost:50051")
    generate.add_argument("--no-stream", action="store_true", help="wait for the whole text")
    _add_sampling(generate)

    health = commands.add_parser("health", help="exit 0 when a gateway or worker reports SERVING (probes)")
    health.add_argument("--target", default="localhost:50051")
    health.add_argument("--timeout", type=float, default=3.0)

    demo = commands.add_parser("demo-model", help="write a small random BLOOM checkpoint with its tokenizer")
    demo.add_argument("out_dir", type=Path)
    demo.add_argument("--preset", default="tiny", choices=("tiny", "bloom-560m", "bloom-7b1"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--dtype", default="float32", choices=FLOAT_DTYPES)
    demo.add_argument("--num-files", type=int, default=1, help="split the weights over this many safetensors")
    demo.add_argument(
        "--draw-on",
        default="cpu",
        help="device whose random generator draws the weights (cuda: bloom-7b1 in seconds; other weights)",
    )
    # Larger tools keep their options next to their code: each module has add_arguments() and run().
    for name, module, help_text in PLUGGED_COMMANDS:
        module.add_arguments(commands.add_parser(name, help=help_text))
    return parser


PLUGGED_COMMANDS = [
    ("bench", bench, "benchmark a running stack (and transformers as a baseline)"),
    ("eval", evaluation, "compare the stack with transformers: greedy agreement, logprobs, perplexity"),
    ("shard-weights", shard_weights, "cut a checkpoint into per-rank files that workers load"),
]


def _up(args: argparse.Namespace) -> int:
    from bloomduo.apps.demo_model import ensure_demo_model
    from bloomduo.apps.launcher import run_stack

    model_dir = args.model or ensure_demo_model("tiny")
    door_flags = (
        arg
        for flag, value in (
            ("--tls-cert", args.tls_cert),
            ("--tls-key", args.tls_key),
            ("--auth-token-file", args.auth_token_file),
        )
        if value is not None
        for arg in (flag, str(value.resolve()))
    )
    options = from_args(
        StackOptions,
        args,
        model_dir=model_dir.resolve(),
        limits=from_args(RequestLimits, args),
        scheduler=from_args(SchedulerSettings, args),
        step_deadline=from_args(StepDeadline, args),
        gateway_args=tuple(door_flags),
        tls_root=args.tls_cert.read_bytes() if args.tls_cert else None,
    )
    return run_stack(options)


def _gateway(args: argparse.Namespace) -> int:
    import torch

    from bloomduo.core.serving import TlsFiles
    from bloomduo.gateway.server import serve

    # A step's gateway work is a few rows of torch ops. With torch's default team of one thread a core,
    # each op's threads then spin in OpenMP's wait for more work: 77 % of the gateway's CPU in a 2-stream
    # decode (perf), ~8 ms a step taken from the pinned workers (a 2-row step 42.8 -> 30.7 ms with one).
    torch.set_num_threads(args.threads)
    options = from_args(
        GatewayOptions,
        args,
        model_dir=args.model.resolve(),
        shard_targets=[target.strip() for target in args.shards.split(",") if target.strip()],
        limits=from_args(RequestLimits, args),
        scheduler=from_args(SchedulerSettings, args),
        step_deadline=from_args(StepDeadline, args),
        tls=TlsFiles(args.tls_cert, args.tls_key),
        shard_tls=TlsFiles(args.shard_tls_cert, args.shard_tls_key, args.shard_tls_ca),
        auth_token=_auth_token(args.auth_token_file),
    )
    serve_metrics(args.metrics_port)
    return asyncio.run(serve(options, args.host, args.port))


def _shard(args: argparse.Namespace) -> int:
    import torch

    from bloomduo.core.serving import TlsFiles
    from bloomduo.shard_worker.server import serve

    if args.cpu_cores:
        allowed = os.sched_getaffinity(0)
        try:
            cores = {int(core) for core in args.cpu_cores.split(",")}
        except ValueError:
            cores = set()
        if not cores or not cores <= allowed:
            print(
                f"bloomduo shard: --cpu-cores {args.cpu_cores!r} must be a comma-separated list of the cores "
                f"this process may run on: {','.join(map(str, sorted(allowed)))}",
                file=sys.stderr,
            )
            return 2
        os.sched_setaffinity(0, cores)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = from_args(
        ShardOptions,
        args,
        model_dir=args.model.resolve(),
        rank=args.rank,
        world_size=args.world_size,
        dist_init=args.dist_init,
    )
    serve_metrics(args.metrics_port)
    asyncio.run(serve(options, args.host, args.port, TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from bloomduo.client import BloomduoError, Client

    params = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "typical_p": args.typical_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "truncate": args.truncate,
        "ignore_eos": args.ignore_eos,
    }
    try:
        with Client(args.target) as bloom:
            if args.no_stream:
                print(bloom.generate(args.prompt, **params).text)
                return 0
            for event in bloom.generate_stream(args.prompt, **params):
                if event.token is not None:
                    print(event.token.text, end="", flush=True)
            print()
    except BloomduoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _health(args: argparse.Namespace) -> int:
    from bloomduo.apps.launcher import wait_serving

    try:
        wait_serving(args.target, args.timeout)
    except TimeoutError as exc:
        print(f"not serving: {exc}", file=sys.stderr)
        return 1
    return 0


def _demo_model(args: argparse.Namespace) -> int:
    import torch

    from bloomduo.apps.demo_model import write_demo_model

    path = write_demo_model(
        args.out_dir,
        args.preset,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        num_files=args.num_files,
        draw_on=args.draw_on,
    )
    print(path)
    return 0


HANDLERS = {
    "up": _up,
    "gateway": _gateway,
    "shard": _shard,
    "generate": _generate,
    "health": _health,
    "demo-model": _demo_model,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bloomduo.shard_worker.distributed import prepare_device_environment

    # Before torch is first imported: an installed torch_npu must only load where npu is asked for.
    prepare_device_environment(getattr(args, "device", "cpu"))
    configure_logging(service=args.command)
    plugged = {name: module for name, module, _ in PLUGGED_COMMANDS}
    if args.command in plugged:
        return plugged[args.command].run(args)
    return HANDLERS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
