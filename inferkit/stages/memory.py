"""Keep the C heap from growing across the many equal-sized activations of layer-wise runs."""

from __future__ import annotations

import ctypes
import sys

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def limit_heap_fragmentation(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations over ``threshold_bytes`` with mmap, returned to the OS when freed.

    glibc raises its mmap threshold after large frees (up to 32 MiB), after which per-batch
    activations land in the heap and fragment it: resident memory then grew by ~60 MB per
    decoder layer in sequential GPTQ. A fixed threshold stops that. No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False
