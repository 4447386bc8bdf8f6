"""What each way of holding the weights costs in accuracy, measured on a text against float32 transformers.

`bloomduo eval --text FILE` feeds the text's tokens once through every variant (teacher forcing: each
position sees the text, not the variant's own choices) and compares each variant's next-token distribution
with the reference's at every position:

- KL(reference || variant), its mean and its maximum over the positions, in nats;
- greedy agreement: how often the variant's most likely next token is the reference's;
- the text's perplexity under the variant.

Variants (`--variants`, comma-separated): `DTYPE` or `DTYPE+QUANTIZE` is bloomduo's own model code in that
dtype with those int8 weights (`bfloat16+int8-dynamic`); `transformers:DTYPE` is transformers in another
dtype, the spread any implementation in that dtype has; `ctranslate2:int8` and `openvino:int8` are the peers
with int8 weights, converted once into the cache like the bench's (needs `bloomduo[peers]`; OpenVINO computes
in float32 here, so that its int8 weights alone make the difference). `auto` is every dtype the device
computes in, int8 weights on the low-precision dtype, int8-dynamic as `--dtype auto` serves it (float32),
transformers in the low-precision dtype, and each peer's int8 where it is installed.

bloomduo's rows run its model code in-process at world size 1, not through the deployed stack: the public
API returns generated tokens' logprobs only, so a given text cannot be teacher-forced through it. Tensor
parallelism does not change these figures: the stack's float32 tokens match transformers at every shard
count (the parity tests), and a shard's int8 scales are per output channel, the same whichever rank holds
the channel.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloomduo.core.dtypes import FLOAT_DTYPES, name_of
from bloomduo.shard_worker.config import QUANTIZE_CHOICES

if TYPE_CHECKING:
    import torch

BLOOMDUO, TRANSFORMERS, CTRANSLATE2, OPENVINO = "bloomduo", "transformers", "ctranslate2", "openvino"
PEERS = {CTRANSLATE2: "ctranslate2", OPENVINO: "openvino_genai"}  # engine -> the module it needs
IN_PROCESS_NOTE = (
    "bloomduo's rows run its model code in-process (world size 1), not through the deployed stack: the "
    "public API returns only generated tokens' logprobs"
)


@dataclass(frozen=True)
class Variant:
    engine: str
    dtype: str  # for ctranslate2: what its weights are stored in
    quantize: str = QUANTIZE_CHOICES[0]

    @property
    def name(self) -> str:
        quantized = "" if self.quantize == QUANTIZE_CHOICES[0] else f" {self.quantize}"
        return f"{self.engine} {self.dtype}{quantized}"


@dataclass(frozen=True)
class Precision:
    variant: str
    perplexity: float
    greedy_agreement: float | None  # None for the reference itself
    mean_kl: float | None
    max_kl: float | None


def parse_variants(spec: str, device: str) -> list[Variant]:
    """`--variants` as Variants; ValueError naming the part it cannot read and what it accepts."""
    if spec == "auto":
        return auto_variants(device)
    variants = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        engine, _, rest = part.rpartition(":")
        dtype, _, quantize = rest.partition("+")
        if engine in PEERS and rest == "int8":
            variants.append(Variant(engine, "int8"))
        elif engine == TRANSFORMERS and rest in FLOAT_DTYPES:
            variants.append(Variant(TRANSFORMERS, rest))
        elif not engine and dtype in FLOAT_DTYPES and quantize in ("", *QUANTIZE_CHOICES):
            variants.append(Variant(BLOOMDUO, dtype, quantize or QUANTIZE_CHOICES[0]))
        else:
            raise ValueError(
                f"--variants: cannot read {part!r}; expected auto, or DTYPE[+QUANTIZE] (DTYPE one of "
                f"{', '.join(FLOAT_DTYPES)}; QUANTIZE one of {', '.join(QUANTIZE_CHOICES[1:])}), "
                f"transformers:DTYPE, ctranslate2:int8 or openvino:int8"
            )
    if not variants:
        raise ValueError("--variants names no variant")
    for engine, module in PEERS.items():
        if any(v.engine == engine for v in variants) and importlib.util.find_spec(module) is None:
            raise ValueError(f"--variants {engine}:int8 needs {module}: pip install 'bloomduo[peers]'")
    return variants


def auto_variants(device: str) -> list[Variant]:
    """float32; the device's fast dtype, alone and with int8 weights; on the CPU int8-dynamic in the dtype
    `--dtype auto` serves it from a bfloat16 checkpoint; transformers in the fast dtype; each peer's int8
    where installed. float16 is left out on the CPU, where it is emulated and slow."""
    on_cpu = device.startswith("cpu")
    low = "bfloat16" if on_cpu else "float16"
    variants = [Variant(BLOOMDUO, "float32"), Variant(BLOOMDUO, low)]
    if not on_cpu:
        variants.append(Variant(BLOOMDUO, "bfloat16"))
    variants.append(Variant(BLOOMDUO, low, "int8"))
    if on_cpu:  # CPU only
        import torch

        from bloomduo.shard_worker.engine import resolve_dtype

        served = resolve_dtype("auto", torch.bfloat16, torch.device("cpu"), "int8-dynamic")
        variants.append(Variant(BLOOMDUO, name_of(served), "int8-dynamic"))
    variants.append(Variant(TRANSFORMERS, low))
    if on_cpu:
        variants += [Variant(e, "int8") for e, module in PEERS.items() if importlib.util.find_spec(module)]
    return variants


def compare(reference: torch.Tensor, candidate: torch.Tensor, token_ids: list[int], name: str) -> Precision:
    """Both logits at every position of the text ([len(token_ids), vocab]): positions 0..n-2 predict
    tokens 1..n-1."""
    import torch

    ref = torch.log_softmax(reference[:-1].float(), dim=-1)
    cand = torch.log_softmax(candidate[:-1].float(), dim=-1)
    kl = (ref.exp() * (ref - cand)).sum(dim=-1).clamp(min=0)  # rounding can make a tiny KL negative
    targets = torch.tensor(token_ids[1:])[:, None]
    return Precision(
        variant=name,
        perplexity=float(torch.exp(-cand.gather(1, targets).mean())),
        greedy_agreement=float((ref.argmax(-1) == cand.argmax(-1)).float().mean()),
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
    )


def measure(
    model_dir: Path,
    token_ids: list[int],
    reference_logits: torch.Tensor,
    variants: list[Variant],
    device: str,
    in_process_logits: Callable[[str, str], torch.Tensor],
    transformers_logits: Callable[[str], torch.Tensor],
    cache_dir: Path,
) -> list[Precision]:
    """Every variant's precision against `reference_logits`, loading one model at a time to bound memory.

    `in_process_logits(dtype, quantize)` and `transformers_logits(dtype)` give a whole text's logits.
    """
    rows = []
    for variant in variants:
        if variant.engine == BLOOMDUO:
            logits = in_process_logits(variant.dtype, variant.quantize)
        elif variant.engine == TRANSFORMERS:
            logits = transformers_logits(variant.dtype)
        elif not device.startswith("cpu"):
            raise ValueError(f"{variant.engine}:int8 runs on the cpu here, not {device}")
        elif variant.engine == CTRANSLATE2:
            logits = ctranslate2_logits(model_dir, token_ids, cache_dir)
        else:
            logits = openvino_logprobs(model_dir, token_ids, cache_dir)
        rows.append(compare(reference_logits, logits, token_ids, variant.name))
        del logits
    return rows


def ctranslate2_logits(model_dir: Path, token_ids: list[int], cache_dir: Path) -> torch.Tensor:
    """CTranslate2's int8 logits at every position, converted once into the bench's peer cache."""
    import ctranslate2
    import numpy as np
    import torch

    from bloomduo.apps import bench_peers

    converted = bench_peers.conversion_dir(cache_dir, model_dir, "int8")
    if not (converted / "model.bin").is_file():
        bench_peers.convert(model_dir.resolve(), converted, "int8")
    generator = ctranslate2.Generator(
        str(converted), device="cpu", compute_type="int8", intra_threads=torch.get_num_threads()
    )
    logits = generator.forward_batch([token_ids])
    return torch.from_numpy(np.array(logits))[0]


def openvino_logprobs(model_dir: Path, token_ids: list[int], cache_dir: Path) -> torch.Tensor:
    """OpenVINO's int8 log-probabilities at every position (compare's log_softmax leaves them as they are)."""
    import torch

    from bloomduo.apps import bench_openvino

    return torch.from_numpy(bench_openvino.model_logprobs(model_dir.resolve(), token_ids, cache_dir, "int8"))


def to_json(rows: list[Precision], reference: Precision) -> list[dict[str, Any]]:
    from dataclasses import asdict

    return [asdict(reference), *(asdict(row) for row in rows)]


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    """The table's lines: the reference first (no comparison figures), then every variant."""

    def figure(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"  {'variant':<34} {'perplexity':>10} {'greedy agreement':>16} {'mean KL':>9} {'max KL':>9}"]
    for row in rows:
        lines.append(
            f"  {row['variant']:<34} {row['perplexity']:>10.5g} {figure(row['greedy_agreement'], '.3f'):>16} "
            f"{figure(row['mean_kl'], '.2e'):>9} {figure(row['max_kl'], '.2e'):>9}"
        )
    return lines
