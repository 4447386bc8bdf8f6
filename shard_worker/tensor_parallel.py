"""Tensor parallelism for BloomShardModel: how W ranks split BLOOM, and the one collective it needs.

Read this file to learn the sharding. model.py stays a plain single-device BLOOM; this file shrinks
each layer to one rank's share after the model is built (gpt-fast style) and wraps the two
row-parallel projections of every block in RowParallel, which all-reduces their output.

    parameter (in block h.<i>)             split               why
    -------------------------------------  ------------------  -----------------------------------------
    self_attention.query_key_value.w/b     COLUMN  (dim 0)     output laid out [n_head, 3, head_dim]: a
                                                               contiguous split gives whole heads (q,k,v)
    self_attention.dense.weight            ROW     (dim 1)     input = this rank's heads -> partial sum,
                                                               all-reduce(SUM) after
    self_attention.dense.bias              ONCE    (rank 0)    added once, not W times, to the sum
    mlp.dense_h_to_4h.weight/bias          COLUMN  (dim 0)     4h/W columns of the MLP
    mlp.dense_4h_to_h.weight               ROW     (dim 1)     partial sum, all-reduce(SUM) after
    mlp.dense_4h_to_h.bias                 ONCE    (rank 0)
    input/post_attention_layernorm, ln_f   REPLICATE
    lm_head.weight (= word_embeddings)     VOCAB   (dim 0)     rows [r*Vp/W, (r+1)*Vp/W) of the vocabulary
                                                               padded to Vp (a multiple of W); pad rows = 0

    ALiBi: slopes are computed for ALL n_head heads, then rank r keeps heads [r*n/W, (r+1)*n/W).
    (Slopes computed from the local head count are wrong: the classic bug.)

Two all-reduces per block; nothing else is communicated. LM head logits stay split by vocabulary
(each rank returns its slice; the gateway concatenates them and trims the padding).

Only this rank's slices are read from disk: `load_shard` builds the model on the meta device,
applies the rules above to its shapes (`shard_parameters`), reads each parameter's slice through
the checkpoint's sliced `read`, loads them with `assign=True`, and then wraps the ROW layers in
RowParallel (`add_all_reduces`; after loading, so that parameter names stay the checkpoint's).
`bloomduo shard-weights` cuts a checkpoint with the same functions ahead of time, into one file per
rank that `load_shard` then reads whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from bloomduo.core.bloom_config import BloomConfig
from bloomduo.shard_worker.distributed import ShardGroup, all_reduce_sum
from bloomduo.shard_worker.model import BloomShardModel, alibi_slopes
from bloomduo.shard_worker.quantize import SCALE_SUFFIX, linear_weights, quantize_linears

REPLICATE = "replicate"  # every rank holds the whole tensor
COLUMN = "column"  # split along dim 0 (output features): each rank computes its own outputs
ROW = "row"  # split along dim 1 (input features): partial results, all-reduce(SUM) after
ONCE = "once"  # bias of a ROW layer: kept on rank 0 only, so the sum adds it exactly once
VOCAB = "vocab"  # LM head: vocabulary rows, padded to a multiple of W with zero rows

RULES: dict[str, str] = {
    "input_layernorm.weight": REPLICATE,
    "input_layernorm.bias": REPLICATE,
    "self_attention.query_key_value.weight": COLUMN,
    "self_attention.query_key_value.bias": COLUMN,
    "self_attention.dense.weight": ROW,
    "self_attention.dense.bias": ONCE,
    "post_attention_layernorm.weight": REPLICATE,
    "post_attention_layernorm.bias": REPLICATE,
    "mlp.dense_h_to_4h.weight": COLUMN,
    "mlp.dense_h_to_4h.bias": COLUMN,
    "mlp.dense_4h_to_h.weight": ROW,
    "mlp.dense_4h_to_h.bias": ONCE,
    "ln_f.weight": REPLICATE,
    "ln_f.bias": REPLICATE,
    "lm_head.weight": VOCAB,
}


class VocabRange(NamedTuple):
    start: int  # first vocabulary row of this rank
    end: int  # one past its last row (may exceed vocab_size on the last rank: padding)
    padded_vocab_size: int  # vocab_size rounded up to a multiple of world_size


@dataclass(frozen=True)
class ShardLayout:
    """Which share of the model a rank holds (see shard_layout)."""

    rank: int
    world_size: int
    vocab: VocabRange  # its rows of the LM head


class RowParallel(nn.Module):
    """A ROW-split Linear and the all-reduce(SUM) that turns the ranks' partial outputs into its output."""

    def __init__(self, linear: nn.Module, group: ShardGroup | None) -> None:
        super().__init__()
        self.linear = linear
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(self.linear(x), self.group)


def vocab_range(vocab_size: int, rank: int, world_size: int) -> VocabRange:
    """This rank's rows [start, end) of the LM head, in the vocabulary padded to a multiple of W."""
    padded = -(-vocab_size // world_size) * world_size
    per_rank = padded // world_size
    return VocabRange(rank * per_rank, (rank + 1) * per_rank, padded)


def check_world_size(config: BloomConfig, world_size: int) -> None:
    if world_size < 1 or config.n_head % world_size:
        raise ValueError(f"world_size {world_size} must divide n_head {config.n_head}")


def shard_layout(config: BloomConfig, rank: int, world_size: int) -> ShardLayout:
    """Rank `rank`'s share of a model of `config` split `world_size` ways; raises for an impossible one."""
    check_world_size(config, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    return ShardLayout(rank, world_size, vocab_range(config.vocab_size, rank, world_size))


def rule_for(name: str) -> str:
    """The rule of a parameter: "h.3.mlp.dense_h_to_4h.bias" -> RULES["mlp.dense_h_to_4h.bias"]."""
    key = name.split(".", 2)[2] if name.startswith("h.") else name
    try:
        return RULES[key]
    except KeyError:
        raise KeyError(f"no tensor-parallel rule for parameter {name!r}") from None


def shard_slice(name: str, full_shape: tuple[int, ...], rank: int, world_size: int):
    """(rule, dim, start, stop) of this rank's part of a parameter, or None when it holds none.

    dim is None for replicated tensors. For VOCAB, stop may pass the real vocabulary (padding).
    """
    rule = rule_for(name)
    if rule == REPLICATE:
        return rule, None, 0, None
    if rule == ONCE:
        return (rule, None, 0, None) if rank == 0 else None
    if rule == VOCAB:
        start, end, _ = vocab_range(full_shape[0], rank, world_size)
        return rule, 0, start, end
    dim = 0 if rule == COLUMN else 1
    size = full_shape[dim] // world_size
    return rule, dim, rank * size, (rank + 1) * size


def shard_tensor(name: str, tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor | None:
    """This rank's part of a full parameter (works on meta tensors too); None when it holds none."""
    part = shard_slice(name, tuple(tensor.shape), rank, world_size)
    if part is None:
        return None
    rule, dim, start, stop = part
    if dim is None:
        return tensor
    if tensor.is_meta:  # a shape only; meta narrow and clone would import sympy & co (40 MiB per worker)
        shape = list(tensor.shape)
        shape[dim] = stop - start
        return torch.empty(shape, dtype=tensor.dtype, device="meta")
    if rule == VOCAB:
        rows = tensor.new_zeros((stop - start, *tensor.shape[1:]))
        real = max(0, min(stop, tensor.shape[0]) - start)
        rows[:real] = tensor[start : start + real]
        return rows
    return tensor.narrow(dim, start, stop - start).clone()


def shard_parameters(model: BloomShardModel, rank: int, world_size: int) -> BloomShardModel:
    """Shrink a full model's parameters and ALiBi slopes to rank `rank`'s share, in place; their names
    stay those of the checkpoint.

    Works on a model built on the meta device (shapes only, then load the slices) as well as on a
    loaded full model (its tensors are sliced).
    """
    config = model.config
    shard_layout(config, rank, world_size)
    for name, param in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        part = shard_tensor(name, param.detach(), rank, world_size)
        setattr(module, attr, None if part is None else nn.Parameter(part, requires_grad=False))
        if isinstance(module, nn.Linear) and part is not None and attr == "weight":
            module.out_features, module.in_features = part.shape

    heads = config.n_head // world_size
    own_slopes = alibi_slopes(config.n_head)[rank * heads : (rank + 1) * heads]  # ALL heads, then slice
    for block in model.h:
        attention = block.self_attention
        device = attention.alibi_slopes.device
        attention.num_heads = heads
        attention.alibi_slopes = own_slopes.to("cpu" if device.type == "meta" else device)
    return model


def add_all_reduces(model: BloomShardModel, group: ShardGroup | None) -> BloomShardModel:
    """Wrap the ROW layers of every block in RowParallel, in place: their outputs are partial sums."""
    for block in model.h:
        block.self_attention.dense = RowParallel(block.self_attention.dense, group)
        block.mlp.dense_4h_to_h = RowParallel(block.mlp.dense_4h_to_h, group)
    return model


def load_shard(
    checkpoint,
    rank: int,
    world_size: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    group: ShardGroup | None = None,
    quantize: str = "none",
) -> BloomShardModel:
    """Build rank `rank`'s BloomShardModel reading only its slices of `checkpoint`.

    `checkpoint` is a bloomduo.core.checkpoint.Checkpoint (or a model directory to open as one): a full
    checkpoint, or one cut for `world_size` ranks by `bloomduo shard-weights`, whose rank file is read
    whole. Weights are cast to `dtype` on `device`; the ALiBi slopes stay float32. `quantize` (quantize.py)
    gives the Linears int8 weights: quantized from the loaded ones, or read as they are from a cut made with
    --quantize int8. `shard_layout` tells which share it holds. Call it on every rank: with world_size > 1
    the forward pass all-reduces over `group` (None: the default process group).
    """
    if isinstance(checkpoint, str | os.PathLike):
        from bloomduo.core.checkpoint import Checkpoint

        checkpoint = Checkpoint(checkpoint)
    device = torch.device(device)
    model, full_shapes = build_meta_shard(checkpoint.config, rank, world_size)

    state, stored_int8 = {}, {}
    if checkpoint.num_shards is None:
        for name in dict(model.named_parameters()):
            tensor = read_shard_tensor(checkpoint, name, full_shapes[name], rank, world_size)
            state[name] = tensor.to(device=device, dtype=dtype)
    else:
        part = checkpoint.rank_part(rank, world_size)  # raises when cut for another world size
        int8_weights = linear_weights(model) if part.quantized else {}
        for name, param in model.named_parameters():
            _check_shape(part, name, tuple(param.shape))
            if name in int8_weights:  # the Linear is replaced by an Int8Linear below: hold no float copy
                scale = part.read(name + SCALE_SUFFIX).to(device)
                stored_int8[int8_weights[name]] = (part.read(name).to(device), scale)
                state[name] = torch.empty(param.shape, dtype=dtype, device="meta")
            else:
                state[name] = part.read(name).to(device=device, dtype=dtype)

    model.load_state_dict(state, strict=True, assign=True)
    quantize_linears(model, quantize, stored_int8)
    model.to(device)  # the ALiBi slopes: still float32, like HF
    if world_size > 1:  # after loading: the state dict's names are the checkpoint's, without RowParallel
        add_all_reduces(model, group)
    return model.eval().requires_grad_(False)


def build_meta_shard(
    config: BloomConfig, rank: int, world_size: int
) -> tuple[BloomShardModel, dict[str, tuple[int, ...]]]:
    """Rank `rank`'s model on the meta device (its parameters have the rank's shapes and the checkpoint's
    names, no data, no all-reduces), and the full, unsharded shape of every parameter by name."""
    check_world_size(config, world_size)
    with torch.device("meta"):
        model = BloomShardModel(config)
    full_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    shard_parameters(model, rank, world_size)
    return model, full_shapes


def stored_name(checkpoint, name: str) -> str:
    """The checkpoint tensor behind parameter `name`: BLOOM's LM head is usually the tied word embeddings."""
    return checkpoint.lm_head_name() if name == "lm_head.weight" else name


def read_shard_tensor(
    checkpoint, name: str, full_shape: tuple[int, ...], rank: int, world_size: int
) -> torch.Tensor:
    """Rank `rank`'s part of parameter `name` read from a full checkpoint, in the stored dtype.

    Only that part is read. A VOCAB part gets zero rows past the real vocabulary (the padding).
    """
    stored = stored_name(checkpoint, name)
    _check_shape(checkpoint, stored, full_shape)
    rule, dim, start, stop = shard_slice(name, full_shape, rank, world_size)
    if rule != VOCAB:
        return checkpoint.read(stored, dim, start, stop)
    vocab = full_shape[0]
    rows = checkpoint.read(stored, 0, min(start, vocab), min(stop, vocab))
    padding = stop - start - rows.shape[0]
    return torch.cat([rows, rows.new_zeros((padding, *full_shape[1:]))]) if padding else rows


def _check_shape(checkpoint, stored: str, expected: tuple[int, ...]) -> None:
    if tuple(checkpoint.shape(stored)) != expected:
        raise ValueError(
            f"checkpoint tensor {stored!r} has shape {tuple(checkpoint.shape(stored))}, "
            f"expected {expected} from the config"
        )
