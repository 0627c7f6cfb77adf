"""Where to read: pyramid level, resampling, and the grid of tiles to predict."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..slides import Slide
from .errors import InferenceError
from .tissue import TissueMask

#: A level whose pixel size is within this fraction of the model's is used
#: without resampling.
MPP_TOLERANCE = 0.10
#: Side of output chunks.
CHUNK_TARGET = 512


@dataclass(frozen=True)
class Geometry:
    """How the processing grid (the model's resolution) maps onto the slide.

    Attributes
    ----------
    level : int
        Pyramid level read.
    scale : (float, float)
        Level pixels per processing pixel, ``(y, x)``; ``(1, 1)`` means the
        level is used as it is, otherwise tiles are resampled.
    shape : (int, int)
        Processing grid (and label map) ``(height, width)``.
    downsample : (float, float)
        Level-0 pixels per processing pixel, ``(y, x)``.
    """

    level: int
    scale: tuple[float, float]
    shape: tuple[int, int]
    downsample: tuple[float, float]

    @property
    def resampled(self) -> bool:
        """True when tiles are resized from the level's pixels."""
        return self.scale != (1.0, 1.0)


def choose_geometry(slide: Slide, target_mpp: float | None) -> Geometry:
    """Pick the level to read and the resampling that brings it to ``target_mpp``.

    Like OpenSlide's ``get_best_level_for_downsample``, the coarsest level that is
    at least as fine as the model (within :data:`MPP_TOLERANCE`) is read, so
    tiles are downsampled, never blurred by upsampling, unless the model wants
    finer pixels than level 0 has. Only levels stored in the file count: a
    computed level is recomputed from level 0 for every tile that overlaps its
    chunks, so reading level 0 and resizing each tile once is cheaper.
    ``target_mpp=None`` reads level 0 as it is.

    Raises
    ------
    InferenceError
        If ``target_mpp`` is given but the slide's pixel size is unknown.
    """
    height, width = slide.shape
    if target_mpp is None:
        return Geometry(0, (1.0, 1.0), (height, width), (1.0, 1.0))
    if slide.mpp is None:
        raise InferenceError(
            f"mpp: the model expects {target_mpp} um/px but the image has no pixel size; "
            "pass mpp=<micrometres per level-0 pixel> to segment_slide"
        )
    stored = len(slide.levels) if slide.pyramid_in_file else 1
    mpps = [slide.level_mpp(i) for i in range(stored)]
    fine_enough = [i for i, m in enumerate(mpps) if max(m) <= target_mpp * (1 + MPP_TOLERANCE)]
    level = max(fine_enough, key=lambda i: max(mpps[i])) if fine_enough else 0
    snapped = [1.0 if abs(target_mpp / m - 1.0) <= MPP_TOLERANCE else float(target_mpp / m) for m in mpps[level]]
    level_h, level_w = int(slide.levels[level].shape[0]), int(slide.levels[level].shape[1])
    if snapped == [1.0, 1.0]:
        shape = (level_h, level_w)
        scale = (1.0, 1.0)
    else:
        shape = (max(int(round(level_h / snapped[0])), 1), max(int(round(level_w / snapped[1])), 1))
        # The exact ratio of the two grids, so that tiles tile the level without drift.
        scale = (level_h / shape[0], level_w / shape[1])
    downsample = (height / shape[0], width / shape[1])
    return Geometry(level, scale, shape, downsample)


def grid_starts(length: int, tile: int, stride: int) -> np.ndarray:
    """Tile starts ``0, stride, 2 stride, ...``; the last tile ends exactly at ``length``.

    This is the grid of MONAI's ``sliding_window_inference`` and most tilers
    (so results can be compared tile for tile), with one change at the far
    end: when the last step would be shorter than half a stride, the last two
    steps share the slack. A squeezed last tile would overlap its neighbour
    almost entirely, and the band of rows the blender holds between tile rows
    grows with that overlap. Tiles stay inside the image (border pixels see
    real context); only an image smaller than one tile is padded.
    """
    if length <= tile:
        return np.zeros(1, dtype=np.int64)
    count = int(math.ceil((length - tile) / stride)) + 1
    starts = [min(i * stride, length - tile) for i in range(count)]
    if count >= 3 and starts[-1] - starts[-2] < stride / 2:
        starts[-2] = (starts[-3] + starts[-1]) // 2
    return np.asarray(starts, dtype=np.int64)


@dataclass(frozen=True)
class TilePlan:
    """Tiles to predict, on the processing grid ``shape``, in row-major order.

    ``ys``/``xs`` are the starts of every grid row / column (kept or not) and ``keep``
    ``(len(ys), len(xs))`` says which tiles are predicted; ``stride`` is the step between
    starts, ``chunks`` the output chunk shape (also the blender's column-block width) and
    ``window`` the part of the grid to label, ``(y0, x0, y1, x1)`` in processing pixels.
    """

    shape: tuple[int, int]
    tile_size: int
    stride: int
    ys: np.ndarray
    xs: np.ndarray
    keep: np.ndarray
    chunks: tuple[int, int]
    window: tuple[int, int, int, int] | None = None

    @property
    def n_tiles(self) -> int:
        """Number of tiles that will be predicted."""
        return int(self.keep.sum())

    @property
    def n_grid(self) -> int:
        """Number of tiles in the full grid."""
        return int(self.keep.size)

    def tiles(self) -> list[tuple[int, int]]:
        """``(row, column)`` grid indices of kept tiles, row-major."""
        rows, cols = np.nonzero(self.keep)
        return list(zip(rows.tolist(), cols.tolist()))

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left ``(y, x)`` of a tile on the processing grid."""
        return int(self.ys[row]), int(self.xs[col])


def plan_tiles(
    geometry: Geometry,
    tile_size: int,
    overlap: float,
    *,
    tissue: TissueMask | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> TilePlan:
    """Lay the grid of ``tile_size`` tiles overlapping by ``overlap`` (a fraction of the tile) on
    ``geometry``'s processing grid and keep those touching ``tissue`` and the level-0 ``region``
    (already clipped to the slide)."""
    stride = max(1, tile_size - int(round(overlap * tile_size)))
    height, width = geometry.shape
    ys, xs = grid_starts(height, tile_size, stride), grid_starts(width, tile_size, stride)
    keep = np.ones((len(ys), len(xs)), dtype=bool)
    dy, dx = geometry.downsample
    window = None
    if region is not None:
        y0, x0, y1, x1 = region
        window = (
            int(math.floor(y0 / dy)),
            int(math.floor(x0 / dx)),
            min(int(math.ceil(y1 / dy)), height),
            min(int(math.ceil(x1 / dx)), width),
        )
        rows = (ys < window[2]) & (ys + tile_size > window[0])
        cols = (xs < window[3]) & (xs + tile_size > window[1])
        keep &= rows[:, None] & cols[None, :]
    if tissue is not None:
        for i, j in zip(*np.nonzero(keep)):
            y, x = ys[i], xs[j]
            keep[i, j] = tissue.window_any(y * dy, x * dx, (y + tile_size) * dy, (x + tile_size) * dx)
    chunks = (min(CHUNK_TARGET, height), min(CHUNK_TARGET, width))
    return TilePlan((height, width), tile_size, stride, ys, xs, keep, chunks, window)
