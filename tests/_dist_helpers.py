"""Helpers for the shard-model tests: a tiny random BLOOM checkpoint, a step plan, and the worker body
that each spawned rank runs (it must live in an importable module for torch.multiprocessing spawn)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import BloomConfig, BloomForCausalLM

TINY = dict(vocab_size=1009, hidden_size=96, n_layer=2, n_head=12, layer_norm_epsilon=1e-5)  # 1009 is prime


def make_checkpoint(model_dir: Path, seed: int = 0, config: dict | None = None) -> BloomForCausalLM:
    """Save a tiny BloomForCausalLM (`config`, TINY by default) with random biases and LayerNorm parameters
    (HF init makes biases 0 and LayerNorm weights 1, which would hide a bias added W times)."""
    torch.manual_seed(seed)
    model = BloomForCausalLM(BloomConfig(**(config or TINY))).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "layernorm" in name or "ln_f" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.08)
    model.save_pretrained(model_dir)
    return model


class _SafetensorsCheckpoint:
    """Stand-in for bloomduo.core.checkpoint.Checkpoint (same interface) until that module exists."""

    def __init__(self, model_dir) -> None:
        self.config = BloomConfig.from_pretrained(model_dir)
        self._where: dict[str, tuple[Path, str]] = {}
        for file in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(file, "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    self._where[key.removeprefix("transformer.")] = (file, key)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        file, key = self._where[name]
        with safe_open(file, "pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def read(
        self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        file, key = self._where[name]
        with safe_open(file, "pt") as handle:
            if dim is None:
                return handle.get_tensor(key)
            index = (slice(None),) * dim + (slice(start, stop),)
            return handle.get_slice(key)[index]

    def lm_head_name(self) -> str:
        return "lm_head.weight" if "lm_head.weight" in self._where else "word_embeddings.weight"


def open_checkpoint(model_dir):
    try:
        from bloomduo.core.checkpoint import Checkpoint
    except ImportError:
        return _SafetensorsCheckpoint(model_dir)
    return Checkpoint(model_dir)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def run_rank(
    rank: int, world_size: int, init_method: str, model_dir: str, plan_path: str, out_dir: str
) -> None:
    """One shard worker: load this rank's slices, run the plan in each dtype, save its logits slices."""
    torch.set_num_threads(1)
    from bloomduo.shard_worker.distributed import init_distributed, shutdown_distributed
    from bloomduo.shard_worker.kv_cache import CachePositionError
    from bloomduo.shard_worker.step_plan import Chunk
    from bloomduo.shard_worker.tensor_parallel import load_shard, shard_layout

    plan = torch.load(plan_path)
    device = torch.device("cpu")
    group = init_distributed(rank, world_size, init_method, device, timeout_s=60)
    try:
        checkpoint = open_checkpoint(model_dir)
        result: dict = {}
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model = load_shard(checkpoint, rank, world_size, device=device, dtype=dtype, group=group)
            cache = model.new_kv_cache(initial_capacity=4)  # small: decode steps exercise the growth
            logits = []
            for index, step in enumerate(plan["steps"]):
                for sid in step["free"]:
                    assert cache.free(sid)
                chunks = [Chunk(*c) for c in step["chunks"]]
                if index == len(plan["steps"]) - 1 and dtype == torch.float32:
                    # A wrong start_position fails on every rank before any collective, and the group
                    # stays usable: this step still runs right after (and agrees with HF).
                    sid, start, n = step["chunks"][0]
                    try:
                        model(step["hidden"][dtype_name][:n], [Chunk(sid, start + 1, n)], cache)
                    except CachePositionError as exc:
                        result["position_error"] = str(exc)
                logits.append(model(step["hidden"][dtype_name], chunks, cache))
            result[dtype_name] = logits
            if dtype == torch.float32:
                vocab = shard_layout(checkpoint.config, rank, world_size).vocab
                assert model.lm_head.weight.shape[0] == vocab.end - vocab.start
                result["vocab_range"] = tuple(vocab)
                result["block_bytes"] = parameter_bytes(model.h)
                result["lm_head_bytes"] = parameter_bytes(model.lm_head)
                result["local_heads"] = model.num_local_heads
                result["cache_sequences"] = cache.num_sequences
                result["cache_tokens"] = cache.num_tokens
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        shutdown_distributed(group)


def relative_error(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    """max|got - want| in units of eps(dtype) * max|want|: the dtype's resolution at the reference's scale.

    Tests bound it by a small count k derived from how many roundings separate the two sides.
    """
    scale = torch.finfo(dtype).eps * want.float().abs().max().item()
    return (got.float() - want.float()).abs().max().item() / scale


# The AVX2-only CPU class, simulated on a newer CPU: ATen's AVX2 kernels, no oneDNN bfloat16 (so no
# packed layout, and bfloat16 matmuls emulated) and fbgemm's AVX2 int8 GEMM (no VNNI), for subprocesses
# that check what that class runs.
AVX2_CLASS = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
}


def can_pack() -> bool:
    """Whether bfloat16 CPU workers may use oneDNN's packed layout here."""
    from bloomduo.shard_worker.weight_formats import packing_applies

    return packing_applies(torch.device("cpu"), torch.bfloat16)


needs_packing = pytest.mark.skipif(
    not can_pack(),
    reason="packing is off here: no oneDNN bfloat16 matmul on this CPU (the AVX2 class) or torch build "
    "(needs AVX512-BF16 or AMX), or BLOOMDUO_CPU_PACKED_WEIGHTS=0",
)
