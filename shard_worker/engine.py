"""One shard worker's model step, as a plain object: hidden states in, this rank's logits slice out."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bloomduo.core.checkpoint import Checkpoint
from bloomduo.core.dtypes import DTYPE_CHOICES, FLOAT_DTYPES, to_torch
from bloomduo.core.logprobs import NO_PENALTY, RepetitionPenalty, Scoring, SliceScores, score_slice, summarize
from bloomduo.core.logs import get_logger
from bloomduo.shard_worker import native
from bloomduo.shard_worker.config import ShardOptions
from bloomduo.shard_worker.cuda_graphs import DecodeGraphs
from bloomduo.shard_worker.distributed import backend_for, init_distributed
from bloomduo.shard_worker.fused_blocks import FusedBlocks
from bloomduo.shard_worker.host_memory import (
    bound_onednn_caches,
    gather,
    host_tensors,
    return_freed_memory,
    use_huge_pages,
)
from bloomduo.shard_worker.kv_cache import KVCache
from bloomduo.shard_worker.model import BloomShardModel
from bloomduo.shard_worker.quantize import compile_kernels, weight_bytes
from bloomduo.shard_worker.quantize import describe as describe_int8
from bloomduo.shard_worker.step_plan import Chunk
from bloomduo.shard_worker.tensor_parallel import ShardLayout, load_shard, shard_layout
from bloomduo.shard_worker.weight_formats import format_weights

log = get_logger(__name__)


def resolve_dtype(
    name: str, checkpoint_dtype: torch.dtype | None, device: torch.device, quantize: str = "none"
) -> torch.dtype:
    """ "auto" keeps the checkpoint's dtype, except on npu, where 310P chips have no bfloat16, and with
    --quantize int8-dynamic through fbgemm (no native kernels here), whose GEMMs take float32 activations
    anyway: in float32 between them it skips two conversions per Linear and bfloat16 elementwise work
    (measured in-process on bloom-560m, one thread, float32 against bfloat16 activations: a 32-token prefill
    145 against 228 ms and a decode step 32 against 55 ms where bfloat16 is emulated), at the cost of a KV
    cache twice as big. bloomduo's VNNI kernel reads bfloat16 rows as fast as float32 ones, in both its
    forms: one rank's bloom-560m step in bfloat16 against float32 on the AVX2 class, 14.4-15.4 against
    14.6-14.8 ms at one row, 62 against 64 ms at 16, a 32-token prefill 63-65 against 63-66 ms."""
    if name in FLOAT_DTYPES:
        return to_torch(name)
    if name != "auto":
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, not {name!r}")
    if device.type == "npu":
        return torch.float16
    if quantize == "int8-dynamic" and not native.runs_vnni():
        return torch.float32
    return checkpoint_dtype or torch.float32


def checkpoint_dtype(checkpoint: Checkpoint) -> torch.dtype | None:
    stored = checkpoint.config.dtype
    return to_torch(stored) if stored in FLOAT_DTYPES else None


# Scored rows go through the LM head this many at a time, so a long prompt's scores never hold more than
# this many rows of vocabulary logits (at BLOOM-7B1, W = 2: 256 x 125440 float32, 128 MB).
SCORE_BLOCK_ROWS = 256


@dataclass(frozen=True)
class StepOutput:
    logits: torch.Tensor  # rows of the sequences that asked for them
    best_logit: list[float] = field(default_factory=list)  # the others', in order
    best_token: list[int] = field(default_factory=list)
    logsumexp: list[float] = field(default_factory=list)
    # Scored rows (Scoring), chunks in order, as StepResponse's fields of the same names say.
    scored_logsumexp: list[float] = field(default_factory=list)
    next_token_logit: list[float] = field(default_factory=list)
    top_logit: list[float] = field(default_factory=list)
    top_token: list[int] = field(default_factory=list)


class ShardEngine:
    """Holds one rank's slice of the model and its KV caches; steps run strictly in arrival order."""

    def __init__(
        self,
        model: BloomShardModel,
        layout: ShardLayout,
        *,
        device: torch.device,
        dtype: torch.dtype,
        model_name: str,
        kv_cache_slots: int,
        group_id: str = "",
        kernels: str = "eager",
    ) -> None:
        self.model = model
        self.layout = layout
        self.cache: KVCache = model.new_kv_cache(initial_slots=kv_cache_slots)
        self.device = device
        self.dtype = dtype
        self.model_name = model_name
        self.vocab_start, self.vocab_end, self.padded_vocab_size = layout.vocab
        self.parameter_bytes = weight_bytes(model)
        self.backend = backend_for(device)
        self.local_heads = model.num_local_heads
        self.real_vocab_end = min(self.vocab_end, model.config.vocab_size)
        self.group_id = group_id
        self.kernels = kernels  # the Linear kernels format_weights chose, in words
        # as its attention: int8 workers' float32 logits are summarized natively too
        self.native_float32 = model.native_float32

    @classmethod
    def load(cls, options: ShardOptions) -> ShardEngine:
        device = torch.device(options.device)
        started = time.perf_counter()
        if device.type == "cpu":
            # On this (the step) thread and the threads it starts: denormal intermediates, e.g. tanh
            # GELU of large activations, take microcode assists that made a bf16 GELU pass 3-4x slower.
            # Flushing them to zero moves results by less than 1e-38.
            torch.set_flush_denormal(True)
            bound_onednn_caches()
        elif device.type == "cuda":
            # cuDNN's attention builds a graph for each shape it meets (hundreds of ms, as others measured),
            # and a decode step's key length grows every step; on an H200 73 % of a 16-stream step sat in
            # the one SDPA call, which takes 22-41 us at a repeated shape. Suspected, not yet measured with
            # it off (scripts/gpu_attention_speed.py does): the memory-efficient kernel takes the ALiBi mask.
            torch.backends.cuda.enable_cudnn_sdp(False)
        checkpoint = Checkpoint(options.model_dir)
        dtype = resolve_dtype(options.dtype, checkpoint_dtype(checkpoint), device, options.quantize)
        layout = shard_layout(checkpoint.config, options.rank, options.world_size)
        log.info(
            "shard_joining_group",
            rank=options.rank,
            world_size=options.world_size,
            backend=backend_for(device),
            init_method=options.dist_init,
        )
        group = init_distributed(
            options.rank, options.world_size, options.dist_init, device, timeout_s=options.dist_timeout_s
        )
        # Rank 0 names the group; the gateway drives workers only when all report the same name, so a
        # survivor of a failed group is never paired with a restarted peer.
        group_id = [uuid.uuid4().hex if options.rank == 0 else ""]
        if options.world_size > 1:
            dist.broadcast_object_list(group_id, src=0, group=group.process_group)
        log.info("shard_loading", model=str(options.model_dir), device=str(device), dtype=str(dtype))
        model = load_shard(
            checkpoint,
            options.rank,
            options.world_size,
            device=device,
            dtype=dtype,
            group=group,
            quantize=options.quantize,
        )
        # Every CPU rank enters format_weights' agreement on kernels, even with no plain Linear left.
        kernels = format_weights(model, device, dtype, options.cpu_kernels, group)
        kernels = describe_int8(model) or kernels
        compile_kernels(model)
        if device.type == "cpu":
            gather(host_tensors(model))
            native.rebase_kernels(model)
        model.fused_blocks = FusedBlocks.build(model)
        if model.fused_blocks is not None:
            kernels += ", blocks in one native call"
        elif graphs := DecodeGraphs.build(model, options.world_size):
            model.fused_blocks = graphs
            kernels += ", decode steps as CUDA graphs"
        return_freed_memory()
        huge_page_bytes = use_huge_pages(host_tensors(model)) if device.type == "cpu" else 0
        engine = cls(
            model,
            layout,
            device=device,
            dtype=dtype,
            model_name=Path(options.model_dir).name,
            kv_cache_slots=options.kv_cache_slots,
            group_id=group_id[0],
            kernels=kernels,
        )
        log.info(
            "shard_loaded",
            seconds=round(time.perf_counter() - started, 3),
            parameter_bytes=engine.parameter_bytes,
            vocab_start=engine.vocab_start,
            vocab_end=engine.vocab_end,
            kernels=kernels,
            huge_page_bytes=huge_page_bytes,
        )
        return engine

    @torch.inference_mode()
    def step(
        self,
        hidden_states: torch.Tensor,
        chunks: list[Chunk],
        free_ids: list[int],
        full_logits: list[bool] | None = None,
        scoring: list[Scoring] | None = None,
        penalties: list[RepetitionPenalty] | None = None,
    ) -> StepOutput:
        """Free finished sequences, run the model on the step's chunks, and return each sequence's
        logits row (full_logits[i], the default) or just its best token and log-sum-exp after its
        repetition penalty (penalties[i], default none), and the scores of the rows scoring[i] asks of
        chunk i (see Scoring)."""
        for sequence_id in free_ids:
            self.cache.free(sequence_id)
        if not chunks:
            self.cache.shrink_to_fit()  # a step with chunks does it as it makes room for them
            return StepOutput(torch.empty((0, self.vocab_end - self.vocab_start), dtype=self.dtype))
        x = self.model.blocks(hidden_states, chunks, self.cache)
        logits = self.model.last_row_logits(x, chunks)
        scores = self._score(x, chunks, scoring) if scoring else {}
        if not full_logits or all(full_logits):
            return StepOutput(logits.to("cpu"), **scores)
        wanted = torch.tensor(full_logits, dtype=torch.bool, device=logits.device)
        # Summaries cover the real vocabulary only: padding rows must never win or add mass.
        real = slice(0, self.real_vocab_end - self.vocab_start)
        rows = logits[:, real] if not any(full_logits) else logits[~wanted, real]
        native_rows = native.summarizes(rows, self.native_float32)
        best, index, logsumexp = (native.summarize if native_rows else summarize)(rows)
        penalties = penalties or [NO_PENALTY] * len(chunks)
        summarized = (penalty for penalty, full in zip(penalties, full_logits, strict=True) if not full)
        for row, penalty in enumerate(summarized):
            if penalty.penalty != 1.0:
                best[row], index[row], logsumexp[row] = self._penalized_summary(rows[row], penalty)
        return StepOutput(
            logits[wanted].to("cpu"),
            best_logit=best.tolist(),
            best_token=(index + self.vocab_start).tolist(),
            logsumexp=logsumexp.tolist(),
            **scores,
        )

    def _penalized_summary(self, row: torch.Tensor, penalty: RepetitionPenalty) -> tuple[float, int, float]:
        """A greedy row's summary after its repetition penalty, on its float32 logits as the gateway's
        sampler would compute it on the whole row (only this slice's penalized tokens are here)."""
        columns = torch.tensor(penalty.token_ids, dtype=torch.long) - self.vocab_start
        held = columns[(columns >= 0) & (columns < row.numel())]
        best, index, logsumexp = summarize(penalty.apply(row.float(), held)[None])
        return float(best[0]), int(index[0]), float(logsumexp[0])

    def _score(self, x: torch.Tensor, chunks: list[Chunk], scoring: list[Scoring]) -> dict[str, list]:
        """StepOutput's scored_* fields for the rows `scoring` asks of each chunk, from the last block's
        output x of every row: only those rows go through ln_f and this slice's LM head, a block at a time."""
        real_columns = self.real_vocab_end - self.vocab_start
        rows: list[int] = []
        next_columns: list[int] = []  # -1: no next token, or one outside this slice
        has_next: list[bool] = []
        top_n: list[int] = []
        offset = 0
        for chunk, asked in zip(chunks, scoring, strict=True):
            for row in asked.rows(chunk.num_tokens):
                targeted = row < len(asked.next_token_ids)
                column = asked.next_token_ids[row] - self.vocab_start if targeted else -1
                rows.append(offset + row)
                next_columns.append(column if 0 <= column < real_columns else -1)
                has_next.append(targeted)
                top_n.append(asked.top_n)
            offset += chunk.num_tokens
        if not rows:
            return {}
        k = max(top_n)
        device = x.device
        row_index = torch.tensor(rows, device=device)
        next_index = torch.tensor(next_columns, device=device)
        blocks = [
            score_slice(
                self.model.logits(x[row_index[start : start + SCORE_BLOCK_ROWS]])[:, :real_columns],
                next_index[start : start + SCORE_BLOCK_ROWS],
                k,
            )
            for start in range(0, len(rows), SCORE_BLOCK_ROWS)
        ]
        scores = SliceScores(*(torch.cat(parts).cpu() for parts in zip(*blocks, strict=True)))
        # A slice with fewer real rows than k pads its top-n, so every rank sends k per row.
        missing = k - scores.top_logit.shape[1]
        top_logit = F.pad(scores.top_logit, (0, missing), value=float("-inf"))
        top_token = F.pad(scores.top_index + self.vocab_start, (0, missing), value=0)
        taken = torch.arange(k)[None, :] < torch.tensor(top_n)[:, None]  # each row's own top_n
        return {
            "scored_logsumexp": scores.logsumexp.tolist(),
            "next_token_logit": scores.next_logit[torch.tensor(has_next, dtype=torch.bool)].tolist(),
            "top_logit": top_logit[taken].tolist(),
            "top_token": top_token[taken].tolist(),
        }

    def reset(self) -> None:
        """Drop every KV cache, e.g. when the gateway that owned them went away."""
        self.cache.clear()
        self.cache.shrink_to_fit()
