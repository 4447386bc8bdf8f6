"""A step's blocks in one native call, where every block runs on bloomduo's kernels.

model.py's blocks make ~20 Python-level calls a layer (modules, kernel wrappers, views, the residual adds,
the LayerNorms): ~100 us a layer, ~2.5 ms of a bloom-560m rank's 14 ms int8 decode step, during which the
memory bus, which sets a decode step's time, sits idle. _kernels.c's `blocks` runs the same calls for all
layers in C: the same Linear and attention kernels on the same operands, the residual adds as torch's,
LayerNorm in float32 as torch's (its moments summed in another order, so a bf16 output may differ in the last
bit). The all-reduce is the ranks' shared memory, in C, while the peers keep pace, else the group's
(`all_reduce_sum`, called back from C), with its failures and timeouts.

It takes a step whose rows are one new token per sequence (decode), or whole bfloat16 prompts of one length,
when every block's Linears run on bloomduo's kernels at that row count (cpu_kernels.py's routes may send
some row counts to oneDNN); model.py's loop runs the rest (mixed steps, chunked prompts). Off with
BLOOMDUO_FUSED_BLOCKS=0.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from bloomduo.shard_worker import native
from bloomduo.shard_worker.distributed import ShardGroup, all_reduce_sum
from bloomduo.shard_worker.kv_cache import KVCache
from bloomduo.shard_worker.step_plan import StepPlan
from bloomduo.shard_worker.tensor_parallel import RowParallel

ENV = "BLOOMDUO_FUSED_BLOCKS"
_MAX_CACHED_ROW_COUNTS = 256


def _kernel(module: nn.Module, rows: int) -> native.LinearKernel | None:
    """The native kernel `module` (a Linear kind of cpu_kernels.py or quantize.py, maybe row-parallel) runs a
    call of `rows` rows on, or None."""
    inner = module.linear if isinstance(module, RowParallel) else module
    kernel_for = getattr(inner, "kernel_for", None)
    return None if kernel_for is None else kernel_for(rows)


class FusedBlocks:
    """Runs a model's blocks for the steps _kernels.c's `blocks` takes; build it with `build`."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, group: ShardGroup | None) -> None:
        self.blocks = list(model.h)
        self.dtype = dtype
        self.group = group
        self.hidden = model.config.hidden_size
        attention = self.blocks[0].self_attention
        self.heads, self.head_dim = attention.num_heads, attention.head_dim
        self.scale = attention.inv_norm_factor
        self.eps = self.blocks[0].input_layernorm.eps
        self.residual_from_normed = bool(self.blocks[0].residual_from_ln)
        self._records: dict[int, torch.Tensor | None] = {}  # row count -> every layer's LayerRecord
        self._query = torch.empty(1, self.heads, self.head_dim, dtype=dtype)  # what native's checks look at

    @classmethod
    def build(cls, model: nn.Module) -> FusedBlocks | None:
        """A FusedBlocks for `model` (a BloomShardModel), or None where its blocks cannot run in one call:
        the kernels were not built, the attention or LayerNorms are not on them (the hidden size not a
        multiple of native.NORM_LANES), or it is turned off."""
        weight = model.ln_f.weight
        if (
            os.environ.get(ENV, "1") == "0"
            or not native.available()
            or weight.device.type != "cpu"
            or not model.h
            or model.config.hidden_size % native.NORM_LANES
        ):
            return None
        groups = set()
        for block in model.h:
            norms = (block.input_layernorm, block.post_attention_layernorm)
            if not isinstance(block.mlp.gelu, nn.Identity) or any(
                type(norm) is not nn.LayerNorm or norm.weight.dtype != weight.dtype or norm.bias is None
                for norm in norms
            ):
                return None
            for module in (block.self_attention.dense, block.mlp.dense_4h_to_h):
                groups.add(module.group if isinstance(module, RowParallel) else None)
        if len(groups) != 1:
            return None
        fused = cls(model, weight.dtype, groups.pop())
        native_float32 = model.h[0].self_attention.native_float32
        return fused if native.attends(fused._query, fused._query, native_float32) else None

    def records(self, rows: int) -> torch.Tensor | None:
        """Every layer's LayerRecord (int64) for a call of `rows` rows, or None when a Linear would run off
        bloomduo's kernels at that count."""
        if rows in self._records:
            return self._records[rows]
        fields: list[int] = []
        for block in self.blocks:
            linears = (
                block.self_attention.query_key_value,
                block.self_attention.dense,
                block.mlp.dense_h_to_4h,
                block.mlp.dense_4h_to_h,
            )
            kernels = [_kernel(linear, rows) for linear in linears]
            if any(kernel is None for kernel in kernels):
                fields = []
                break
            norms = (block.input_layernorm, block.post_attention_layernorm)
            fields += [tensor.data_ptr() for norm in norms for tensor in (norm.weight, norm.bias)]
            for kernel in kernels:
                fields += kernel.record(self.dtype)
        if len(self._records) >= _MAX_CACHED_ROW_COUNTS:
            self._records.clear()
        self._records[rows] = torch.tensor(fields, dtype=torch.int64) if fields else None
        return self._records[rows]

    def __call__(
        self, x: torch.Tensor, plan: StepPlan, cache: KVCache, isa: int | None = None
    ) -> torch.Tensor | None:
        """The blocks' output for a step's rows x [rows, hidden] (x's dtype the model's), the new keys and
        values stored in `cache` (not committed); None when `plan` is not a step `blocks` takes. `isa`: the
        kernels' level (native.best_isa() by default)."""
        rows = x.shape[0]
        if plan.decode_only and plan.single_rows is None and plan.single_bias is not None:
            bias, kv_length, prompt_length = plan.single_bias, plan.kv_length, 0
            positions = plan.single_positions.to(torch.int64).contiguous()
            slots = None if plan.slots_match_rows else plan.single_slots.to(torch.int64).contiguous()
        elif plan.prompts_only and native.attends_prompts(self._query, plan.prompts[0].bias):
            (group,) = plan.prompts
            bias, kv_length, prompt_length = group.bias, group.length, group.length
            positions, slots = None, group.slot_ids
        else:
            return None
        records = self.records(rows)
        if records is None:
            return None
        x = x.clone(memory_format=torch.contiguous_format)  # updated in place
        local = self.heads * self.head_dim
        mlp_width = self.blocks[0].mlp.dense_h_to_4h.out_features
        normed, reduced = torch.empty_like(x), torch.empty_like(x)
        qkv = x.new_empty(rows, 3 * local)
        context = x.new_empty(rows, local)
        mlp = x.new_empty(rows, mlp_width)
        keys, values = cache.keys, cache.values
        bias = bias.contiguous()
        all_reduce = None if self.group is None else functools.partial(all_reduce_sum, reduced, self.group)
        shm = None if self.group is None else self.group.shm
        segment = shm.segment if shm is not None and shm.fits(reduced) else native.NO_SEGMENT
        native.blocks(
            records.data_ptr(),
            len(self.blocks),
            rows,
            self.hidden,
            x.data_ptr(),
            normed.data_ptr(),
            qkv.data_ptr(),
            context.data_ptr(),
            reduced.data_ptr(),
            mlp.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            keys.stride(0),
            keys.stride(1),
            keys.stride(2),
            kv_length,
            self.heads,
            self.head_dim,
            bias.data_ptr(),
            0 if slots is None else slots.data_ptr(),
            0 if positions is None else positions.data_ptr(),
            prompt_length,
            self.scale,
            self.eps,
            dtype=self.dtype,
            residual_from_normed=self.residual_from_normed,
            segment=segment,
            all_reduce=all_reduce,
            isa=isa,
        )
        return x
