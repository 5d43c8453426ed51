"""Give memory that the process has freed back to the system.

glibc keeps freed heap memory for reuse instead of returning it: after a network's ONNX export
and two runtime sessions of a model with 500 MB of weights are freed, the process still holds
1.3 GB of heap (wide_resnet101_2), which the next, larger allocation may not fit into. Peak memory
then grows round by round. ``malloc_trim`` returns it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Any, Optional


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[Any]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Collect reference cycles (an fx module is one: its graph points back at it), then return the
    freed heap to the system where the C library can (glibc); elsewhere only the collection."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
