"""How a CPU shard worker holds its memory: weights on huge pages, freed heap returned, kernel caches bounded.

Each function is a no-op where its mechanism is missing (not Linux, not glibc): the worker runs as before.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import mmap
import os

import torch
from torch import nn

from bloomduo.core.libc import madvise, malloc_trim
from bloomduo.core.logs import get_logger

log = get_logger(__name__)

HUGE_PAGE_BYTES = 2 << 20  # x86-64's transparent huge page
_MADV_COLLAPSE = 25  # Linux >= 6.1: make the range's pages huge now, not when khugepaged gets to it


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    Loading leaves holes where weights were converted: float weights quantized to int8, plain weights
    packed. glibc keeps those pages resident; at bloom-560m with --quantize int8 a worker held 1095 MiB
    after loading and 536 MiB after this call."""
    malloc_trim()


# Compiled matmul kernels kept per shape, in oneDNN's cache and in the ideep layer's above it (torch reads
# LRU_CACHE_CAPACITY). Both hold 1024 by default, and a packed Linear's kernel is compiled for each row
# count: every prompt length a worker prefilled through oneDNN kept ~2.5 MiB (at bloom-560m's 4 shapes,
# 650 MiB after 200 lengths). A step's Linears share their few shapes across all layers, so a small cache
# costs one compile per shape a step meets again: ~0.3 ms on an AVX512-BF16 EPYC, 3.5-4.5 ms on a Xeon with
# AMX (which is why the kernel probes time prefill sizes at a new row count each run: cpu_kernels).
ONEDNN_CACHED_KERNELS = 16


def bound_onednn_caches() -> None:
    """Cap both caches at ONEDNN_CACHED_KERNELS unless the environment sets them. Both are read when oneDNN
    first compiles a kernel in this process: call it before (a worker's load does)."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(ONEDNN_CACHED_KERNELS))


def host_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters and buffers that live in host memory (oneDNN's packed weights included)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return [t for t in tensors.values() if t.device.type == "cpu"]


def _address_range(tensor: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the bytes a CPU tensor's data occupies (a packed oneDNN weight's through oneDNN)."""
    start = torch.ops.mkldnn.data_ptr(tensor) if tensor.is_mkldnn else tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def _runs(ranges: list[tuple[int, int]], max_gap: int) -> list[tuple[int, int]]:
    """Address ranges merged where they overlap or lie at most `max_gap` bytes apart."""
    runs: list[list[int]] = []
    for start, end in sorted(ranges):
        if runs and start - runs[-1][1] <= max_gap:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    return [(start, end) for start, end in runs]


def _extent_bytes(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, end) bytes of its storage that a tensor's elements span."""
    size = tensor.element_size()
    last = sum((extent - 1) * step for extent, step in zip(tensor.shape, tensor.stride(), strict=True))
    first = tensor.storage_offset() * size
    return first, first + (last + 1) * size if tensor.numel() else first


def gather(tensors: list[torch.Tensor]) -> int:
    """Move the tensors' data (each storage's used bytes, views keeping their sharing) into one block starting
    on a huge page, in place (Tensor.set_: every reference sees the move); returns the bytes moved. oneDNN's
    opaque packed weights stay where they are. Whatever cached a moved tensor's address must take it again
    (native.rebase_kernels).

    Why: loading converts every weight (read, quantized, laid out), and the heap puts each final tensor in a
    hole the conversions left, so a rank's weights ended in 35-47 runs a few MiB long with gaps of 2-64 MiB
    between them: use_huge_pages can move only the whole huge pages inside a run, 214-229 of a bloom-560m int8
    rank's 281 MB in half the launches on an AVX2 EPYC (one run or two: 277-283), and every step waits for the
    slower rank's 4 KiB pages. One block is one run, and the holes go back to the system."""
    # A view's base holds the old storage too (a laid-out weight is a view of the contiguous copy made for
    # it): it moves with its views, or the old bytes would stay alive.
    bases = {}
    for tensor in tensors:
        while tensor is not None and id(tensor) not in bases:
            bases[id(tensor)] = tensor
            tensor = tensor._base
    storages: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    for tensor in bases.values():
        if tensor.is_mkldnn or tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), (storage, []))[1].append(tensor)
    spans = []
    for storage, sharing in storages.values():
        extents = [_extent_bytes(tensor) for tensor in sharing]
        spans.append((storage, sharing, min(first for first, _ in extents), max(end for _, end in extents)))
    # Each span keeps its start's offset modulo 64, so every tensor keeps its alignment.
    offsets, cursor = [], 0
    for _, _, first, end in spans:
        cursor += (first - cursor) % 64
        offsets.append(cursor)
        cursor += end - first
    if not spans:
        return 0
    block = torch.empty(cursor + HUGE_PAGE_BYTES, dtype=torch.uint8)
    base = -block.data_ptr() % HUGE_PAGE_BYTES
    with torch.no_grad():
        for (storage, sharing, first, end), offset in zip(spans, offsets, strict=True):
            old = torch.empty(0, dtype=torch.uint8).set_(storage)
            block[base + offset : base + offset + end - first].copy_(old[first:end])
            for tensor in sharing:
                size = tensor.element_size()
                moved_to = (base + offset + tensor.storage_offset() * size - first) // size
                tensor.set_(block.untyped_storage(), moved_to, tensor.shape, tensor.stride())
    return cursor


def use_huge_pages(tensors: list[torch.Tensor]) -> int:
    """Move the memory under the tensors' data onto transparent huge pages; returns the bytes moved (0 where
    the kernel cannot: not Linux, Linux before 6.1, THP disabled; or BLOOMDUO_HUGE_PAGES=0).

    Why: a decode step streams every weight once, and the CPU's hardware prefetchers stop at every 4 KiB
    page boundary. On one EPYC core, an LM-head slice (257 MB, bf16) streamed at 22 GB/s on 4 KiB pages and
    31 GB/s on 2 MiB ones, with both ranks reading at once.

    A layer's weights are a few MiB each, so few whole 2 MiB pages lie inside one (bloom-560m: 382 of 533
    MiB); the heap keeps them side by side, so the runs they form (gaps of up to half a huge page closed)
    are moved instead (516-526 MiB). What a gap held becomes resident: at most half a huge page per gap, 2 MiB
    in all at bloom-560m. The collapse copies the pages once (~0.3 s per GB).
    """
    if os.environ.get("BLOOMDUO_HUGE_PAGES", "1") == "0":
        return 0
    moved = 0
    refused: collections.Counter[str] = collections.Counter()
    for start, end in _runs([_address_range(t) for t in tensors], HUGE_PAGE_BYTES // 2):
        first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        # Page by page: a run may cross from one mapping into another (the heap into a chunk of its own),
        # and a range that does is refused whole.
        for page in range(first, end // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES, HUGE_PAGE_BYTES):
            # MADV_COLLAPSE alone, not MADV_HUGEPAGE too: that would also give a 2 MiB page to any later
            # fault in a hole of the range (the heap reusing a freed chunk), where 4 KiB would do.
            failure = madvise(page, HUGE_PAGE_BYTES, _MADV_COLLAPSE)
            if not failure:
                moved += HUGE_PAGE_BYTES
            elif moved == 0 and failure in (errno.EINVAL, errno.ENOSYS) and not _collapses():
                return 0  # this kernel cannot (before 6.1, THP off, not Linux): don't ask for every page
            else:
                refused[errno.errorcode.get(failure, str(failure))] += 1
    if refused:
        log.debug("huge_pages_refused", moved_bytes=moved, refused_pages=dict(refused))
    return moved


@functools.cache
def _collapses() -> bool:
    """Whether MADV_COLLAPSE works here, tried on a fresh private mapping of one huge page."""
    with mmap.mmap(-1, 2 * HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as region:
        region.write(b"\1" * len(region))
        view = ctypes.c_char.from_buffer(region)
        address = ctypes.addressof(view)
        del view  # the mapping cannot close while a view of it lives
        page = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        works = madvise(page, HUGE_PAGE_BYTES, _MADV_COLLAPSE) == 0
    return works
