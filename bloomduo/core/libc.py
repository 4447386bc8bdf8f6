"""The C library's memory calls that torch does not wrap (madvise, malloc_trim, mallopt), for Linux and glibc.

Where they are missing (another OS, another libc) each call reports so and changes nothing.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import sys


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def madvise(address: int, length: int, advice: int) -> int:
    """madvise(2) on [address, address + length) (address page-aligned): 0, or the errno it failed with
    (ENOSYS where there is no madvise)."""
    libc = _libc()
    if libc is None:
        return errno.ENOSYS
    return 0 if libc.madvise(address, length, advice) == 0 else ctypes.get_errno()


def malloc_trim() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt(3)'s parameter numbers
_MAX_HEAP_BLOCK = 32 << 20  # the largest M_MMAP_THRESHOLD glibc accepts on 64-bit


def keep_freed_heap(top_bytes: int) -> bool:
    """Serve blocks of up to 32 MiB from the heap, and keep up to `top_bytes` freed at its top for the next
    ones (glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD); False where mallopt is missing.

    A serving step makes and drops buffers of a few MiB (sampled rows' logits, their wire bytes). glibc's
    defaults map such a block fresh and give it back when freed, or trim the heap under it, so each of its
    4 KiB pages faults in again on the next step: ~3500 faults a 16-row step in a worker and as many in the
    gateway, ~20 ms of a 150 ms step on a virtual machine. Calling this again changes the amount kept.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MAX_HEAP_BLOCK) and mallopt(_M_TRIM_THRESHOLD, top_bytes))


def one_arena() -> bool:
    """Have every thread that has not allocated yet take its blocks from glibc's main heap (M_ARENA_MAX 1);
    False where mallopt is missing. Call it before the process starts threads.

    A shard worker loads its weights on its step thread, whose own arena is a string of 64 MiB heaps: the
    weights land in pieces with gaps, so fewer whole 2 MiB pages lie in their runs (host_memory's huge
    pages: 163-214 of a bloom-560m int8 rank's 282 MB, against 206-279 in one arena) and what loading
    freed stays spread over the arenas (worker RSS 764-772 MiB, against 729-747). The worker's other
    threads allocate little, so one arena costs them no contention worth measuring.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, 1))
