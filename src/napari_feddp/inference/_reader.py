"""Read the slide on the processing grid: tiles and windows, resampled when needed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np

from ..resampling import resize_image
from ..slides import Slide, SlideError
from .errors import InferenceError

if TYPE_CHECKING:
    from .tiling import Geometry

#: Pixel value outside the image (white, like glass).
PAD_VALUE = 255


def as_slide(image: Slide | Any, mpp: float | tuple[float, float] | None = None) -> Slide:
    """``image`` as an RGB :class:`~napari_feddp.slides.Slide`: a slide as it is, an
    ``(Y, X, 3|4)`` uint8 array as :meth:`Slide.from_array`; ``mpp`` overrides its pixel size.

    Raises
    ------
    InferenceError
        If the image is not an RGB uint8 image or ``mpp`` is not positive.
    """
    try:
        slide = image if isinstance(image, Slide) else Slide.from_array(image)
        slide = slide if mpp is None else slide.with_mpp(mpp)
    except SlideError as exc:
        raise InferenceError(str(exc)) from None
    if slide.kind != "rgb":
        raise InferenceError(f"image: expected an RGB slide, received a slide of kind {slide.kind!r}")
    return slide


def read_region(array: Any, y0: int, y1: int, x0: int, x1: int, fill: int = PAD_VALUE) -> np.ndarray:
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


def read_scaled(array: Any, scale: tuple[float, float], top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """Rows ``top:bottom`` and columns ``left:right`` of a grid with ``scale`` level pixels
    per grid pixel ``(y, x)``: the level's pixels under them, resampled to the grid."""
    if scale == (1.0, 1.0):
        return read_region(array, top, bottom, left, right)
    y0, x0 = round(top * scale[0]), round(left * scale[1])
    y1, x1 = max(round(bottom * scale[0]), y0 + 1), max(round(right * scale[1]), x0 + 1)
    return resize_image(read_region(array, y0, y1, x0, x1), (bottom - top, right - left))


class TileReader:
    """Callable returning the ``(T, T, 3)`` uint8 tile whose top-left is ``(y, x)``.

    Thread-safe: the engine calls it from its prefetch threads.
    """

    def __init__(self, slide: Slide, geometry: Geometry, tile_size: int) -> None:
        self.array = slide.levels[geometry.level]
        self.scale = geometry.scale
        self.tile_size = tile_size

    def __call__(self, y: int, x: int) -> np.ndarray:
        return read_scaled(self.array, self.scale, y, x, y + self.tile_size, x + self.tile_size)
