"""Let glibc keep freed memory for reuse during CPU inference.

With glibc's defaults every large block PyTorch's CPU allocator asks for (a U-Net
activation of a batch of tiles is tens of MB) is a fresh ``mmap`` whose pages the kernel
must fault in and zero: about half of the model's CPU forward time on the 2-core benchmark
machine (``docs/benchmarks.md``). Serving large blocks from the heap (``M_MMAP_MAX = 0``)
and keeping up to 1 GiB of freed heap (``M_TRIM_THRESHOLD``) lets every batch reuse the
pages of the previous one, at the cost of keeping the peak inference memory after a run.
Process-wide, applied once; ``NAPARI_FEDDP_KEEP_FREED_MEMORY=0`` turns it off. Other
platforms and C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

ENV = "NAPARI_FEDDP_KEEP_FREED_MEMORY"

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the glibc settings once per process; True when they are in effect."""
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt tuning)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)) and bool(mallopt(_M_MMAP_MAX, 0))
