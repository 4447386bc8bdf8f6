"""The machine's floor for `bloomduo bench`: what the hardware allows, measured, against what the model costs.

A decode step must read every weight of the blocks and the LM head once, so no engine's time per output
token is below (those bytes) / (memory read bandwidth); a prefill must do 2 FLOPs per weight per prompt
token and read every weight once too, so no time to first token is below the longer of (those FLOPs) /
(GEMM rate) and the weights' read time. Both rates are measured here, on the machine the stack runs on,
briefly (a few hundred ms each, medians over repeats), and the bench prints each level's TPOT and TTFT
as a multiple of these floors: 1.0 is the hardware's limit, not a goal to tune to.

On CPU the rates are measured with the threads the stack's workers use together (W workers x their
threads each share one memory bus), and the bandwidth with one thread too; on CUDA on one of the stack's
devices, times the W devices, each of which reads its 1/W of the weights in parallel. The GEMM's weight
(4 x hidden^2) may sit in the last-level cache across repeats: that is the rate's compute ceiling, and the
memory side of a prefill is the read-time term above.

torch is imported inside the functions: the CLI imports bench (and so this module) for every command.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Prefill-like GEMM rows: the bench's default prompt length, and a shape oneDNN/cuBLAS treat as a GEMM, not
# a matrix-vector product.
GEMM_ROWS = 32
# A repeat shorter than this is mostly timer and dispatch overhead, so small kernels run several times in one.
_MIN_REPEAT_S = 0.01
# Bandwidth arrays at least this large, and several times the last-level cache, so reads come from DRAM.
_MIN_ARRAY_BYTES = 256 * 2**20
_MAX_ARRAY_BYTES = 2 * 2**30


def machine_class() -> dict[str, Any]:
    """The CPU class every CPU figure depends on: model name, torch's vector ISA, native bf16, cores."""
    import torch

    return {
        "cpu_model": _cpu_model(),
        # The ISA ATen's kernels were dispatched to (ATEN_CPU_CAPABILITY can lower it), e.g. AVX512, AVX2.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # Whether oneDNN runs bf16 natively (AVX512-BF16 or AMX); without it bf16 GEMMs are emulated, slower
        # than fp32.
        "onednn_bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cores": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stack_threads(num_shards: int, threads_per_shard: int | None) -> int:
    """Torch threads of a CPU stack's W workers together, by the launcher's rule (Stack.shard_commands):
    --threads-per-shard each, or an equal share of the cores this process may run on."""
    per_shard = threads_per_shard or max(1, len(os.sched_getaffinity(0)) // num_shards)
    return per_shard * num_shards


def model_costs(
    model_dir: Path,
    dtype_name: str,
    prompt_tokens: int,
    *,
    int8_matrices: bool = False,
    compact_groups: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """What one decode step reads and one prefill computes, from the checkpoint's tensor sizes.

    Bytes: every tensor the workers hold (the blocks, ln_f, the LM head rows) at the served dtype's size;
    the gateway's embedding lookup (a row per token) and the KV cache reads (a few MB at bench lengths)
    are left out. FLOPs: 2 per weight of the blocks' matrices per prompt token, QK^T and softmax.V over the
    causal half (2 x hidden x T(T+1) per layer), and the LM head for the last row only (as the workers do);
    biases, LayerNorms and softmax are elementwise and left out. A checkpoint cut by `bloomduo
    shard-weights` is read rank by rank: what each worker holds, replicated LayerNorms included.
    `int8_matrices` (workers started with --quantize): the matrices at one byte plus a float32 scale per row.
    `compact_groups` ("blocks", "lm_head": the groups whose workers hold bf16 matrices in compact row blocks,
    native.to_compact): those matrices at 12 bits a weight (their tables and patches, ~0.1 %, left out).
    """
    from bloomduo.core.checkpoint import Checkpoint
    from bloomduo.core.dtypes import to_torch

    itemsize = to_torch(dtype_name).itemsize
    checkpoint = Checkpoint(model_dir)
    parts = (
        [checkpoint.rank_part(rank, checkpoint.num_shards) for rank in range(checkpoint.num_shards)]
        if checkpoint.num_shards
        else [checkpoint]
    )
    elements = {"blocks": 0, "ln_f": 0, "lm_head": 0}
    part_bytes = {"blocks": 0, "ln_f": 0, "lm_head": 0}
    block_matrix_elements = 0
    for part in parts:
        head = part.lm_head_name()
        for name in part.names():
            shape = part.shape(name)
            count = math.prod(shape)
            group = "blocks" if name.startswith("h.") else "ln_f" if name.startswith("ln_f.") else None
            group = "lm_head" if name == head else group
            if group is None:
                continue
            elements[group] += count
            matrix = len(shape) == 2
            if int8_matrices and matrix:
                part_bytes[group] += count + 4 * shape[0]
            elif group in compact_groups and matrix:
                part_bytes[group] += count * 3 // 2
            else:
                part_bytes[group] += count * itemsize
            if group == "blocks" and len(shape) == 2:
                block_matrix_elements += count
    if not block_matrix_elements or not elements["lm_head"]:
        raise ValueError(f"{model_dir}: no block matrices or no LM head among the checkpoint's tensors")
    config = checkpoint.config
    flops = {
        "blocks": 2 * block_matrix_elements * prompt_tokens,
        "attention": 2 * config.hidden_size * prompt_tokens * (prompt_tokens + 1) * config.n_layer,
        "lm_head": 2 * elements["lm_head"],
    }
    return {
        "dtype": dtype_name,
        "weights": f"int8 (matrices) and {dtype_name}"
        if int8_matrices
        else f"{dtype_name}, {' and '.join(sorted(compact_groups))} in 12 bits (compact)"
        if compact_groups
        else dtype_name,
        "decode_bytes": sum(part_bytes.values()),
        "decode_bytes_parts": part_bytes,
        "prompt_tokens": prompt_tokens,
        "prompt_flops": sum(flops.values()),
        "prompt_flops_parts": flops,
        "hidden_size": config.hidden_size,
    }


def _median_rate(run: Callable[[], object], work: float, sync: Callable[[], None], budget_s: float) -> float:
    """Median of work / seconds over repeats of run() for about budget_s, after one warm-up call."""
    run()
    sync()
    start = time.perf_counter()
    run()
    sync()
    # Enough calls per repeat that one repeat takes _MIN_REPEAT_S.
    calls = max(1, math.ceil(_MIN_REPEAT_S / max(time.perf_counter() - start, 1e-9)))
    rates: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(rates) < 3 or (time.perf_counter() < deadline and len(rates) < 1000):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        sync()
        rates.append(work * calls / (time.perf_counter() - start))
    return statistics.median(rates)


def _last_level_cache_bytes() -> int:
    """The largest CPU cache in /sys (0 when it says nothing), e.g. 32 MiB of L3."""
    largest = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text(encoding="utf-8").strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text and text[-1] in units and text[:-1].isdigit():
            largest = max(largest, int(text[:-1]) * units[text[-1]])
    return largest


def read_bandwidth(device: str, threads: int | None, budget_s: float = 0.3) -> tuple[float, int]:
    """Memory read bandwidth in bytes/s (and the array's bytes): sum() over a float32 array much larger
    than the last-level cache, which streams it once, as a decode step streams the weights."""
    import torch

    from bloomduo.shard_worker.host_memory import use_huge_pages

    if device.startswith("cuda"):
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        nbytes = min(max(4 * _MIN_ARRAY_BYTES, 16 * l2), _MAX_ARRAY_BYTES)
    else:
        nbytes = min(max(_MIN_ARRAY_BYTES, 8 * _last_level_cache_bytes()), _MAX_ARRAY_BYTES)
    with _torch_threads(threads):
        # ones, not empty: every page is touched (faulted in) before the timing starts.
        array = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        if array.device.type == "cpu":
            # On the 2 MiB pages CPU workers hold their weights on: on 4 KiB ones the prefetchers stop at
            # every page and one EPYC core read 22 GB/s instead of 31, a floor the workers then beat.
            use_huge_pages([array])
        rate = _median_rate(array.sum, float(nbytes), _sync(device), budget_s)
    del array
    return rate, nbytes


def fastest(rates: dict[str, float]) -> tuple[float, str]:
    """The fastest of gemm_rates' kernels: its FLOP/s and its name."""
    kernel = max(rates, key=rates.__getitem__)
    return rates[kernel], kernel


def gemm_rates(
    device: str,
    dtype_name: str,
    hidden: int,
    threads: int | None,
    budget_s: float = 0.3,
    quantize: str = "none",
    workers: int = 1,
) -> dict[str, float]:
    """FLOP/s of the prefill-like GEMM GEMM_ROWS x hidden -> 4 x hidden (the MLP's first matrix) in the
    served dtype, by kernel: F.linear, and on a CPU with native oneDNN bf16 also the oneDNN-packed linear
    the workers use there (shard_worker/weight_formats.py). For bf16 on a CPU also the paths its workers
    choose among where bf16 arithmetic is emulated (cpu_kernels.py): bloomduo's tiled and row-block
    kernels, one thread per call (so `workers` of them at once), and F.linear in float32 on the widened
    weights; F.linear in emulated bf16 alone would put the TTFT floor at several times what the workers
    reach. With `quantize` (the workers' --quantize) on a CPU, also the int8 GEMM that scheme runs: for
    int8-dynamic, an integer one (operations counted as FLOPs), fbgemm's at `threads` or bloomduo's VNNI
    kernel; for int8 (weight-only), bloomduo's kernel that widens the int8 weights for the float FMAs. Its
    float rate is all weight-only int8 has: the integer GEMM would put its TTFT floor at half what it can
    reach. bloomduo's kernels run one thread per call, so `workers` of them at once."""
    import torch
    import torch.nn.functional as F

    from bloomduo.core.dtypes import to_torch

    dtype = to_torch(dtype_name)
    flops = 2.0 * GEMM_ROWS * hidden * 4 * hidden
    sync = _sync(device)
    with _torch_threads(threads), torch.inference_mode():
        x = torch.randn(GEMM_ROWS, hidden, device=device).to(dtype)
        weight = torch.randn(4 * hidden, hidden, device=device).to(dtype)
        rates = {"F.linear": _median_rate(lambda: F.linear(x, weight), flops, sync, budget_s)}
        if (
            device == "cpu"
            and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        ):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            rates["oneDNN packed linear"] = _median_rate(
                lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                flops,
                sync,
                budget_s,
            )
        if device == "cpu" and dtype == torch.bfloat16:
            from bloomduo.shard_worker import cpu_kernels, native

            own = {}
            if native.available() and native.fits(weight):
                own["tiled"] = native.LinearKernel(native.to_tiles(weight))
                if native.row_blocks_fit(weight) and cpu_kernels.bf16_is_emulated():
                    blocks = native.to_row_blocks(weight)
                    own["row-blocks"] = native.LinearKernel(blocks, layout=native.ONEDNN)
            for name, kernel in own.items():
                rate = _median_rate(lambda kernel=kernel: kernel(x), flops, sync, budget_s)
                rates[f"bloomduo {name} bf16 x {workers} workers"] = rate * workers
            if cpu_kernels.bf16_is_emulated():
                widened_x, widened = x.float(), weight.float()
                rates["F.linear float32 (bf16 weights widened)"] = _median_rate(
                    lambda: F.linear(widened_x, widened), flops, sync, budget_s
                )
        if device == "cpu" and quantize != "none":
            from torch import nn

            from bloomduo.shard_worker.quantize import INT8_DYNAMIC, Int8Linear

            int8 = Int8Linear.from_linear(nn.Linear(hidden, 4 * hidden, bias=False).to(dtype), quantize)
            rate = _median_rate(lambda: int8(x), flops, sync, budget_s)
            scheme = "dynamic" if quantize == INT8_DYNAMIC else "weight-only"
            if int8.kernel.startswith("native"):
                rates[f"bloomduo int8 ({scheme}, {int8.kernel}) x {workers} workers"] = rate * workers
            else:
                rates[f"int8 ({scheme}, {int8.kernel})"] = rate
    return rates


def _sync(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class _torch_threads:
    """torch.set_num_threads for a block, then back: the bench process's own setting is not ours to keep."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        import torch

        self.before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.before)


def measure_rates(
    device: str,
    dtype_name: str,
    hidden: int,
    num_shards: int,
    threads: int,
    budget_s: float = 0.3,
    quantize: str = "none",
) -> dict[str, Any]:
    """The stack's memory read bandwidth and GEMM rate on this machine.

    device: the first worker's ("cpu" or "cuda:N"). On CPU, threads is the workers' total: one memory bus
    and one pool of cores serve them all. On CUDA each of the num_shards devices reads and multiplies its
    1/W share on its own, so the stack's rates are W x one device's (identical devices assumed).
    """
    cuda = device.startswith("cuda")
    single, nbytes = read_bandwidth(device, None if cuda else 1, budget_s)
    if cuda:
        together = single
        parallel = num_shards
    else:
        together = single if threads == 1 else read_bandwidth(device, threads, budget_s)[0]
        parallel = 1
    gemm, kernel = fastest(
        gemm_rates(
            device, dtype_name, hidden, None if cuda else threads, budget_s, quantize, workers=num_shards
        )
    )
    return {
        "device": device,
        "dtype": dtype_name,
        "threads": None if cuda else threads,
        "parallel_devices": parallel,
        "array_bytes": nbytes,
        "read_bytes_per_s_single": single,  # one thread, or one device
        "read_bytes_per_s": together * parallel,
        "gemm_shape": [GEMM_ROWS, hidden, 4 * hidden],
        "gemm_kernel": kernel,
        "gemm_flop_per_s": gemm * parallel,
    }


def floors(costs: dict[str, Any], rates: dict[str, Any]) -> dict[str, Any]:
    """TPOT floor = decode bytes / bandwidth; TTFT floor = prompt FLOPs / GEMM rate, or the weights' read
    time where that is longer (a prefill reads every weight once too: the roofline's other side)."""
    tpot = costs["decode_bytes"] / rates["read_bytes_per_s"]
    compute = costs["prompt_flops"] / rates["gemm_flop_per_s"]
    return {
        **rates,
        **costs,
        "tpot_s": tpot,
        "ttft_compute_s": compute,
        "ttft_s": max(compute, tpot),
        "ttft_bound": "compute" if compute >= tpot else "memory",
    }


def against_floor(floor: dict[str, Any], systems: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each level's TPOT p50 and TTFT p50 as a multiple of its floor (1.0 = the hardware's limit)."""
    return [
        {
            "system": system,
            "concurrency": level["concurrency"],
            "tpot_p50_x_floor": level["tpot_s"]["p50"] / floor["tpot_s"],
            "ttft_p50_x_floor": level["ttft_s"]["p50"] / floor["ttft_s"],
        }
        for system, levels in systems.items()
        for level in levels
    ]
