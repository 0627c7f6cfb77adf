"""Lazily computed pyramid for slides stored at a single resolution."""

from __future__ import annotations

import dask.array as da
import numpy as np

#: Stop adding levels once the longest side is at most this many pixels.
COARSEST_SIDE = 1024
#: Chunk side used for computed levels: large enough to keep the task graph
#: small, small enough that one task stays a few MB.
LEVEL_CHUNK = 512


def lazy_pyramid(level0: da.Array, *, labels: bool = False) -> list[da.Array]:
    """Return ``[level0, level0/2, level0/4, ...]`` as lazy dask arrays.

    Each level is the 2x2 mean of the one above (nearest neighbour for label
    images, where averaging would invent labels), so computing a coarse view
    streams through level 0 chunk by chunk instead of loading it whole.
    """
    levels = [level0]
    while max(levels[-1].shape[:2]) > COARSEST_SIDE:
        levels.append(_halve(levels[-1], labels=labels))
    return levels


def _halve(array: da.Array, *, labels: bool) -> da.Array:
    if labels:
        return array[::2, ::2].rechunk((LEVEL_CHUNK, LEVEL_CHUNK))
    height, width = (array.shape[0] // 2) * 2, (array.shape[1] // 2) * 2
    even = array[:height, :width].rechunk((2 * LEVEL_CHUNK, 2 * LEVEL_CHUNK) + array.shape[2:])
    axes = {0: 2, 1: 2}
    return da.coarsen(np.mean, even, axes, trim_excess=True).round().astype(array.dtype)
