"""OpenVINO GenAI as a peer of `bloomduo bench`, each variant run as its own process; prints JSON.

    python -m bloomduo.apps.bench_openvino convert --model DIR --out CACHE_DIR --stored int8
    python -m bloomduo.apps.bench_openvino measure --converted CACHE_DIR --stored int8 --compute bf16 \\
        --threads 2 --prompt-ids 1,2,3 --new-tokens 64 --concurrency 1,16 [--prefix-caching]

OpenVINO GenAI is what Intel offers to run a transformers checkpoint fast on CPU. Its own converter,
`optimum-cli export openvino` (optimum-intel), turns the checkpoint into OpenVINO IR once, with fp32 or int8
weights (NNCF's weight-only compression), plus the tokenizer and detokenizer models (openvino-tokenizers)
that GenAI loads beside it; the result is cached under $BLOOMDUO_CACHE/peers/openvino, keyed like
CTranslate2's conversions (bench_peers.checkpoint_key).

optimum-intel pins an older transformers (and huggingface-hub) than the project's, so the converter gets a
virtual environment of its own, created once under $BLOOMDUO_CACHE/peers/openvino/converter-<key> with
pinned versions. It is layered on the bench's own environment (a .pth file puts the bench's site-packages
after its own): torch and numpy come from there, so the converter never pulls a second torch (on PyPI a bare
torch may be a multi-GB CUDA build), and its openvino is the one that will run the model. optimum-intel is
installed without its dependencies, which name torchvision: only its vision models import it, and PyPI's
torchvision does not load beside a CPU build of torch.

The measuring process serves the same closed loop as bench_baseline and bench_peers, with the same
figures: one request at a time through `LLMPipeline` (streamed: a StreamerBase sees each token as it is
made), and each level's streams together through `ContinuousBatchingPipeline` (a request joins as soon as
its stream's previous one finished, as the stack's do), greedy, EOS held back by min_new_tokens and
ignore_eos, the prompt given as token ids. GenAI's prefix cache is on only when the stack could use its own
(one prompt for all requests): with --distinct-prompts the repeated prompt the peers get stands in for
distinct ones.

`model_logprobs` gives, for `bloomduo eval`, the converted model's next-token log-probabilities at every
position of a text (one forward pass of the IR through plain OpenVINO, no GenAI).

openvino is imported inside functions only: bench imports this module for the cache path, and the bench
must run (and say how to install it) where openvino is absent.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import sysconfig
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloomduo.apps.bench import (
    BenchError,
    Sample,
    progress,
    progress_level,
    requests_for_level,
    rss_bytes,
    summarize_level,
)
from bloomduo.apps.bench_peers import (
    PeerVariant,
    checkpoint_key,
    one_at_a_time,
    peer_parser,
    publish,
    run_command,
    token_sample,
)

if TYPE_CHECKING:
    import numpy as np

# The converter's own environment, beside the openvino and openvino-tokenizers installed with the bench
# (converter_requirements adds those at their installed versions, so the IR and the tokenizer models are
# written by the runtime that will read them). optimum-intel 2.2.0 wants transformers < 5.6 and
# huggingface-hub < 1.22; tokenizers 0.22 is what that transformers accepts.
CONVERTER_TRANSFORMERS = "transformers==5.5.4"
CONVERTER_PINS = (
    "optimum==2.3.0",
    "nncf==3.4.0",
    CONVERTER_TRANSFORMERS,
    "huggingface-hub==1.21.0",
    "tokenizers==0.22.2",
    "requests>=2.33,<3",
    "setuptools",
)
OPTIMUM_INTEL = "optimum-intel==2.2.0"  # installed with --no-deps: its requirements name torchvision
OPENVINO_PACKAGES = ("openvino", "openvino-tokenizers")
# The inference precision asked for, per served dtype: what the stack computes in. The CPU plugin computes
# bf16 or f16 only where the CPU does natively (measure falls back to f32 elsewhere and reports it).
_PRECISIONS = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
_MODEL_FILES = (
    "openvino_model.xml",
    "openvino_model.bin",
    "openvino_tokenizer.xml",
    "openvino_detokenizer.xml",
)


def variants(served_dtype: str) -> list[PeerVariant]:
    """fp32 weights and int8 weights (`optimum-cli export openvino --weight-format`), both computing at the
    served dtype's precision."""
    precision = _PRECISIONS.get(served_dtype, "f32")
    return [PeerVariant("openvino", "fp32", precision), PeerVariant("openvino int8", "int8", precision)]


def installed_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def converter_requirements() -> list[str]:
    """Every pin of the converter's environment but optimum-intel's (installed apart, without its deps)."""
    return [*CONVERTER_PINS, *(f"{name}=={installed_version(name)}" for name in OPENVINO_PACKAGES)]


def _converter_versions() -> str:
    """What the converter's output depends on: the versions it runs."""
    return "\n".join([*converter_requirements(), OPTIMUM_INTEL])


def _converter_identity() -> str:
    """What the converter's environment depends on: its versions and the environment it is layered on."""
    return "\n".join([_converter_versions(), sys.version, *_base_site_packages()])


def conversion_dir(cache_dir: Path, model_dir: Path, weight_format: str) -> Path:
    model_dir = model_dir.resolve()
    key = checkpoint_key(model_dir, _converter_versions())
    return cache_dir / "peers" / "openvino" / f"{model_dir.name}-{key}-{weight_format}"


def is_converted(converted: Path) -> bool:
    return all((converted / name).is_file() for name in _MODEL_FILES)


def _base_site_packages() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def converter_dir(cache_dir: Path) -> Path:
    key = hashlib.sha256(_converter_identity().encode()).hexdigest()[:12]
    return cache_dir / "peers" / "openvino" / f"converter-{key}"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_converter(cache_dir: Path) -> Path:
    """The converter environment's python, created (once, announced: it takes a while) if missing."""
    venv = converter_dir(cache_dir)
    if (venv / "ready").is_file():
        return _venv_python(venv)

    def create(partial: Path) -> None:
        started = time.perf_counter()
        print(
            f"bench: creating OpenVINO's converter environment in {venv} (once: {OPTIMUM_INTEL} wants "
            f"{CONVERTER_TRANSFORMERS}); installing it from the package index",
            file=sys.stderr,
            flush=True,
        )
        _run([sys.executable, "-m", "venv", str(partial)], "creating the virtual environment")
        site = next((partial / "lib").glob("python*/site-packages"))
        # Appended to sys.path after the converter's own site-packages: its pins shadow the bench's.
        (site / "bloomduo-bench-environment.pth").write_text("\n".join(_base_site_packages()) + "\n")
        pip = [str(_venv_python(partial)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _run([*pip, *converter_requirements()], "installing the converter's requirements")
        _run([*pip, "--no-deps", OPTIMUM_INTEL], "installing optimum-intel")
        (partial / "ready").write_text(_converter_identity() + "\n")
        print(
            f"bench: OpenVINO's converter environment is ready ({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    publish(venv, create, lambda done: (done / "ready").is_file())
    return _venv_python(venv)


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> str:
    """Run a step of the conversion, its output kept; on failure its last lines say why."""
    finished = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if finished.returncode != 0:
        tail = "\n".join(finished.stdout.splitlines()[-25:])
        raise BenchError(f"{what} failed (exit {finished.returncode}):\n{tail}")
    return finished.stdout


def convert(model_dir: Path, out: Path, weight_format: str, cache_dir: Path | None = None) -> None:
    """`optimum-cli export openvino` in the converter's environment, into the cache (published whole)."""
    from bloomduo.apps.demo_model import default_cache_dir

    python = ensure_converter(cache_dir or default_cache_dir())
    # Checkpoints are local directories: the hub is never asked, even for a name that looks like a repo.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def write(partial: Path) -> None:
        log = _run(
            [
                str(python), "-m", "optimum.commands.optimum_cli", "export", "openvino",
                "--model", str(model_dir.resolve()), "--task", "text-generation-with-past",
                "--weight-format", weight_format, str(partial),
            ],
            f"optimum-cli export openvino --weight-format {weight_format}",
            env,
        )  # fmt: skip
        missing = [name for name in _MODEL_FILES if not (partial / name).is_file()]
        if missing:
            tail = "\n".join(log.splitlines()[-25:])
            raise BenchError(f"optimum-cli wrote no {', '.join(missing)}:\n{tail}")
        (partial / "conversion.log").write_text(log, encoding="utf-8")

    publish(out, write, is_converted)


def inference_precision(asked: str) -> str:
    """The precision the CPU plugin will compute in: the one asked for where the CPU has it natively."""
    import openvino as ov

    native = {"bf16": "BF16", "f16": "FP16"}
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return asked if asked == "f32" or native.get(asked) in capabilities else "f32"


class OpenVino:
    """One converted model, served by GenAI on the CPU with `threads` threads."""

    def __init__(
        self, converted: Path, precision: str, threads: int, new_tokens: int, prefix_caching: bool
    ) -> None:
        import openvino_genai

        self.converted = converted
        self.new_tokens = new_tokens
        # Set, not left to the plugin's default: that is bf16 wherever the CPU has it, fp32 weights or not.
        self.properties = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision}
        self.scheduler = openvino_genai.SchedulerConfig()
        self.scheduler.enable_prefix_caching = prefix_caching
        config = openvino_genai.GenerationConfig()
        config.max_new_tokens = config.min_new_tokens = new_tokens
        config.ignore_eos = True
        config.do_sample = False
        self.config = config

    def single(self) -> Any:
        import openvino_genai

        return openvino_genai.LLMPipeline(
            str(self.converted), "CPU", scheduler_config=self.scheduler, **self.properties
        )

    def batched(self) -> Any:
        import openvino_genai

        return openvino_genai.ContinuousBatchingPipeline(
            str(self.converted), self.scheduler, "CPU", self.properties
        )

    def stream(self, pipeline: Any, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
        """One request through LLMPipeline, streamed: the generated ids and the time each was ready."""
        import openvino_genai

        class Clock(openvino_genai.StreamerBase):
            def __init__(self) -> None:
                super().__init__()
                self.ids: list[int] = []
                self.times: list[float] = []

            def write(self, token: int | list[int]) -> openvino_genai.StreamingStatus:
                now = time.perf_counter()
                for one in token if isinstance(token, list) else [token]:
                    self.ids.append(int(one))
                    self.times.append(now)
                return openvino_genai.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        clock = Clock()
        result = pipeline.generate(prompt_tensor(prompt_ids), self.config, clock)
        if list(result.tokens[0]) != clock.ids:
            raise RuntimeError("OpenVINO GenAI streamed other tokens than it returned")
        self._check(len(clock.ids))
        return clock.ids, clock.times

    def closed_loop(
        self, name: str, pipeline: Any, prompt_ids: list[int], level: int, requests: int
    ) -> dict[str, Any]:
        """`level` streams through ContinuousBatchingPipeline, each sending its next request as soon as its
        previous one finished; every token is timed when the step that made it returns."""
        import openvino_genai

        samples: list[Sample] = []
        running: dict[int, tuple[Any, float, list[float]]] = {}  # request id: handle, arrival, token times
        sent = 0

        def send(arrival: float) -> None:
            nonlocal sent
            handle = pipeline.add_request(sent, prompt_tensor(prompt_ids), self.config)
            running[sent] = (handle, arrival, [])
            sent += 1

        start = time.perf_counter()
        for _ in range(min(level, requests)):
            send(start)
        while running:
            pipeline.step()
            now = time.perf_counter()
            for request_id, (handle, arrival, times) in list(running.items()):
                while handle.can_read():  # read() hands out one step's tokens at a time
                    for output in handle.read().values():
                        times += [now] * len(output.generated_ids)
                if handle.get_status() == openvino_genai.GenerationStatus.RUNNING:
                    continue
                del running[request_id]
                self._check(len(times))
                samples.append(token_sample(arrival, times))
                progress(f"{name} continuous batching", level, len(samples), requests, samples[-1])
                if sent < requests:
                    send(now)
        summary = summarize_level(level, samples, time.perf_counter() - start)
        progress_level(f"{name} continuous batching", summary)
        return summary

    def _check(self, generated: int) -> None:
        if generated != self.new_tokens:
            raise RuntimeError(f"OpenVINO GenAI made {generated} tokens, not {self.new_tokens}")


def prompt_tensor(prompt_ids: list[int]) -> Any:
    """The prompt as the tensor of one sequence GenAI takes: int64, [1, n]."""
    import numpy as np
    import openvino as ov

    return ov.Tensor(np.array([prompt_ids], dtype=np.int64))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import openvino
    import openvino_genai

    prompt_ids = [int(part) for part in args.prompt_ids.split(",")]
    precision = inference_precision(args.compute)
    engine = OpenVino(args.converted, precision, args.threads, args.new_tokens, args.prefix_caching)
    results: dict[str, Any] = {
        "engine": "openvino",
        "openvino_genai_version": openvino_genai.__version__.split("-")[0],
        "openvino_version": openvino.__version__.split("-")[0],
        "converter": f"{OPTIMUM_INTEL} ({CONVERTER_TRANSFORMERS})",
        "weight_format": args.stored,
        "inference_precision": precision,  # what it really computes in, after any fallback
        "threads": args.threads,
        "prefix_caching": args.prefix_caching,
        "converted": str(args.converted),
        "one_at_a_time": [],
        "continuous_batching": [],
    }
    max_rss = 0
    # One pipeline at a time, so that each level's memory is one model's.
    pipeline = engine.single()
    if args.warmup:
        engine.stream(pipeline, prompt_ids)
    for level in args.concurrency:
        requests = requests_for_level(level, args.requests_per_level)
        serve = lambda: engine.stream(pipeline, prompt_ids)[1]  # noqa: E731
        results["one_at_a_time"].append(one_at_a_time(args.name, serve, level, requests))
        max_rss = max(max_rss, rss_bytes(os.getpid()))
    del pipeline
    pipeline = engine.batched()
    if args.warmup:
        pipeline.generate([prompt_tensor(prompt_ids)] * args.warmup, [engine.config] * args.warmup)
    for level, one in zip(args.concurrency, results["one_at_a_time"], strict=True):
        requests = requests_for_level(level, args.requests_per_level)
        # One stream is the one-at-a-time server: no need to time it twice.
        batched = one if level == 1 else engine.closed_loop(args.name, pipeline, prompt_ids, level, requests)
        results["continuous_batching"].append(batched)
        max_rss = max(max_rss, rss_bytes(os.getpid()))
    results["max_rss_bytes"] = max_rss
    return results


def logprobs(
    converted: Path, token_ids: list[int], precision: str = "f32", threads: int | None = None
) -> np.ndarray:
    """The model's next-token log-probabilities after every prefix of `token_ids`: [len(token_ids), vocab],
    float32, from one forward pass of the converted IR (the KV-cache states start empty)."""
    import numpy as np
    import openvino as ov

    properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": inference_precision(precision)}
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(converted / "openvino_model.xml"), "CPU", properties)
    request = compiled.create_infer_request()
    request.reset_state()
    ids = np.array([token_ids], dtype=np.int64)
    request.infer(
        {"input_ids": ids, "attention_mask": np.ones_like(ids), "beam_idx": np.zeros(1, dtype=np.int32)}
    )
    logits = request.get_tensor("logits").data[0].astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def model_logprobs(
    model_dir: Path,
    token_ids: list[int],
    cache_dir: Path,
    weight_format: str = "int8",
    precision: str = "f32",
) -> np.ndarray:
    """For `bloomduo eval`: the checkpoint's next-token log-probabilities under OpenVINO (see `logprobs`),
    converted once into the bench's peer cache. f32 by default, so that int8 weights alone make the
    difference from float32 transformers."""
    converted = conversion_dir(cache_dir, model_dir, weight_format)
    if not is_converted(converted):
        convert(model_dir, converted, weight_format, cache_dir)
    return logprobs(converted, token_ids, precision)


def main(argv: list[str] | None = None) -> int:
    parser, to_measure = peer_parser("python -m bloomduo.apps.bench_openvino", "OpenVINO", __doc__)
    to_measure.add_argument(
        "--prefix-caching",
        action="store_true",
        help="let GenAI reuse a cached prompt, as the stack does when every request has the same prompt",
    )
    return run_command(parser.parse_args(argv), "openvino_genai", convert, measure)


if __name__ == "__main__":
    sys.exit(main())
