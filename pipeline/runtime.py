"""Process set-up shared by every command: offline hub access and glibc's handling of freed memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def offline_by_default() -> None:
    """The embedded default never talks to a hub; a user pointing --model at a hub id unsets this."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel.

    Every batch allocates and frees the same large activation buffers; by default glibc hands each one
    back (munmap / trim) and the next batch page-faults it in again (bench/results/precompute.json
    measures the difference). Resident memory stays at its peak, which the first batch reaches anyway.
    No effect (False) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD in malloc.h
    # 32 MiB is glibc's largest mmap threshold on 64-bit: only larger blocks still go to mmap.
    return bool(libc.mallopt(trim_threshold, 1 << 30)) and bool(libc.mallopt(mmap_threshold, 32 << 20))
