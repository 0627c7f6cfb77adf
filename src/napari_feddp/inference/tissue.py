"""Find tissue on a low-resolution view of a slide, so background is never predicted.

The mask comes from colour saturation, which separates stained tissue from
glass better than brightness does (glass is bright *and* grey; pale tissue is
bright but pink or purple): Otsu's threshold on saturation, clamped to a range
that holds for H&E, combined with a small optical-density floor that rejects
tinted but transparent glass; then small specks are removed, small holes filled
and the mask grown by a margin so that tissue borders are always predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from scipy import ndimage
from skimage import morphology
from skimage.filters import threshold_otsu

from ..slides import Slide
from ._reader import as_slide
from .errors import InferenceError

#: Resolution of the tissue mask, micrometres per pixel.
TISSUE_MPP = 8.0
#: Level-0 pixel size assumed when the slide does not say (a 20x scan).
ASSUMED_MPP = 0.5
#: The thumbnail's longest side never exceeds this, so its memory is bounded
#: (a 2048 x 2048 thumbnail of a 100k-pixel slide at 0.25 um/px is 12 um/px:
#: still several mask pixels per tile).
MAX_THUMBNAIL_SIDE = 2048
#: Otsu's threshold on saturation (0-1) is clamped to this range for H&E.
SATURATION_RANGE = (0.05, 0.15)
#: Mean optical density below which a pixel is glass, whatever its hue
#: (OD 0.10 is a mean channel value of about 231 of 255).
MIN_OPTICAL_DENSITY = 0.10


@dataclass(frozen=True)
class TissueMask:
    """A boolean ``(h, w)`` tissue ``mask`` with ``downsample`` ``(y, x)`` level-0 pixels per mask
    pixel, and the saturation ``threshold`` used (None when the mask was given by the user)."""

    mask: np.ndarray
    downsample: tuple[float, float]
    threshold: float | None = None

    @property
    def fraction(self) -> float:
        """Fraction of the slide area covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @classmethod
    def from_array(cls, mask: Any, slide_shape: tuple[int, int]) -> TissueMask:
        """Wrap a user-drawn boolean mask that covers the whole slide at any resolution."""
        array = np.asarray(mask)
        if array.ndim != 2 or array.size == 0:
            raise InferenceError(f"tissue: expected a 2-D boolean mask, received shape {array.shape}")
        if array.dtype != bool:
            array = array != 0
        downsample = (slide_shape[0] / array.shape[0], slide_shape[1] / array.shape[1])
        return cls(array, downsample, None)

    def window_any(self, y0: float, x0: float, y1: float, x1: float) -> bool:
        """True when any mask pixel overlaps the level-0 box ``[y0, y1) x [x0, x1)``."""
        dy, dx = self.downsample
        h, w = self.mask.shape
        my0, mx0 = max(int(math.floor(y0 / dy)), 0), max(int(math.floor(x0 / dx)), 0)
        my1, mx1 = min(int(math.ceil(y1 / dy)), h), min(int(math.ceil(x1 / dx)), w)
        return my0 < my1 and mx0 < mx1 and bool(self.mask[my0:my1, mx0:mx1].any())

    def sample(self, shape: tuple[int, int], cell: tuple[float, float] = (1.0, 1.0),
               origin: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """The mask at the centres of a ``shape`` grid of cells (nearest neighbour).

        Cell ``(i, j)`` is ``cell`` level-0 pixels a side, its corner at level-0
        ``origin + (i, j) * cell``; the defaults give the mask at full resolution.
        """
        rows = ((origin[0] + (np.arange(shape[0]) + 0.5) * cell[0]) / self.downsample[0]).astype(np.int64)
        cols = ((origin[1] + (np.arange(shape[1]) + 0.5) * cell[1]) / self.downsample[1]).astype(np.int64)
        h, w = self.mask.shape
        return self.mask[np.ix_(np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1))]


def tissue_mask(
    rgb: np.ndarray,
    *,
    mpp: float = TISSUE_MPP,
    min_object_um2: float = 5_000.0,
    max_hole_um2: float = 100_000.0,
    margin_um: float = 16.0,
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a ``(h, w, 3)`` uint8 thumbnail of ``mpp`` µm per pixel, and the
    saturation threshold (0-1) that was applied.

    Tissue pieces smaller than ``min_object_um2`` (dust, specks) are dropped, holes smaller
    than ``max_hole_um2`` inside tissue (lumens, fat) filled, and the mask is grown by
    ``margin_um`` so that tissue borders are predicted.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InferenceError(f"tissue_mask: expected a (h, w, 3) uint8 image, received {rgb.shape} {rgb.dtype}")
    saturation, dense = _saturation_and_density(rgb)
    threshold = _saturation_threshold(saturation)
    mask = (saturation >= round(threshold * 255)) & dense
    del saturation, dense
    mask = ndimage.binary_opening(mask, structure=np.ones((2, 2), bool))  # salt noise
    area = mpp * mpp
    mask = morphology.remove_small_objects(mask, max_size=max(int(min_object_um2 / area), 1))
    mask = _fill_small_holes(mask, max(int(max_hole_um2 / area), 1))
    margin = int(round(margin_um / mpp))
    if margin > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, structure=morphology.disk(margin))
    return mask, threshold


def detect_tissue(
    image: Any,
    *,
    mpp: float | tuple[float, float] | None = None,
    target_mpp: float = TISSUE_MPP,
    **kwargs: Any,
) -> TissueMask:
    """Tissue mask of a slide or ``(Y, X, 3)`` uint8 array, computed on a view at ``target_mpp``.

    ``mpp`` (level-0 µm per pixel) overrides the slide's own; ``kwargs`` go to :func:`tissue_mask`.

    Raises
    ------
    InferenceError
        If no tissue is found.
    """
    slide = as_slide(image, mpp)
    level0_mpp = slide.mpp[0] if slide.mpp else ASSUMED_MPP
    thumbnail, downsample = read_thumbnail(slide, target_mpp / level0_mpp)
    thumb_mpp = level0_mpp * downsample[0]
    mask, threshold = tissue_mask(thumbnail, mpp=thumb_mpp, **kwargs)
    if not mask.any():
        raise InferenceError(
            f"no tissue found: expected stained tissue (saturation >= {threshold:.2f} and mean optical "
            f"density >= {MIN_OPTICAL_DENSITY}) on a {thumbnail.shape[1]}x{thumbnail.shape[0]} thumbnail, "
            "received only background; pass tissue=False to predict every tile"
        )
    return TissueMask(mask, downsample, threshold)


def read_thumbnail(slide: Slide, downsample: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Read ``slide`` at about ``downsample`` (level-0 px per thumbnail px).

    Uses the coarsest pyramid level at least as fine as asked for, then a
    block mean streamed through dask, so memory stays at the thumbnail's size.
    The thumbnail's longest side is capped at :data:`MAX_THUMBNAIL_SIDE`.
    """
    height, width = slide.shape
    downsample = max(downsample, max(height, width) / MAX_THUMBNAIL_SIDE, 1.0)
    downsamples = [max(d) for d in slide.downsamples]
    level = max((i for i, d in enumerate(downsamples) if d <= downsample * 1.01), key=downsamples.__getitem__)
    array = slide.levels[level]
    factor = max(int(downsample / downsamples[level]), 1)
    if factor > 1:
        array = _block_mean(array, factor)
    if isinstance(array, da.Array):
        thumbnail = array.compute()
    else:
        thumbnail = np.asarray(array)
    thumbnail = np.ascontiguousarray(thumbnail, dtype=np.uint8)
    return thumbnail, (height / thumbnail.shape[0], width / thumbnail.shape[1])


def _block_mean(array: Any, factor: int) -> da.Array:
    if not isinstance(array, da.Array):
        array = da.from_array(array, chunks=(2048, 2048, 3), name=False)
    height, width = (array.shape[0] // factor) * factor, (array.shape[1] // factor) * factor
    if height == 0 or width == 0:
        raise InferenceError(f"image: expected at least {factor}x{factor} pixels for a thumbnail, received {array.shape}")
    side = factor * max(1, 1024 // factor)
    even = array[:height, :width].rechunk((side, side, 3))
    reduced = da.coarsen(np.mean, even, {0: factor, 1: factor}, trim_excess=True, dtype=np.float32)
    return reduced.round().astype(np.uint8)


def _saturation_and_density(rgb: np.ndarray, rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Saturation (0-255, uint8) and "dense enough" flags, computed in strips to bound memory."""
    height = rgb.shape[0]
    saturation = np.empty(rgb.shape[:2], np.uint8)
    dense = np.empty(rgb.shape[:2], bool)
    # Mean OD >= t  <=>  sum of log(I + 1) <= 3 * (log(256) - t).
    limit = 3 * (math.log(256.0) - MIN_OPTICAL_DENSITY)
    log_table = np.log(np.arange(1, 257, dtype=np.float32))
    for start in range(0, height, rows):
        block = rgb[start : start + rows]
        high = block.max(axis=2)
        low = block.min(axis=2)
        sat = (high - low).astype(np.float32) / np.maximum(high, 1)
        saturation[start : start + rows] = np.round(sat * 255).astype(np.uint8)
        dense[start : start + rows] = log_table[block].sum(axis=2) <= limit
    return saturation, dense


def _fill_small_holes(mask: np.ndarray, max_size: int) -> np.ndarray:
    """Fill background pieces enclosed by tissue with at most ``max_size`` pixels.

    Unlike ``skimage.morphology.remove_small_holes``, background touching the
    image border is never a hole (an all-glass thumbnail stays empty).
    """
    holes = ndimage.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    labels, count = ndimage.label(holes)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    small = sizes <= max_size
    small[0] = False
    return mask | small[labels]


def _saturation_threshold(saturation: np.ndarray) -> float:
    low, high = SATURATION_RANGE
    counts = np.bincount(saturation.ravel(), minlength=256)
    if np.count_nonzero(counts) < 2:
        return low
    otsu = threshold_otsu(hist=(counts, np.arange(256))) / 255.0
    return float(min(max(otsu, low), high))
