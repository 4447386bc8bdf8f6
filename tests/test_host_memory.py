"""A CPU worker's weights on transparent huge pages (shard_worker/host_memory.py), on this host's kernel."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from bloomduo.core.bloom_config import BloomConfig
from bloomduo.shard_worker import native
from bloomduo.shard_worker.host_memory import HUGE_PAGE_BYTES, _runs, gather, host_tensors, use_huge_pages
from bloomduo.shard_worker.model import BloomShardModel
from bloomduo.shard_worker.quantize import INT8, quantize_linears
from bloomduo.shard_worker.weight_formats import format_weights
from tests._dist_helpers import needs_packing

MiB = 2**20


def _collapse_supported() -> str | None:
    """Why MADV_COLLAPSE cannot work here, or None."""
    if platform.system() != "Linux":
        return "transparent huge pages are Linux's"
    release = tuple(int(part) for part in platform.release().split(".")[:2] if part.isdigit())
    if release < (6, 1):
        return f"MADV_COLLAPSE came with Linux 6.1; this kernel is {platform.release()}"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return "transparent huge pages are set to never on this host"
    except OSError:
        return "this kernel has no transparent huge pages"
    return None


def _huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                start, end = (int(part, 16) for part in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "AnonHugePages:":
                return int(fields[1]) * 1024
    return 0


def test_runs_merge_ranges_that_overlap_or_lie_close() -> None:
    ranges = [(100, 200), (0, 50), (60, 80), (190, 300), (1000, 1100)]
    assert _runs(ranges, max_gap=9) == [(0, 50), (60, 80), (100, 300), (1000, 1100)]
    assert _runs(ranges, max_gap=10) == [(0, 80), (100, 300), (1000, 1100)]
    assert _runs(ranges, max_gap=20) == [(0, 300), (1000, 1100)]
    assert _runs([], max_gap=10) == []


@pytest.mark.skipif(_collapse_supported() is not None, reason=str(_collapse_supported()))
def test_weights_move_onto_huge_pages_unchanged() -> None:
    # Three tensors allocated one after another, as a layer's weights are: their runs are moved whole.
    tensors = [torch.randn(n * MiB // 4) for n in (24, 3, 5)]
    before = [t.clone() for t in tensors]
    moved = use_huge_pages(tensors)
    start = min(t.data_ptr() for t in tensors)
    # At least the whole 2 MiB pages inside the biggest tensor; never more than the span of all three.
    assert 22 * MiB <= moved <= (max(t.data_ptr() + t.nbytes for t in tensors) - start)
    assert moved % HUGE_PAGE_BYTES == 0
    assert _huge_bytes_at(tensors[0].data_ptr() + 8 * MiB) >= 2 * MiB
    for tensor, copy in zip(tensors, before, strict=True):
        assert torch.equal(tensor, copy)


def test_switched_off_or_nothing_big_enough_moves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert use_huge_pages([torch.randn(1024)]) == 0  # no whole 2 MiB page inside
    monkeypatch.setenv("BLOOMDUO_HUGE_PAGES", "0")
    assert use_huge_pages([torch.randn(8 * MiB // 4)]) == 0


@pytest.mark.skipif(_collapse_supported() is not None, reason=str(_collapse_supported()))
@pytest.mark.parametrize("kernels", [pytest.param("packed", marks=needs_packing), "eager"])
def test_a_formatted_model_moves_nearly_all_its_weights(kernels: str) -> None:
    torch.manual_seed(0)
    model = BloomShardModel(BloomConfig(vocab_size=8192, hidden_size=1024, n_layer=2, n_head=16))
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    format_weights(model, torch.device("cpu"), torch.bfloat16, kernels)
    tensors = host_tensors(model)
    assert (kernels == "packed") == any(t.is_mkldnn for t in tensors)  # oneDNN's opaque weights included
    x = torch.randn(3, 1024, dtype=torch.bfloat16)
    expected = model.logits(x)
    total = sum(t.numel() * t.element_size() for t in tensors)
    whole_pages_inside = sum(
        max(0, (t.data_ptr() + t.nbytes) // HUGE_PAGE_BYTES - -(-t.data_ptr() // HUGE_PAGE_BYTES))
        for t in tensors
        if not t.is_mkldnn
    )
    # Whole pages inside each 2-8 MiB weight would cover about half of them; the runs they form, most: 72-87 %
    # over repeated runs here, as the heap happens to place oneDNN's packed copies (0.75 failed one in three).
    moved = use_huge_pages(tensors)
    assert moved > 0.6 * total and moved > whole_pages_inside * HUGE_PAGE_BYTES
    assert torch.equal(model.logits(x), expected)


def test_gathered_tensors_keep_their_values_views_and_alignment() -> None:
    base = torch.randn(1000)
    laid_out = torch.randn(64, 32).t().contiguous().view(32, 64)  # as native.to_row_blocks returns them
    tensors = [
        base[10:20],
        base[500:],
        torch.randn(7).to(torch.bfloat16),
        torch.randn(3, 5).t(),
        torch.empty(0),
        laid_out,
    ]
    before = [t.clone() for t in tensors]
    alignment = [t.data_ptr() % 64 for t in tensors[:4]]
    gather(tensors)
    for tensor, copy in zip(tensors, before, strict=True):
        assert torch.equal(tensor, copy) and tensor.stride() == copy.stride()
    views = tensors[:2]
    assert views[0].untyped_storage().data_ptr() == views[1].untyped_storage().data_ptr()  # still one storage
    assert views[1].data_ptr() - views[0].data_ptr() == 490 * 4
    assert {t.untyped_storage().data_ptr() for t in tensors[:4]} == {views[0].untyped_storage().data_ptr()}
    assert [t.data_ptr() % 64 for t in tensors[:4]] == alignment
    # the laid-out weight's base moved with it: nothing holds the old bytes
    assert laid_out._base.untyped_storage().data_ptr() == laid_out.untyped_storage().data_ptr()
    assert laid_out.untyped_storage().data_ptr() == views[0].untyped_storage().data_ptr()


@pytest.mark.skipif(_collapse_supported() is not None, reason=str(_collapse_supported()))
@pytest.mark.parametrize("quantize", ["none", INT8])
def test_a_gathered_model_lies_in_one_run_on_huge_pages_and_its_kernels_read_it_there(quantize: str) -> None:
    """Loading leaves a rank's weights scattered among the holes its conversions made; gathered, every byte
    but the ends' lies on huge pages, and the native kernels built before read the moved weights."""
    torch.manual_seed(0)
    model = BloomShardModel(BloomConfig(vocab_size=8192, hidden_size=1024, n_layer=2, n_head=16))
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    quantize_linears(model, quantize)
    format_weights(model, torch.device("cpu"), torch.bfloat16, "row-blocks")  # native kernels for bf16 too
    x = torch.randn(3, 1024, dtype=torch.bfloat16)
    expected = model.logits(x)  # builds int8 kernels lazily: they are rebased too
    tensors = host_tensors(model)
    total = sum(t.numel() * t.element_size() for t in tensors)
    assert gather(tensors) >= total
    start = min(t.data_ptr() for t in tensors)
    end = max(t.data_ptr() + t.nbytes for t in tensors)
    assert end - start < total + 64 * len(tensors)  # one run: no holes between them
    native.rebase_kernels(model)
    kernels = [k for m in model.modules() for k in vars(m).values() if isinstance(k, native.LinearKernel)]
    assert kernels and all(start <= k.record(torch.bfloat16)[0] < end for k in kernels)
    assert use_huge_pages(tensors) >= total - 2 * HUGE_PAGE_BYTES
    assert torch.equal(model.logits(x), expected)


@pytest.mark.skipif(_collapse_supported() is not None, reason=str(_collapse_supported()))
def test_the_kv_cache_lives_on_huge_pages_and_keeps_them_as_it_grows() -> None:
    """Decode reads each head's keys a few KiB from the next head's: the cache sits on 2 MiB pages too."""
    from bloomduo.shard_worker.kv_cache import KVCache

    cache = KVCache(4, 8, 64, dtype=torch.bfloat16, initial_capacity=128, initial_slots=16)  # 8 MiB each
    for tensor in (cache.keys, cache.values):
        assert _huge_bytes_at(tensor.data_ptr() + tensor.nbytes // 2) >= 2 * MiB
    cache.keys[1, 3, 2, 5, 0] = 7.0
    cache.reserve_slots(32)  # copied into new tensors: those are moved too
    assert float(cache.keys[1, 3, 2, 5, 0]) == 7.0 and cache.keys.shape[1] == 32
    for tensor in (cache.keys, cache.values):
        assert _huge_bytes_at(tensor.data_ptr() + tensor.nbytes // 2) >= 2 * MiB


_STEP_BUFFERS = """
import resource, sys
from bloomduo.core.libc import keep_freed_heap
if sys.argv[1] == "keep":
    assert keep_freed_heap(64 << 20)
def step():  # a sampled step's buffers in the gateway: a few blocks of MiBs, written, then dropped
    blocks = [b"x" * (8 << 20) for _ in range(4)]
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")
def test_a_kept_heap_serves_the_next_steps_buffers_without_faulting_their_pages_again() -> None:
    """Four 8 MiB blocks a step are 8192 pages; kept, the next steps find them resident (a fresh interpreter,
    so no earlier setting or heap shape decides it)."""

    def faults_per_step(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", _STEP_BUFFERS, mode], capture_output=True, text=True, check=True
        )
        return int(run.stdout)

    kept = faults_per_step("keep")
    assert kept < 500, f"{kept} page faults a step with the heap kept"
    print(f"page faults a step: {faults_per_step('default')} by default, {kept} kept")


_THREAD_BLOCKS = """
import sys, threading
from bloomduo.core.libc import one_arena
if sys.argv[1] == "one":
    assert one_arena()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
addresses = []
def load():  # as a worker's step thread loads its weights: many blocks below the mmap threshold
    addresses.extend(libc.malloc(64 << 10) for _ in range(64))
thread = threading.Thread(target=load)
thread.start()
thread.join()
heap = next(line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
start, end = (int(part, 16) for part in heap.split()[0].split("-"))
print(sum(start <= address < end for address in addresses))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="M_ARENA_MAX is glibc's")
def test_with_one_arena_a_threads_blocks_come_from_the_main_heap() -> None:
    """A thread's blocks land in an arena of its own unless one_arena() was called first (a fresh interpreter
    per case: an arena, once a thread has it, stays its own)."""

    def from_main_heap(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", _THREAD_BLOCKS, mode], capture_output=True, text=True, check=True
        )
        return int(run.stdout)

    assert from_main_heap("one") == 64
    assert from_main_heap("default") == 0
