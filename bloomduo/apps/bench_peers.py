"""Peer engines of `bloomduo bench`: CTranslate2 here, each variant run as its own process; prints JSON.

    python -m bloomduo.apps.bench_peers convert --model DIR --out CACHE_DIR --stored int8
    python -m bloomduo.apps.bench_peers measure --converted CACHE_DIR --stored int8 --compute int8_float32 \\
        --threads 2 --prompt-ids 1,2,3 --new-tokens 64 --concurrency 1,16

Every peer module (this one, bench_openvino) offers bench the same face: `variants(served_dtype)`,
`conversion_dir(cache, model, stored)`, `is_converted(dir)` and a CLI with `convert` and `measure` taking the
same flags, so bench runs them all through one path. The parts they share live here: the cache key, the
rename into place, and the closed loops.

CTranslate2 is what people pick to run a transformers checkpoint fast on CPU. Its own converter
(`ctranslate2.converters.TransformersConverter`, what `ct2-transformers-converter` runs) turns the
checkpoint into its format once; the result is cached under $BLOOMDUO_CACHE/peers/ctranslate2, keyed by the
checkpoint's config.json and its safetensors files' sizes and mtimes. Conversion loads the whole model in
transformers, so it runs in a process of its own, and the measuring process holds only CTranslate2.

The measuring process serves the same closed loop as bench_baseline, with the same figures: one request at a
time (generate_tokens, streamed, so each token's time is known) and a static batch per level
(generate_batch, its step callback timing every step), greedy, EOS held back by min_length.

ctranslate2 is imported inside functions only: bench imports this module for the cache path, and the bench
must run (and say how to install it) where ctranslate2 is absent.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bloomduo.apps.bench import (
    BenchError,
    Sample,
    add_baseline_run_arguments,
    progress,
    progress_level,
    requests_for_level,
    rss_bytes,
    summarize_level,
)

INSTALL_HINT = "pip install 'bloomduo[peers]'"
# CTranslate2's CPU backend computes in these float types; a served float16 or bfloat16 falls back to
# float32 where the CPU lacks them (the generator reports what it really computes in).
_FLOAT_QUANTIZATIONS = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class PeerVariant:
    """One way a peer is measured: `stored` is what its converter writes (CTranslate2's quantization,
    OpenVINO's weight format), `compute` what its runtime is asked to compute in."""

    name: str
    stored: str
    compute: str


def variants(served_dtype: str) -> list[PeerVariant]:
    """The two variants measured: its float computation at the served dtype, and int8 weights."""
    stored = served_dtype if served_dtype in _FLOAT_QUANTIZATIONS else "float32"
    return [
        PeerVariant("ctranslate2", stored, stored),
        PeerVariant("ctranslate2 int8", f"int8_{stored}", f"int8_{stored}"),
    ]


def checkpoint_key(model_dir: Path, converter: str) -> str:
    """A short hash of what makes a conversion stale: config.json's bytes, the weights' sizes and mtimes,
    and the converter's versions (its output format may change)."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(converter.encode())
    return digest.hexdigest()[:16]


def publish(out: Path, write: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> None:
    """Let `write` fill a temporary directory beside `out`, then rename it into place, so an interrupted
    conversion never looks like a finished one."""
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        partial.rename(out)
    except OSError:
        # Another bench converted the same checkpoint meanwhile: its copy is as good as ours.
        shutil.rmtree(partial, ignore_errors=True)
        if not is_complete(out):
            raise


def ct2_version() -> str:
    try:
        return metadata.version("ctranslate2")
    except metadata.PackageNotFoundError:
        return "absent"


def conversion_dir(cache_dir: Path, model_dir: Path, quantization: str) -> Path:
    model_dir = model_dir.resolve()
    key = checkpoint_key(model_dir, ct2_version())
    return cache_dir / "peers" / "ctranslate2" / f"{model_dir.name}-{key}-{quantization}"


def is_converted(converted: Path) -> bool:
    return (converted / "model.bin").is_file()


def convert(model_dir: Path, out: Path, quantization: str) -> None:
    """Run CTranslate2's converter into the cache (published whole, see `publish`)."""
    from ctranslate2.converters import TransformersConverter

    def write(partial: Path) -> None:
        TransformersConverter(str(model_dir)).convert(str(partial), quantization=quantization, force=True)

    publish(out, write, is_converted)


class Ct2:
    def __init__(self, converted: Path, compute_type: str, threads: int, new_tokens: int) -> None:
        import ctranslate2

        supported = ctranslate2.get_supported_compute_types("cpu")
        if compute_type not in supported:
            # e.g. bfloat16 without AVX512-BF16 support in CTranslate2's CPU backend: it would convert anyway.
            compute_type = "int8_float32" if compute_type.startswith("int8") else "float32"
        self.generator = ctranslate2.Generator(
            str(converted), device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
        )
        self.vocabulary: list[str] = json.loads((converted / "vocabulary.json").read_text(encoding="utf-8"))
        self.new_tokens = new_tokens

    def tokens(self, prompt_ids: list[int]) -> list[str]:
        # CTranslate2 takes token strings; its vocabulary file lists them in id order.
        return [self.vocabulary[i] for i in prompt_ids]

    def stream(self, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
        """One request, streamed: the generated ids and the time each was ready."""
        ids, times = [], []
        for step in self.generator.generate_tokens(
            self.tokens(prompt_ids), max_length=self.new_tokens, min_length=self.new_tokens, sampling_topk=1
        ):
            times.append(time.perf_counter())
            ids.append(step.token_id)
        self._check(len(ids), len(times))
        return ids, times

    def batch(self, prompt_ids: list[int], batch: int) -> list[float]:
        """`batch` copies of the prompt in one generate_batch call; the time each step's tokens were ready."""
        times: list[float] = []

        def on_step(step: Any) -> bool:
            if step.batch_id == 0:  # every sequence runs every step (EOS is held back): time each step once
                times.append(time.perf_counter())
            return False

        results = self.generator.generate_batch(
            [self.tokens(prompt_ids)] * batch,
            max_length=self.new_tokens,
            min_length=self.new_tokens,
            sampling_topk=1,
            beam_size=1,
            include_prompt_in_result=False,
            callback=on_step,
        )
        self._check(len(results[0].sequences_ids[0]), len(times))
        return times

    def _check(self, generated: int, steps: int) -> None:
        if generated != self.new_tokens or steps != self.new_tokens:
            raise RuntimeError(f"CTranslate2 made {generated} tokens in {steps} steps, not {self.new_tokens}")


def token_sample(arrival: float, times: list[float]) -> Sample:
    """A request's figures from when it arrived and when each of its tokens was ready."""
    return Sample(
        ttft_s=times[0] - arrival,
        tpot_s=(times[-1] - times[0]) / (len(times) - 1),
        generated_tokens=len(times),
    )


def one_at_a_time(name: str, serve: Callable[[], list[float]], level: int, requests: int) -> dict[str, Any]:
    """The closed loop of bench_baseline.one_at_a_time: requests served in arrival order, one at a time."""
    samples: list[Sample] = []
    finished: list[float] = []
    start = time.perf_counter()
    for index in range(requests):
        arrival = start if index < level else finished[index - level]
        times = serve()
        finished.append(times[-1])
        samples.append(token_sample(arrival, times))
        progress(f"{name} one at a time", level, len(samples), requests, samples[-1])
    summary = summarize_level(level, samples, finished[-1] - start)
    progress_level(f"{name} one at a time", summary)
    return summary


def static_batch(name: str, serve: Callable[[int], list[float]], level: int, requests: int) -> dict[str, Any]:
    """Whole batches of `level` sequences, as bench_baseline.static_batch."""
    samples: list[Sample] = []
    start = time.perf_counter()
    batches = math.ceil(requests / level)
    for _ in range(batches):
        sent = time.perf_counter()
        times = serve(level)
        samples += [token_sample(sent, times)] * level
        progress(f"{name} static batch", level, len(samples), batches * level, samples[-1])
    summary = summarize_level(level, samples, time.perf_counter() - start)
    progress_level(f"{name} static batch", summary)
    return summary


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ctranslate2

    prompt_ids = [int(part) for part in args.prompt_ids.split(",")]
    engine = Ct2(args.converted, args.compute, args.threads, args.new_tokens)
    if args.warmup:
        engine.batch(prompt_ids, args.warmup)
    results: dict[str, Any] = {
        "engine": "ctranslate2",
        "ctranslate2_version": ctranslate2.__version__,
        "quantization": args.stored,
        "compute_type": engine.generator.compute_type,  # what it really computes in, after any fallback
        "intra_threads": args.threads,
        "converted": str(args.converted),
        "one_at_a_time": [],
        "static_batch": [],
    }
    max_rss = 0
    for level in args.concurrency:
        requests = requests_for_level(level, args.requests_per_level)
        one = one_at_a_time(args.name, lambda: engine.stream(prompt_ids)[1], level, requests)
        results["one_at_a_time"].append(one)
        results["static_batch"].append(
            one
            if level == 1
            else static_batch(args.name, lambda n: engine.batch(prompt_ids, n), level, requests)
        )
        max_rss = max(max_rss, rss_bytes(os.getpid()))
    results["max_rss_bytes"] = max_rss
    return results


def peer_parser(
    prog: str, engine: str, description: str | None
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The CLI every peer module shares: `convert` and `measure`; returns the parser and `measure`'s
    subparser, for a peer's own flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.set_defaults(prog=prog)
    commands = parser.add_subparsers(dest="command", required=True)
    to_convert = commands.add_parser("convert", help=f"convert a checkpoint with {engine}'s converter")
    to_convert.add_argument("--model", type=Path, required=True)
    to_convert.add_argument("--out", type=Path, required=True)
    to_convert.add_argument("--stored", required=True, help="what the converter stores (PeerVariant.stored)")
    to_measure = commands.add_parser("measure", help="measure a converted model; prints JSON")
    to_measure.add_argument("--name", default=engine.lower(), help="the system's name in progress lines")
    to_measure.add_argument("--converted", type=Path, required=True)
    to_measure.add_argument("--stored", required=True, help="what the conversion stored (reported)")
    to_measure.add_argument("--compute", required=True, help="what to compute in (PeerVariant.compute)")
    to_measure.add_argument("--threads", type=int, required=True, help="the stack's cores, all together")
    add_baseline_run_arguments(to_measure)
    return parser, to_measure


def run_command(
    args: argparse.Namespace,
    package: str,
    convert: Callable[[Path, Path, str], None],
    measure: Callable[[argparse.Namespace], dict[str, Any]],
) -> int:
    """A peer module's `convert` or `measure`, its JSON alone on stdout (bench parses it)."""
    out, sys.stdout = sys.stdout, sys.stderr  # whatever the engines print along the way goes to stderr
    try:
        if importlib.util.find_spec(package) is None:
            print(f"{args.prog}: {package} is not installed: {INSTALL_HINT}", file=sys.stderr)
            return 2
        if args.command == "convert":
            started = time.perf_counter()
            convert(args.model, args.out, args.stored)
            json.dump({"conversion_s": time.perf_counter() - started}, out)
        else:
            json.dump(measure(args), out)
        return 0
    except BenchError as exc:
        print(f"{args.prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = out


def main(argv: list[str] | None = None) -> int:
    parser, _ = peer_parser("python -m bloomduo.apps.bench_peers", "CTranslate2", __doc__)
    return run_command(parser.parse_args(argv), "ctranslate2", convert, measure)


if __name__ == "__main__":
    sys.exit(main())
