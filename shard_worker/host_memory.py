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
