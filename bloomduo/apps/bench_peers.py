"""Peer engines of `bloomduo bench`: CTranslate2, each variant run as its own process; prints JSON.

    python -m bloomduo.apps.bench_peers convert --model DIR --out CACHE_DIR --quantization int8
    python -m bloomduo.apps.bench_peers measure --converted CACHE_DIR --compute-type int8_float32 \\
        --threads 2 --prompt-ids 1,2,3 --new-tokens 64 --concurrency 1,16

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
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from bloomduo.apps.bench import (
    Sample,
    add_baseline_run_arguments,
    progress,
    progress_level,
    requests_for_level,
    rss_bytes,
    summarize_level,
)

PEERS = ("ctranslate2",)
INSTALL_HINT = "pip install 'bloomduo[peers]'"
# CTranslate2's CPU backend computes in these float types; a served float16 or bfloat16 falls back to
# float32 where the CPU lacks them (the generator reports what it really computes in).
_FLOAT_QUANTIZATIONS = ("float32", "float16", "bfloat16")


def ct2_variants(served_dtype: str) -> list[dict[str, str]]:
    """The two variants measured: its float computation at the served dtype, and int8 weights.

    `quantization` is what the converter stores; `compute_type` what the generator is asked to compute in.
    """
    stored = served_dtype if served_dtype in _FLOAT_QUANTIZATIONS else "float32"
    return [
        {"name": "ctranslate2", "quantization": stored},
        {"name": "ctranslate2 int8", "quantization": f"int8_{stored}"},
    ]


def checkpoint_key(model_dir: Path) -> str:
    """A short hash of what makes a conversion stale: config.json's bytes, the weights' sizes and mtimes,
    and the converter's version (its output format may change)."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(ct2_version().encode())
    return digest.hexdigest()[:16]


def ct2_version() -> str:
    try:
        return metadata.version("ctranslate2")
    except metadata.PackageNotFoundError:
        return "absent"


def conversion_dir(cache_dir: Path, model_dir: Path, quantization: str) -> Path:
    model_dir = model_dir.resolve()
    return (
        cache_dir / "peers" / "ctranslate2" / f"{model_dir.name}-{checkpoint_key(model_dir)}-{quantization}"
    )


def convert(model_dir: Path, out: Path, quantization: str) -> None:
    """Run CTranslate2's converter into a temporary directory and rename it into place, so an interrupted
    conversion never looks like a finished one."""
    from ctranslate2.converters import TransformersConverter

    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    TransformersConverter(str(model_dir)).convert(str(partial), quantization=quantization, force=True)
    try:
        partial.rename(out)
    except OSError:
        # Another bench converted the same checkpoint meanwhile: its copy is as good as ours.
        shutil.rmtree(partial, ignore_errors=True)
        if not (out / "model.bin").is_file():
            raise


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


def _sample(arrival: float, times: list[float]) -> Sample:
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
        samples.append(_sample(arrival, times))
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
        samples += [_sample(sent, times)] * level
        progress(f"{name} static batch", level, len(samples), batches * level, samples[-1])
    summary = summarize_level(level, samples, time.perf_counter() - start)
    progress_level(f"{name} static batch", summary)
    return summary


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ctranslate2

    prompt_ids = [int(part) for part in args.prompt_ids.split(",")]
    engine = Ct2(args.converted, args.compute_type, args.threads, args.new_tokens)
    if args.warmup:
        engine.batch(prompt_ids, args.warmup)
    results: dict[str, Any] = {
        "engine": "ctranslate2",
        "ctranslate2_version": ctranslate2.__version__,
        "quantization": args.quantization,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloomduo.apps.bench_peers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    to_convert = commands.add_parser("convert", help="convert a checkpoint with CTranslate2's converter")
    to_convert.add_argument("--model", type=Path, required=True)
    to_convert.add_argument("--out", type=Path, required=True)
    to_convert.add_argument("--quantization", required=True)
    to_measure = commands.add_parser("measure", help="measure a converted model; prints JSON")
    to_measure.add_argument("--name", default="ctranslate2", help="the system's name in progress lines")
    to_measure.add_argument("--converted", type=Path, required=True)
    to_measure.add_argument("--quantization", required=True, help="what the conversion stored (reported)")
    to_measure.add_argument("--compute-type", required=True)
    to_measure.add_argument("--threads", type=int, required=True, help="intra_threads: the stack's cores")
    add_baseline_run_arguments(to_measure)
    args = parser.parse_args(argv)

    # Only the JSON may reach stdout, whatever the converter prints along the way.
    out, sys.stdout = sys.stdout, sys.stderr
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        print(f"bench_peers: ctranslate2 is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if args.command == "convert":
        started = time.perf_counter()
        convert(args.model, args.out, args.quantization)
        json.dump({"conversion_s": time.perf_counter() - started}, out)
    else:
        json.dump(measure(args), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
