"""Let glibc keep freed memory for reuse during CPU inference.

PyTorch's CPU allocator asks ``malloc`` for every activation anew. With glibc's
defaults each large block (a U-Net activation of a batch of 256-px tiles is
tens of MB) is a fresh ``mmap`` whose pages the kernel must fault in and zero,
and is unmapped again on ``free``. On the project's 2-core benchmark machine
that page traffic is about half of the model's CPU forward time
(``docs/benchmarks.md``). Telling glibc to serve large blocks from its heap
(``M_MMAP_MAX = 0``) and not to give freed heap back to the OS below 1 GiB
(``M_TRIM_THRESHOLD``) lets every batch reuse the pages of the previous one.

The cost: the process keeps up to its peak inference memory (hundreds of MB for
the default model and batch size) after a run instead of returning it. The
setting is process-wide and applied once; ``NAPARI_FEDDP_KEEP_FREED_MEMORY=0``
turns it off. Other platforms and C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

ENV = "NAPARI_FEDDP_KEEP_FREED_MEMORY"

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 1 << 30

_lock = threading.Lock()
_state: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the glibc settings once per process; True when they are in effect."""
    global _state
    with _lock:
        if _state is None:
            _state = _apply()
        return _state


def _apply() -> bool:
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
