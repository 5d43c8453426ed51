"""Freed memory goes back to the system (glibc keeps freed heap for reuse unless asked)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dpcompress.memory import _libc, release_freed_memory


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(_libc() is None or not os.path.exists("/proc/self/statm"), reason="needs glibc and /proc")
def test_freed_heap_is_given_back():
    # 300 MB in 64 KiB arrays: below the size glibc serves from mmap, so they live on the heap;
    # every other one stays alive, so the freed half is holes the heap cannot simply shrink past.
    arrays = [np.ones(8192) for _ in range(4800)]
    kept = arrays[1::2]
    del arrays
    held = resident_mb()
    release_freed_memory()
    assert resident_mb() < held - 100
    assert all(a[0] == 1.0 for a in kept)
