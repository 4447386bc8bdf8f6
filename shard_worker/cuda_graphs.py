"""Decode steps on CUDA replayed as CUDA graphs: every block's launches in one call, not ~15 a layer.

An H200 ran a bloom-7b1 float16 decode step in 16.2 ms against a 3.3 ms floor (its weights' bytes over the
HBM bandwidth): 30 layers of kernels launched one at a time from Python, each a few microseconds of GPU work
behind tens of microseconds of host time. A CUDA graph records a step's launches once and replays them whole.

A graph holds fixed shapes and addresses, so a step is padded to a bucket: its rows to one of ROW_BUCKETS, the
keys it reads to a power of two (at least MIN_KEYS, at most the cache's capacity). The padding rows use the
free slots after the step's own: each stores its key at position 0 of its slot, which a sequence that takes
the slot later overwrites before reading, and sees that key alone. Padded keys are masked as plan_step masks
every key past a slot's position: their weight is exactly 0.

A bucket's graph is recorded when a step first needs it, and all are dropped when the cache reallocates (it
grew), since they hold its addresses. Taken by decode steps whose sequences sit in slots 0..rows-1 (the usual
batch, `slots_match_rows`) with the padding's slots free; every other step runs model.py's loop. One rank
only: more would capture NCCL's all-reduces in the graph, untested here. Off with BLOOMDUO_CUDA_GRAPHS=0.
"""

from __future__ import annotations

import os

import torch

from bloomduo.core.logs import get_logger
from bloomduo.shard_worker.kv_cache import KVCache
from bloomduo.shard_worker.model import BloomShardModel
from bloomduo.shard_worker.step_plan import StepPlan, one_query_bias

log = get_logger(__name__)

ENV = "BLOOMDUO_CUDA_GRAPHS"
ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
MIN_KEYS = 128


def key_bucket(kv_length: int, capacity: int) -> int:
    """Keys a graphed step of `kv_length` keys reads: the next power of two, from MIN_KEYS to `capacity`."""
    return min(max(MIN_KEYS, 1 << (kv_length - 1).bit_length()), capacity)


class DecodeGraphs:
    """model.fused_blocks for CUDA decode steps (see the module's docstring); `record=False` runs the same
    padded step without a graph, on any device: the CPU twin the tests compare with model.py's loop."""

    def __init__(self, model: BloomShardModel, *, record: bool = True) -> None:
        self.model = model
        weight = model.ln_f.weight
        most = ROW_BUCKETS[-1]
        # The graphs' inputs: a step's rows and positions are copied in, padding zeroed.
        self.hidden = torch.zeros(most, model.config.hidden_size, dtype=weight.dtype, device=weight.device)
        self.positions = torch.zeros(most, dtype=torch.long, device=weight.device)
        self.slots = torch.arange(most, device=weight.device)
        self.record = record
        self.pool: tuple[int, int] | None = None  # the graphs' memory, shared: one step runs at a time
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.cache_address: tuple[int, int] | None = None
        self.failed = False
        self.padded_steps = 0  # steps taken, graphed or (record=False) not

    @classmethod
    def build(cls, model: BloomShardModel, world_size: int) -> DecodeGraphs | None:
        """DecodeGraphs for a model on CUDA served by one rank, or None (other devices, more ranks, off)."""
        if os.environ.get(ENV, "1") == "0" or model.ln_f.weight.device.type != "cuda":
            return None
        if world_size > 1:
            log.info(
                "cuda_graphs_off", reason=f"{world_size} ranks: NCCL's all-reduces in a graph are untested"
            )
            return None
        return cls(model)

    def __call__(self, x: torch.Tensor, plan: StepPlan, cache: KVCache) -> torch.Tensor | None:
        """The blocks' output for a decode step's rows x, or None for a step the graphs do not take."""
        rows = x.shape[0]
        if self.failed or not (plan.decode_only and plan.slots_match_rows) or rows > ROW_BUCKETS[-1]:
            return None
        bucket = next(size for size in ROW_BUCKETS if size >= rows)
        cache.reserve_slots(bucket)
        if not cache.slots_free(rows, bucket):
            return None
        keys = key_bucket(plan.kv_length, cache.capacity)
        self.hidden[:rows].copy_(x)
        self.hidden[rows:bucket].zero_()
        self.positions[:rows].copy_(plan.single_positions)
        self.positions[rows:bucket].zero_()
        self.padded_steps += 1
        if not self.record:
            return self._blocks(cache, bucket, keys)[:rows]
        address = (cache.keys.data_ptr(), cache.values.data_ptr())
        if address != self.cache_address:
            self.graphs.clear()
            # A pool whose graphs are all gone is freed: recording into its handle again trips an assert in
            # torch's allocator (seen on an H200, torch 2.11).
            self.pool = torch.cuda.graph_pool_handle()
            self.cache_address = address
        if (bucket, keys) not in self.graphs:
            try:
                self.graphs[bucket, keys] = self._record(cache, bucket, keys)
            except RuntimeError as exc:  # what a graph cannot hold: serve on without graphs, and say so
                log.warning("cuda_graphs_off", reason=f"recording failed: {exc}")
                self.failed = True
                self.padded_steps -= 1
                return None
        graph, out = self.graphs[bucket, keys]
        graph.replay()
        return out[:rows]

    def _record(self, cache: KVCache, rows: int, keys: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        log.info("cuda_graph_recording", rows=rows, keys=keys, graphs=len(self.graphs))
        device = self.hidden.device
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            # Once outside the graph first: cuBLAS and Triton set up what they need, which recording forbids.
            # It stores this step's keys and values, which the replay stores again, unchanged.
            self._blocks(cache, rows, keys)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._blocks(cache, rows, keys)
        return graph, out

    def _blocks(self, cache: KVCache, rows: int, keys: int) -> torch.Tensor:
        """Every block on the first `rows` inputs, reading `keys` keys per slot: what a graph records."""
        positions = self.positions[:rows]
        slopes = self.model.h[0].self_attention.alibi_slopes
        plan = StepPlan(
            single_rows=None,
            single_slots=self.slots[:rows],
            single_positions=positions,
            num_slots=rows,
            kv_length=keys,
            single_bias=one_query_bias(slopes, positions, keys, self.hidden.dtype),
            slots_match_rows=True,
            prompts=[],
            multi=[],
        )
        x = self.hidden[:rows]
        for layer, block in enumerate(self.model.h):
            x = block(x, plan, cache, layer)
        return x
