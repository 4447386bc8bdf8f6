"""`bloomduo shard-weights`: cut a checkpoint into one safetensors file per tensor-parallel rank.

The reference Ascend deployment cuts BLOOM-7B1 into two halves before serving. This does the same with
the rules of shard_worker/tensor_parallel.py, so each worker then reads one file whole instead of slicing
the full checkpoint. The output directory is served like any checkpoint (`bloomduo up --model OUT`):

    OUT/config.json                          the model's config plus "bloomduo_num_shards": N
    OUT/tokenizer.json, ...                  the tokenizer files, copied
    OUT/gateway.safetensors                  word_embeddings and word_embeddings_layernorm (the gateway's)
    OUT/rank-00000-of-0000N.safetensors ...  each rank's parts, under the model's parameter names

Tensors are read (only the rank's slice of each) and written one at a time, so cutting BLOOM-7B1 never
holds more than one tensor in memory.

With --quantize int8 every Linear's weight (the LM head's slice too) is stored as the workers' --quantize
would make it at start: int8 per output channel of the rank's slice, under the weight's name, with its
float32 scales under the name + "_scale" (shard_worker/quantize.py); config.json says
"bloomduo_quantized": "int8". Rank files are then about half the bytes of bfloat16, and a worker loads
them without holding float weights first. Serve the cut with --quantize int8 or int8-dynamic.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

    from bloomduo.core.checkpoint import Checkpoint

    Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]

GATEWAY_TENSORS = (
    "word_embeddings.weight",
    "word_embeddings_layernorm.weight",
    "word_embeddings_layernorm.bias",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="the full BLOOM checkpoint directory")
    parser.add_argument(
        "--num-shards",
        type=int,
        required=True,
        help="the number of shard workers that will serve it (bloomduo up --num-shards); must divide n_head",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: store every Linear's weight as int8 with per-channel scales (serve with --quantize int8 "
        "or int8-dynamic)",
    )


def run(args: argparse.Namespace) -> int:
    from bloomduo.core.checkpoint import CheckpointError

    try:
        out = shard_weights(args.model, args.num_shards, args.out, args.quantize)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    quantize = "" if args.quantize == "none" else f" --quantize {args.quantize}"
    print(f"serve it with: bloomduo up --model {out} --num-shards {args.num_shards}{quantize}")
    return 0


def shard_weights(model_dir: Path, num_shards: int, out_dir: Path, quantize: str = "none") -> Path:
    """Write the cut of `model_dir` for `num_shards` ranks into `out_dir` (with int8 Linears when
    `quantize` is "int8") and return `out_dir`."""
    from tqdm import tqdm

    from bloomduo.core.checkpoint import (
        GATEWAY_FILE,
        NUM_SHARDS_KEY,
        QUANTIZED_KEY,
        Checkpoint,
        CheckpointError,
        rank_file_name,
        write_safetensors,
    )
    from bloomduo.shard_worker.tensor_parallel import check_world_size

    checkpoint = Checkpoint(model_dir)
    if checkpoint.num_shards is not None:
        raise CheckpointError(
            f"{model_dir} is already cut for {checkpoint.num_shards} shards: "
            "point --model at the full checkpoint"
        )
    check_world_size(checkpoint.config, num_shards)
    if out_dir.resolve() == model_dir.resolve():
        raise CheckpointError(
            "--out must be another directory than --model: config.json would be overwritten"
        )
    if not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{model_dir / 'tokenizer.json'} is missing; the gateway needs it")

    out_dir.mkdir(parents=True, exist_ok=True)
    # config.json marks the directory as cut, so it is written last: an interrupted run leaves none.
    (out_dir / "config.json").unlink(missing_ok=True)
    parts = {GATEWAY_FILE: _gateway_part(checkpoint)}
    for rank in range(num_shards):
        parts[rank_file_name(rank, num_shards)] = _rank_part(checkpoint, rank, num_shards, quantize == "int8")
    total_bytes = sum(
        math.prod(shape) * dtype.itemsize for layout, _ in parts.values() for shape, dtype in layout.values()
    )
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="shard-weights", file=sys.stderr) as bar:
        for file_name, (layout, tensors) in parts.items():
            write_safetensors(out_dir / file_name, layout, _with_progress(tensors, bar, file_name))

    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config[NUM_SHARDS_KEY] = num_shards
    if quantize == "int8":
        config[QUANTIZED_KEY] = quantize
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _gateway_part(checkpoint: Checkpoint) -> tuple[Layout, Iterator[torch.Tensor]]:
    layout = {name: (checkpoint.shape(name), checkpoint.dtype(name)) for name in GATEWAY_TENSORS}
    return layout, (checkpoint.read(name) for name in layout)


def _rank_part(
    checkpoint: Checkpoint, rank: int, num_shards: int, int8: bool
) -> tuple[Layout, Iterator[torch.Tensor]]:
    """The rank's tensors exactly as its model holds them (load_shard's meta model gives names and shapes);
    with `int8`, each Linear's weight as int8 followed by its scales."""
    import torch

    from bloomduo.shard_worker.quantize import SCALE_SUFFIX, linear_weights, per_channel_int8
    from bloomduo.shard_worker.tensor_parallel import build_meta_shard, read_shard_tensor, stored_name

    model, full_shapes = build_meta_shard(checkpoint.config, rank, num_shards)
    int8_weights = linear_weights(model) if int8 else {}
    layout = {}
    for name, param in model.named_parameters():
        if name in int8_weights:
            layout[name] = (tuple(param.shape), torch.int8)
            layout[name + SCALE_SUFFIX] = ((param.shape[0],), torch.float32)
        else:
            layout[name] = (tuple(param.shape), checkpoint.dtype(stored_name(checkpoint, name)))

    def tensors() -> Iterator[torch.Tensor]:
        for name in dict(model.named_parameters()):
            tensor = read_shard_tensor(checkpoint, name, full_shapes[name], rank, num_shards)
            if name in int8_weights:
                yield from per_channel_int8(tensor)
            else:
                yield tensor

    return layout, tensors()


def _with_progress(tensors: Iterator[torch.Tensor], bar: tqdm, file_name: str) -> Iterator[torch.Tensor]:
    bar.set_postfix_str(file_name)
    for tensor in tensors:
        yield tensor
        bar.update(tensor.nbytes)
