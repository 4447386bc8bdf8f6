"""The C library's memory calls that torch does not wrap (madvise, malloc_trim), for Linux and glibc.

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
