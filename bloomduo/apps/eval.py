"""`bloomduo eval`: the precision sign-off, bloomduo against transformers on the same checkpoint.

Like the reference deployment's precision check (parity with the GPU is the bar), it reports:

- per prompt, the deployed stack's greedy continuation (public API, details=True) against transformers'
  BloomForCausalLM: the fraction of positions that agree up to the first divergence, where that is, and
  the largest |logprob difference| over the agreed prefix;
- with --text, teacher-forced on that text, what every dtype and int8 scheme costs against the reference:
  KL divergence per token (mean and max), greedy agreement and perplexity, beside transformers in the same
  low-precision dtype and CTranslate2's int8 where installed (bloomduo.apps.eval_precision).

Limitation: the public API returns the logprobs of generated tokens only, so a given text cannot be
teacher-forced through the deployed stack. bloomduo's rows of the text's table run its model code in-process
instead (one rank, world size 1, on --device, the gateway's Embedder in front), and say so.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloomduo.apps import eval_precision
from bloomduo.apps.launcher import StackOptions, shard_device, start_private_stack
from bloomduo.core.dtypes import DTYPE_CHOICES, FLOAT_DTYPES

if TYPE_CHECKING:
    import torch

    from bloomduo.client import Result

# English, French, Chinese and code: BLOOM is multilingual, and precision problems often show first in the
# scripts that split into many byte-level tokens.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "La tour Eiffel est située à",
    "Je pense, donc",
    "北京是中国的首都，",
    "人工智能的未来是",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "for (int i = 0; i < n; i++) {",
)


@dataclass(frozen=True)
class PromptResult:
    prompt: str
    prompt_tokens: int
    generated_tokens: int
    agreement: float  # positions equal up to the first divergence / generated tokens
    first_divergence: int | None  # index of the first generated token transformers would not choose
    max_abs_logprob_diff: float | None  # over the agreed prefix; None when it is empty
    text: str  # the stack's continuation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="the full checkpoint (transformers loads it as the reference)",
    )
    parser.add_argument("--prompts", type=Path, help="one prompt per line (default: a multilingual set)")
    parser.add_argument(
        "--text", type=Path, help="also measure every variant's KL divergence and perplexity on this text"
    )
    parser.add_argument(
        "--variants",
        default="auto",
        help="with --text, comma-separated: DTYPE[+QUANTIZE] (bloomduo, e.g. bfloat16+int8-dynamic), "
        "transformers:DTYPE, ctranslate2:int8, openvino:int8; auto: every dtype the device computes in, "
        "each int8 scheme, transformers in the low-precision dtype, and each peer's int8 when installed",
    )
    parser.add_argument(
        "--max-text-tokens", type=int, default=1024, help="measure on the text's first N tokens"
    )
    parser.add_argument(
        "--target", help="host:port of a running gateway on --model (default: launch a stack on --model)"
    )
    parser.add_argument(
        "--num-shards",
        type=int,
        default=StackOptions.num_shards,
        help="tensor-parallel degree of the launched stack",
    )
    parser.add_argument(
        "--device", default=StackOptions.device, help="device of the launched stack and the in-process model"
    )
    parser.add_argument("--dtype", default=StackOptions.dtype, choices=DTYPE_CHOICES, help="bloomduo's dtype")
    parser.add_argument(
        "--reference-dtype", default="float32", choices=FLOAT_DTYPES, help="transformers' dtype"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")


def run(args: argparse.Namespace) -> int:
    from bloomduo.client import BloomduoError
    from bloomduo.core.checkpoint import CheckpointError

    try:
        prompts = read_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
        if args.text:
            eval_precision.parse_variants(args.variants, args.device)  # a typo fails before the stack starts
        report = evaluate(args, prompts)
    except (BloomduoError, CheckpointError, RuntimeError, TimeoutError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def read_prompts(path: Path) -> list[str]:
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return prompts


def evaluate(args: argparse.Namespace, prompts: Sequence[str]) -> dict[str, Any]:
    """Run the stack, then transformers, then (with --text) the in-process model, one at a time to bound
    memory; returns the JSON report."""
    import torch

    from bloomduo.client import Client

    with _serving(args) as target, Client(target) as bloom:
        info = bloom.info()
        served = [
            (
                bloom.tokenize(prompt),
                bloom.generate(prompt, max_new_tokens=args.max_new_tokens, ignore_eos=True, details=True),
            )
            for prompt in prompts
        ]

    reference_dtype = getattr(torch, args.reference_dtype)
    reference = _transformers_model(args.model, reference_dtype)
    results = [
        compare(prompt, prompt_ids, result, _teacher_forced_logprobs(reference, prompt_ids, result))
        for prompt, (prompt_ids, result) in zip(prompts, served, strict=True)
    ]
    report: dict[str, Any] = {
        "model": str(args.model),
        "stack": {
            "target": target,
            "num_shards": info.num_shards,
            "dtype": info.dtype,
            "device": info.device,
        },
        "reference": {"library": "transformers", "dtype": args.reference_dtype},
        "max_new_tokens": args.max_new_tokens,
        "prompts": [asdict(result) for result in results],
    }
    if args.text:
        text_ids = _tokenize(args.model, args.text.read_text(encoding="utf-8"))[: args.max_text_tokens]
        if len(text_ids) < 2:
            raise ValueError(f"{args.text} encodes to fewer than 2 tokens: nothing to predict")
        reference_logits = _transformers_logits(reference, text_ids)
        del reference  # before the variants load: a 7B1 is big twice over
        report["text"] = _text_precision(args, text_ids, reference_logits)
    return report


def compare(
    prompt: str, prompt_ids: list[int], result: Result, reference_logprobs: torch.Tensor
) -> PromptResult:
    """Agreement of the stack's greedy tokens with the reference's, given the reference's log-softmax at
    every generated position, teacher-forced on the stack's tokens ([generated tokens, vocab]).

    Up to the first divergence both saw the same prefix, so the reference's argmax there is exactly its own
    greedy choice, and the logprobs of one token under the same context can be compared.
    """
    ids = [token.id for token in result.tokens]
    chosen = reference_logprobs.argmax(dim=-1).tolist()
    first_divergence = next((i for i, (a, b) in enumerate(zip(ids, chosen, strict=True)) if a != b), None)
    agreed = len(ids) if first_divergence is None else first_divergence
    diffs = [
        abs(token.logprob - float(reference_logprobs[i, token.id]))
        for i, token in enumerate(result.tokens[:agreed])
    ]
    return PromptResult(
        prompt=prompt,
        prompt_tokens=len(prompt_ids),
        generated_tokens=len(ids),
        agreement=agreed / len(ids) if ids else 1.0,
        first_divergence=first_divergence,
        max_abs_logprob_diff=max(diffs) if diffs else None,
        text=result.text,
    )


def format_report(report: dict[str, Any]) -> str:
    stack, reference = report["stack"], report["reference"]
    lines = [
        f"{report['model']}: stack at {stack['target']} ({stack['num_shards']} shards, {stack['dtype']}, "
        f"{stack['device']}) vs transformers ({reference['dtype']}), "
        f"{report['max_new_tokens']} greedy tokens per prompt",
        "",
        f"{'prompt':<36} {'tokens':>6} {'agreement':>9} {'first divergence':>16} {'max |Δlogprob|':>14}",
    ]
    for row in report["prompts"]:
        prompt = _fit(repr(row["prompt"]), 36)
        divergence = "-" if row["first_divergence"] is None else str(row["first_divergence"])
        diff = "-" if row["max_abs_logprob_diff"] is None else f"{row['max_abs_logprob_diff']:.2e}"
        lines.append(
            f"{prompt} {row['generated_tokens']:>6} {row['agreement']:>9.3f} {divergence:>16} {diff:>14}"
        )
    text = report.get("text")
    if text:
        lines += [
            "",
            f"{text['file']} ({text['tokens']} tokens, teacher-forced) against transformers "
            f"({reference['dtype']}), on {text['device']}",
            *eval_precision.format_rows(text["rows"]),
            f"  note: {text['note']}",
        ]
    return "\n".join(lines)


def _fit(text: str, width: int) -> str:
    """`text` padded, or cut with dots, to `width` terminal columns; CJK characters take two."""
    widths = [2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text]
    if sum(widths) <= width:
        return text + " " * (width - sum(widths))
    kept = used = 0
    while used + widths[kept] <= width - 3:
        used += widths[kept]
        kept += 1
    return text[:kept] + "." * (width - used)


@contextmanager
def _serving(args: argparse.Namespace) -> Iterator[str]:
    """The gateway's address: --target, or a stack launched on --model for the duration."""
    if args.target:
        yield args.target
        return

    stack = start_private_stack(args.model, args.num_shards, args.device, args.dtype)
    try:
        yield stack.target
    finally:
        stack.stop()


def _transformers_model(model_dir: Path, dtype: torch.dtype):
    from transformers import BloomForCausalLM

    return BloomForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _transformers_logits(model, token_ids: list[int]) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0]


def _teacher_forced_logprobs(model, prompt_ids: list[int], result: Result) -> torch.Tensor:
    """The reference's log-softmax at each generated position, fed the prompt and the stack's tokens."""
    import torch

    ids = [*prompt_ids, *(token.id for token in result.tokens)]
    logits = _transformers_logits(model, ids)[len(prompt_ids) - 1 : len(ids) - 1]
    return torch.log_softmax(logits.float(), dim=-1)


def _tokenize(model_dir: Path, text: str) -> list[int]:
    """The text's ids as the gateway encodes prompts."""
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids


def _text_precision(
    args: argparse.Namespace, text_ids: list[int], reference_logits: torch.Tensor
) -> dict[str, Any]:
    """The --text table: the reference's perplexity, then every variant against it."""
    import torch

    from bloomduo.apps.demo_model import default_cache_dir

    own = eval_precision.compare(reference_logits, reference_logits, text_ids, "")
    reference_row = eval_precision.Precision(
        f"transformers {args.reference_dtype} (reference)", own.perplexity, None, None, None
    )
    rows = eval_precision.measure(
        args.model,
        text_ids,
        reference_logits,
        eval_precision.parse_variants(args.variants, args.device),
        args.device,
        in_process_logits=lambda dtype, quantize: _in_process_logits(args, text_ids, dtype, quantize),
        transformers_logits=lambda dtype: _transformers_logits(
            _transformers_model(args.model, getattr(torch, dtype)), text_ids
        ),
        cache_dir=default_cache_dir(),
    )
    return {
        "file": str(args.text),
        "tokens": len(text_ids),
        "device": shard_device(args.device, 0),
        "rows": eval_precision.to_json(rows, reference_row),
        "note": eval_precision.IN_PROCESS_NOTE,
    }


def _in_process_logits(
    args: argparse.Namespace, token_ids: list[int], dtype: str, quantize: str
) -> torch.Tensor:
    """Logits at every position from bloomduo's own model code in `dtype` with `quantize`d weights, the text
    fed as one prefill chunk, on the device rank 0 of a launched stack would use."""
    import torch

    from bloomduo.core.checkpoint import Checkpoint
    from bloomduo.core.dtypes import to_torch
    from bloomduo.gateway.embedding import Embedder
    from bloomduo.shard_worker.fused_blocks import FusedBlocks
    from bloomduo.shard_worker.model import Chunk
    from bloomduo.shard_worker.tensor_parallel import load_shard
    from bloomduo.shard_worker.weight_formats import format_weights

    checkpoint = Checkpoint(args.model)
    device = torch.device(shard_device(args.device, 0))
    model = load_shard(checkpoint, 0, 1, device=device, dtype=to_torch(dtype), quantize=quantize)
    format_weights(model, device, to_torch(dtype))  # the kernels a worker here would choose, measured alike
    model.fused_blocks = FusedBlocks.build(model)  # and its blocks in one call where a worker has them
    hidden = Embedder(checkpoint, to_torch(dtype))(torch.tensor(token_ids))
    cache = model.new_kv_cache(initial_capacity=len(token_ids))
    with torch.inference_mode():
        return model.logits(model.blocks(hidden, [Chunk(0, 0, len(token_ids))], cache)).float().cpu()
