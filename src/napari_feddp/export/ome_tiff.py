"""Write label maps as tiled, compressed, pyramidal OME-TIFF (streamed, never whole)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile

from .._atomic import atomic_path

#: Tile side in pixels for every level; 256 is what QuPath and OpenSlide expect.
TILE = 256
#: Levels are added until the longest side is at most this.
COARSEST_SIDE = 1024
#: OME-TIFF has no 64-bit integer type; larger label ids are refused, not wrapped.
_SAFE_DTYPES = (np.uint8, np.uint16, np.uint32, np.int8, np.int16, np.int32)


def write_ome_labels(
    path: str | os.PathLike,
    labels,
    *,
    mpp: tuple[float, float] | None = None,
    name: str = "labels",
    compression: str = "zlib",
    offset: tuple[int, int] = (0, 0),
) -> Path:
    """Write a 2-D label image as a pyramidal OME-TIFF.

    Parameters
    ----------
    path : str or PathLike
        Output file; should end with ``.ome.tif`` or ``.ome.tiff``.
    labels : array-like or sequence of array-like
        ``(Y, X)`` integer labels (numpy, dask or zarr), or multiscale levels
        (a list, a tuple, napari's ``MultiScaleData``) whose first element is
        level 0; coarser levels are recomputed by nearest-neighbour
        subsampling so that every level is tile-aligned.
    mpp : (float, float), optional
        ``(y, x)`` micrometres per level-0 pixel, stored as OME
        ``PhysicalSizeY/X`` and as TIFF resolution tags.
    name : str
        OME image name.
    compression : str
        Any tifffile compression; lossless ``zlib`` by default.
    offset : (int, int)
        ``(row, col)`` where ``labels`` starts in the written image; the rows
        and columns before it are written as 0, so that a crop of a label map
        is saved where it lies over the slide.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    # Any sequence is a list of levels (napari hands multiscale layers over as
    # MultiScaleData); arrays (numpy, dask, zarr) are not sequences.
    if isinstance(labels, Sequence):
        if len(labels) == 0:
            raise ValueError("labels: expected an array or a non-empty list of levels, received an empty sequence")
        labels = labels[0]
    level0 = labels if isinstance(labels, da.Array) else da.asarray(labels)
    if level0.ndim != 2:
        raise ValueError(f"labels must be 2-D (Y, X); got shape {tuple(level0.shape)}")
    if not np.issubdtype(level0.dtype, np.integer) and level0.dtype != bool:
        raise ValueError(f"labels must have an integer dtype; got {level0.dtype}")
    if level0.dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    elif level0.dtype in _SAFE_DTYPES:
        dtype = np.dtype(level0.dtype)
    else:  # 64-bit ids: written as 32 bits when they fit (checked strip by strip)
        dtype = np.dtype(np.uint32 if np.issubdtype(level0.dtype, np.unsignedinteger) else np.int32)
    top, left = (int(v) for v in offset)
    if top < 0 or left < 0:
        raise ValueError(f"offset: expected (row, col) >= 0, received {tuple(offset)}")
    if top or left:
        level0 = da.pad(level0, ((top, 0), (left, 0)))
    levels = [level0]
    while max(levels[-1].shape) > COARSEST_SIDE:
        levels.append(levels[-1][::2, ::2])

    metadata: dict = {"axes": "YX", "Name": name}
    options: dict = {"tile": (TILE, TILE), "compression": compression, "dtype": dtype}
    if mpp is not None:
        metadata.update(
            PhysicalSizeY=float(mpp[0]), PhysicalSizeYUnit="µm",
            PhysicalSizeX=float(mpp[1]), PhysicalSizeXUnit="µm",
        )
        options.update(resolution=(1e4 / mpp[1], 1e4 / mpp[0]), resolutionunit="CENTIMETER")

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as writer:
        writer.write(
            _tiles(levels[0], dtype), shape=levels[0].shape,
            subifds=len(levels) - 1, metadata=metadata, **options,
        )
        for level in levels[1:]:
            writer.write(_tiles(level, dtype), shape=level.shape, subfiletype=1, metadata=None, **options)
    return path


def _tiles(level: da.Array, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Yield ``TILE x TILE`` tiles in row-major order, one strip of tiles at a time."""
    height, width = level.shape
    info = np.iinfo(dtype)
    for y in range(0, height, TILE):
        strip = level[y : y + TILE].compute()
        if strip.size and (strip.max() > info.max or strip.min() < info.min):
            raise ValueError(
                f"label values in rows {y}-{y + TILE} do not fit in {dtype} "
                f"(range {strip.min()}..{strip.max()}); OME-TIFF has no 64-bit integers"
            )
        strip = strip.astype(dtype, copy=False)
        for x in range(0, width, TILE):
            tile = np.zeros((TILE, TILE), dtype)
            part = strip[:, x : x + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile
