"""Turn a :class:`~napari_feddp.slides.Slide` or an RGB array into levels the engine reads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from .errors import InferenceError


@dataclass(frozen=True)
class ImageSource:
    """A pyramid of RGB uint8 arrays, highest resolution first.

    Attributes
    ----------
    levels : list of array-like
        ``(Y, X, 3)`` uint8 arrays (numpy, dask or zarr), all lazy-friendly.
    downsamples : list of (float, float)
        ``(y, x)`` factor of each level relative to level 0.
    mpp : (float, float) or None
        Micrometres per level-0 pixel.
    region_levels : list of array-like or None
        Same pixels as ``levels``, cheaper to slice for small regions (a
        slide's :attr:`~napari_feddp.slides.Slide.layer_levels`: zarr where the
        file stores the level); tiles are read from these when given.
    """

    levels: list[Any]
    downsamples: list[tuple[float, float]]
    mpp: tuple[float, float] | None
    region_levels: list[Any] | None = None

    def tile_array(self, level: int) -> Any:
        """The array to read tiles of ``level`` from."""
        return (self.region_levels or self.levels)[level]

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(height, width)``."""
        return int(self.levels[0].shape[0]), int(self.levels[0].shape[1])

    def level_mpp(self, level: int) -> tuple[float, float] | None:
        """``(y, x)`` micrometres per pixel at ``level``, or None."""
        if self.mpp is None:
            return None
        dy, dx = self.downsamples[level]
        return (self.mpp[0] * dy, self.mpp[1] * dx)


def as_source(image: Any, mpp: float | tuple[float, float] | None = None) -> ImageSource:
    """Wrap ``image`` (a Slide, or a ``(Y, X, 3|4)`` uint8 array) as an :class:`ImageSource`.

    Parameters
    ----------
    image : Slide or array-like
        An opened slide, or a numpy / dask / zarr RGB(A) array.
    mpp : float or (float, float), optional
        Micrometres per level-0 pixel; overrides the slide's own value.

    Raises
    ------
    InferenceError
        If the image is not an RGB uint8 image or ``mpp`` is not positive.
    """
    override = _check_mpp(mpp)
    levels = getattr(image, "levels", None)
    if levels is not None and hasattr(image, "downsamples"):
        kind = getattr(image, "kind", "rgb")
        if kind != "rgb":
            raise InferenceError(f"image: expected an RGB slide, received a slide of kind {kind!r}")
        arrays = [_check_rgb(level, f"slide level {i}") for i, level in enumerate(levels)]
        downsamples = [(float(d[0]), float(d[1])) for d in image.downsamples]
        if getattr(image, "pyramid_in_file", True) is False:
            # Coarser levels are computed on the fly from level 0, chunk by chunk;
            # reading level 0 and resizing each tile once is cheaper than
            # recomputing those chunks for every overlapping tile.
            arrays, downsamples = arrays[:1], downsamples[:1]
        # A Slide's layer_levels hold the same pixels as its levels, as zarr where stored.
        layer_levels = getattr(image, "layer_levels", None)
        direct = list(layer_levels[: len(arrays)]) if layer_levels is not None else None
        return ImageSource(arrays, downsamples, override or _check_mpp(getattr(image, "mpp", None)), direct)
    return ImageSource([_check_rgb(image, "image")], [(1.0, 1.0)], override)


def _check_rgb(array: Any, what: str) -> Any:
    shape = getattr(array, "shape", None)
    dtype = getattr(array, "dtype", None)
    if shape is None or dtype is None:
        raise InferenceError(
            f"{what}: expected a Slide or an RGB array of shape (Y, X, 3) and dtype uint8, "
            f"received {type(array).__name__}"
        )
    if len(shape) != 3 or shape[2] not in (3, 4) or shape[0] < 1 or shape[1] < 1:
        raise InferenceError(f"{what}: expected shape (Y, X, 3) (RGB) or (Y, X, 4) (RGBA), received {tuple(shape)}")
    if np.dtype(dtype) != np.uint8:
        raise InferenceError(
            f"{what}: expected dtype uint8 (0-255 RGB), received {np.dtype(dtype)}; "
            "convert first, e.g. skimage.util.img_as_ubyte(image)"
        )
    if shape[2] == 4:
        array = array[..., :3]  # alpha carries no tissue information
    return array


def _check_mpp(mpp: Any) -> tuple[float, float] | None:
    if mpp is None:
        return None
    values = (mpp, mpp) if isinstance(mpp, (int, float)) else tuple(mpp)
    if len(values) != 2 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
    ):
        raise InferenceError(f"mpp: expected a positive number or (y, x) pair of micrometres per pixel, received {mpp!r}")
    return (float(values[0]), float(values[1]))


def read_region(array: Any, y0: int, y1: int, x0: int, x1: int, fill: int = 255) -> np.ndarray:
    """Read ``array[y0:y1, x0:x1]`` as numpy, padding with ``fill`` outside the array.

    Dask arrays are computed with the synchronous scheduler: this runs on the
    engine's own reader threads, and nested thread pools would only contend.
    """
    height, width = int(array.shape[0]), int(array.shape[1])
    cy0, cy1 = max(y0, 0), min(y1, height)
    cx0, cx1 = max(x0, 0), min(x1, width)
    out_shape = (y1 - y0, x1 - x0, 3)
    if cy0 >= cy1 or cx0 >= cx1:
        return np.full(out_shape, fill, dtype=np.uint8)
    crop = array[cy0:cy1, cx0:cx1]
    if isinstance(crop, da.Array):
        crop = crop.compute(scheduler="synchronous")
    crop = np.asarray(crop, dtype=np.uint8)
    if crop.shape == out_shape:
        return crop
    out = np.full(out_shape, fill, dtype=np.uint8)
    out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = crop
    return out
