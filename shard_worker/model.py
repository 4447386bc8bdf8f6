"""BLOOM's transformer blocks, final LayerNorm and LM head, in plain PyTorch, for ragged batches.

The gateway owns the token embeddings (word_embeddings + word_embeddings_layernorm); this model
starts from their output. It knows nothing about ranks: tensor_parallel.py shrinks its layers to
one rank's share after it is built (gpt-fast style), so `num_heads` below is "the heads this module
computes", which is all of them when the model is not sharded.

A step's input is "flat tokens": hidden_states [total_tokens, hidden] made of one chunk per
sequence. Linear layers see all rows at once; attention runs per chunk against that sequence's
KV cache. The arithmetic follows transformers' modeling_bloom.py (ALiBi added to the scaled scores,
softmax in float32, tanh GELU), so float32 logits match BloomForCausalLM to float32 rounding.
Attention goes through the fused scaled_dot_product_attention: HF's bf16 path rounds the scores to
bf16 and copies the strided KV views on every call, which cost a CPU worker a fifth of its step. bf16 CPU
workers with bloomduo's kernels (native.py) attend in place in the cache instead, decode rows and whole
prompts, with the roundings of _one_query_attention below.

    block(x) = x' + MLP(LN2(x')),   x' = x + Attention(LN1(x))      (pre-LN; see residual_from_ln)
    Attention: scores = alibi_slope[h] * key_position + q.k / sqrt(head_dim), causal, softmax
    MLP:       dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bloomduo.core.bloom_config import BloomConfig
from bloomduo.shard_worker import native
from bloomduo.shard_worker.kv_cache import KVCache
from bloomduo.shard_worker.step_plan import Chunk, PromptGroup, StepPlan, plan_step


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slope of each of the model's `num_heads` heads (float32), as in the paper and HF.

    With p the largest power of two <= num_heads: slopes base^1..base^p, base = 2^(-8/p); the
    remaining heads take the odd powers 1, 3, 5, ... of 2^(-8/(2p)). Always call this with the
    model's TOTAL head count; a shard then takes its own slice.

    Always on the CPU, also inside `with torch.device("meta")`: meta pow runs a Python decomposition
    whose imports (dynamo, sympy) cost a worker 70 MiB of resident memory.
    """
    cpu = torch.device("cpu")
    p = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(p) - 3))), dtype=torch.float32, device=cpu)
    slopes = torch.pow(base, torch.arange(1, 1 + p, dtype=torch.int32, device=cpu))
    if p != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * p) - 3))), dtype=torch.float32, device=cpu)
        extra = min(p, num_heads - p)
        powers = torch.arange(1, 1 + 2 * extra, 2, dtype=torch.int32, device=cpu)
        slopes = torch.cat([slopes, torch.pow(extra_base, powers)])
    return slopes


class Attention(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.n_head  # heads computed here (a shard: its own heads only)
        self.head_dim = hidden // config.n_head
        if self.head_dim * config.n_head != hidden:
            raise ValueError(f"hidden_size {hidden} is not divisible by n_head {config.n_head}")
        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)
        # Output laid out per head: [num_heads, 3 (q, k, v), head_dim].
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)
        # float32, like HF; kept out of the state dict (it is derived from n_head).
        self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)
        # float32 decode through bloomduo's kernel too (its sums run in another order than torch's): off for
        # workers held to transformers' float32 numbers, on for int8 ones (quantize.py).
        self.native_float32 = False

    def forward(self, x: torch.Tensor, plan: StepPlan, cache: KVCache, layer: int) -> torch.Tensor:
        total = x.shape[0]
        qkv = self.query_key_value(x).view(total, self.num_heads, 3, self.head_dim)
        # [tokens, heads, head_dim] views of the fused projection
        query, key, value = qkv.unbind(2)
        if plan.decode_only:
            context = self._attend_singles(plan, query, key, value, cache, layer)
        elif plan.prompts_only:
            (group,) = plan.prompts
            context = self._attend_prompts(group, query, key, value, cache, layer)
        else:
            context = torch.empty(total, self.num_heads, self.head_dim, dtype=x.dtype, device=x.device)
            if plan.single_bias is not None:
                rows = plan.single_rows
                context[rows] = self._attend_singles(plan, query[rows], key[rows], value[rows], cache, layer)
            for group in plan.prompts:
                rows = group.rows
                context[rows] = self._attend_prompts(group, query[rows], key[rows], value[rows], cache, layer)
            for chunk, rows, bias in plan.multi:
                q, k, v = (t[rows].transpose(0, 1) for t in (query, key, value))
                context[rows] = self._attend_chunk(chunk, q, k, v, bias, cache, layer)
        return self.dense(context.reshape(total, self.num_heads * self.head_dim))

    def _attention(self, q, keys, values, bias) -> torch.Tensor:
        """softmax(q.k / sqrt(head_dim) + bias) . v, fused (scores and softmax in float32 on every device)."""
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=self.inv_norm_factor)

    def _attend_singles(self, plan: StepPlan, q, k, v, cache: KVCache, layer: int) -> torch.Tensor:
        """One new token per sequence ([B, heads, d]) against each one's cache, in one batched call."""
        if native.attends(q, plan.single_bias, self.native_float32):  # the same roundings, cache in place
            keys, values = cache.token_views(layer, plan.num_slots, plan.kv_length)
            slots = None if plan.slots_match_rows else plan.single_slots
            new_kv = (k, v, plan.single_positions)  # stored by the kernel as it goes
            return native.one_query_attention(
                q, keys, values, plan.single_bias, self.inv_norm_factor, slots, new_kv
            )
        keys, values = cache.write_tokens(
            layer, plan.single_slots, plan.single_positions, k, v, plan.num_slots, plan.kv_length
        )
        attention = self._attention if q.device.type != "cpu" else self._one_query_attention
        if plan.slots_match_rows:
            return attention(q[:, :, None], keys, values, plan.single_bias)[:, :, 0]
        queries = q.new_zeros(plan.num_slots, self.num_heads, 1, self.head_dim)
        queries[plan.single_slots, :, 0] = q
        out = attention(queries, keys, values, plan.single_bias)  # [num_slots, heads, 1, d]
        return out[plan.single_slots, :, 0]

    def _one_query_attention(self, q, keys, values, bias) -> torch.Tensor:
        """What _attention computes for one query row per slot, as BLOOM's reference writes it: scores,
        a float32 softmax, the weighted values. On the CPU, SDPA's fused kernel costs about 5 us per (slot,
        head) for a single row: 1.3 ms against 0.23 ms here for 16 slots x 16 heads x 48 keys, 5.6x at
        0.55 ms of a 560m decode step's 1.5 ms per layer (measured, one thread). Scores of bfloat16 inputs
        are rounded to bfloat16 before the softmax, as transformers' own bfloat16 does."""
        scores = torch.matmul(q, keys.transpose(-1, -2)).float() * self.inv_norm_factor + bias.float()
        return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)

    def _attend_prompts(self, group: PromptGroup, q, k, v, cache: KVCache, layer: int) -> torch.Tensor:
        """Whole prompts' queries, keys and values [prompts * length, heads, d], each prompt attending
        to its own tokens only; returns [prompts * length, heads, d]."""
        if native.attends_prompts(q, group.bias):  # _one_query_attention's roundings row by row, storing too
            keys, values = cache.token_views(layer, cache.num_slots, group.length)
            scale = self.inv_norm_factor
            return native.prompt_attention(q, keys, values, group.bias, scale, group.slot_ids, (k, v))
        shape = (-1, group.length, self.num_heads, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # [prompts, heads, length, d]
        cache.write_prompts(layer, group.slots, k, v)
        out = self._attention(q, k, v, group.bias[None])
        return out.transpose(1, 2).reshape(-1, self.num_heads, self.head_dim)

    def _attend_chunk(self, chunk: Chunk, q, k, v, bias, cache: KVCache, layer: int) -> torch.Tensor:
        """One sequence's queries [heads, n, d] against its cached and new keys; returns [n, heads, d]."""
        keys, values = cache.write(layer, chunk.sequence_id, chunk.start_position, k, v)
        # 4-d [1, heads, ...]: the fused CPU kernel takes only batched inputs (3-d falls back to unfused)
        out = self._attention(q[None], keys[None], values[None], bias[None])
        return out[0].transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in one fused op. BLOOM writes sqrt(2/pi) as
        # 0.79788456, 1e-9 from torch's constant: below float32's resolution. Unfused, the eight
        # elementwise passes cost a CPU worker a quarter of a prefill. A module, so that
        # weight_formats.py can fold it into dense_h_to_4h.
        self.gelu = nn.GELU(approximate="tanh")
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.gelu(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attention = Attention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = MLP(config)
        # BLOOM-7B1 uses False: the residual is the block input, not the LayerNorm output.
        self.residual_from_ln = config.apply_residual_connection_post_layernorm

    def forward(self, x: torch.Tensor, plan: StepPlan, cache: KVCache, layer: int) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = (h if self.residual_from_ln else x) + self.self_attention(h, plan, cache, layer)
        h = self.post_attention_layernorm(x)
        return (h if self.residual_from_ln else x) + self.mlp(h)


class BloomShardModel(nn.Module):
    """Blocks + ln_f + LM head (over `lm_head.out_features` vocabulary rows: all, or a shard's slice)."""

    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.config = config
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        # Tied to word_embeddings in BLOOM; stored here as plain rows of the vocabulary.
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Steps' blocks in one native call (fused_blocks.py) or CUDA graph (cuda_graphs.py) where they can,
        # set once weights are laid out.
        self.fused_blocks: Callable[[torch.Tensor, StepPlan, KVCache], torch.Tensor | None] | None = None

    @property
    def num_local_heads(self) -> int:
        return self.h[0].self_attention.num_heads

    @property
    def native_float32(self) -> bool:
        """Whether float32 decode runs bloomduo's kernels (quantize.py turns it on for int8 workers)."""
        return self.h[0].self_attention.native_float32

    def new_kv_cache(self, *, initial_capacity: int = 128, initial_slots: int = 4) -> KVCache:
        """An empty cache shaped for this model's (local) heads, on its device and in its dtype."""
        weight = self.ln_f.weight  # the LM head's may be int8 (quantize.py)
        return KVCache(
            len(self.h),
            self.num_local_heads,
            self.config.hidden_size // self.config.n_head,
            device=weight.device,
            dtype=weight.dtype,
            initial_capacity=initial_capacity,
            initial_slots=initial_slots,
        )

    @torch.inference_mode()
    def forward(self, hidden_states: torch.Tensor, chunks: list[Chunk], cache: KVCache) -> torch.Tensor:
        """hidden_states [total_tokens, hidden] -> logits [len(chunks), vocab rows] of each chunk's last row.

        Raises CachePositionError (nothing is changed) when a chunk does not continue its sequence.
        """
        return self.last_row_logits(self.blocks(hidden_states, chunks, cache), chunks)

    def blocks(self, hidden_states: torch.Tensor, chunks: list[Chunk], cache: KVCache) -> torch.Tensor:
        """hidden_states [total_tokens, hidden] -> the last block's output for every row (same shape),
        the chunks' keys and values added to `cache`. Raises CachePositionError as forward does."""
        chunks = list(chunks)
        sizes = [c.num_tokens for c in chunks]
        if not chunks or sum(sizes) != hidden_states.shape[0]:
            raise ValueError(
                f"the chunks cover {sum(sizes)} tokens but hidden_states has {hidden_states.shape[0]} rows"
            )
        cache.prepare(chunks)
        weight = self.ln_f.weight
        x = hidden_states.to(device=weight.device, dtype=weight.dtype)
        plan = plan_step(chunks, cache, self.h[0].self_attention.alibi_slopes, x.dtype)
        fused = None if self.fused_blocks is None else self.fused_blocks(x, plan, cache)
        if fused is not None:
            x = fused
        else:
            for layer, block in enumerate(self.h):
                x = block(x, plan, cache, layer)
        cache.commit(chunks)
        return x

    def last_row_logits(self, x: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor:
        """The logits of each chunk's last row of `blocks`' output x: [len(chunks), vocab rows]."""
        last_rows = torch.tensor([c.num_tokens for c in chunks], device=x.device).cumsum(0) - 1
        return self.logits(x[last_rows])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ln_f, then the tied LM head over this model's vocabulary rows: [rows, hidden] -> [rows, vocab]."""
        return self.lm_head(self.ln_f(x))
