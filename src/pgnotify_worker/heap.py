"""Give freed heap memory back to the operating system while the worker runs (glibc only).

A drain allocates and frees many mid-sized blocks (asyncio reads each socket into a fresh 256 KiB
buffer and shrinks it, responses are parsed, rows decoded); glibc keeps the freed pages between
live blocks, so a worker's RSS crept ~5 MB over a 25,000-row drain. malloc_trim(0) returns every
free page of the heap (~0.3 ms for a worker's heap), so the worker calls it every few seconds.
Pinning glibc's mmap threshold instead (mallopt) capped the creep too but made every socket read
an mmap/munmap pair: ~50 µs more CPU per read on a cloud VM (bench/results/memory.md)."""

from __future__ import annotations

import asyncio
import ctypes
import sys
from collections.abc import Callable

TRIM_INTERVAL = 2.0  # seconds


def trimmer() -> Callable[[], object] | None:
    """malloc_trim(0) of the C library, or None where there is none (musl, macOS)."""
    if sys.platform != "linux":
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


async def trim_loop(interval: float = TRIM_INTERVAL) -> None:
    """Trim the heap every `interval` seconds, for as long as the worker runs."""
    trim = trimmer()
    if trim is None:
        return
    while True:
        await asyncio.sleep(interval)
        trim()
