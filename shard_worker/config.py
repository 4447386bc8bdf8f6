"""A shard worker's settings, each with its one default.

A field whose metadata has a "help" is also a `bloomduo shard` flag (bloomduo.apps.flags derives them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bloomduo.core.dtypes import DTYPE_CHOICES

QUANTIZE_CHOICES = ("none", "int8", "int8-dynamic")  # quantize.py says what each does


@dataclass(frozen=True)
class ShardOptions:
    model_dir: Path
    rank: int
    world_size: int
    dist_init: str  # torch.distributed init_method, e.g. tcp://127.0.0.1:29500
    device: str = field(default="cpu", metadata={"help": "cpu, cuda:N or npu:N"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "weights and activations; auto: the checkpoint's (float16 on npu, float32 with "
            "--quantize int8-dynamic)",
            "choices": DTYPE_CHOICES,
        },
    )
    dist_timeout_s: float = 600.0
    wedge_grace_s: float = 10.0  # how long a step may outlive its closed stream before the group is dropped
    # Allocated at start-up, so a burst of new sequences does not stop to grow (and zero) the cache.
    kv_cache_slots: int = field(
        default=32,
        metadata={
            "help": "sequences the KV cache is allocated for at start (the gateway's --max-batch-size)"
        },
    )
    # bfloat16 CPU workers only; see shard_worker/cpu_kernels.py. Tests and comparisons force a route.
    cpu_kernels: str = field(
        default="auto",
        metadata={
            "help": "bfloat16 CPU Linear kernels: auto (timed at start; BLOOMDUO_CPU_KERNELS when set), "
            "or forced: packed, eager, aten, fp32, or by rows like aten,fp32@8"
        },
    )
    quantize: str = field(
        default="none",
        metadata={
            "help": "int8 weights per output channel for every Linear and the LM head: int8 keeps the "
            "activations exact, int8-dynamic (cpu) also quantizes them per call, faster and less exact",
            "choices": QUANTIZE_CHOICES,
        },
    )
