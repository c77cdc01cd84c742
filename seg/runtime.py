"""Process-level settings that scripts opt into at start-up; the library never calls these."""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters, glibc's malloc.h


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Tells glibc's malloc to reuse freed blocks up to `limit` bytes instead of handing them
    back to the kernel.

    By default glibc serves big allocations with fresh mmap pages and trims freed memory, with
    thresholds that drift with the allocation history. A training step frees and re-allocates
    the same large tensors every step, so the kernel faults the same pages in again: measured
    on UNet's Adam update, 18-42k page faults and 2-3x the arithmetic's time, for torch.optim
    as much as for ours. Returns False where the C library is not glibc (then nothing changes).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
