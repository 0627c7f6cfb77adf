"""Read one tile of the processing grid from the slide, resampled when needed."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._source import ImageSource, read_region
from .tiling import Geometry

#: Pixel value outside the image (white, like glass).
PAD_VALUE = 255


class TileReader:
    """Callable returning the ``(T, T, 3)`` uint8 tile whose top-left is ``(y, x)``.

    Thread-safe: the engine calls it from its prefetch threads.
    """

    def __init__(self, source: ImageSource, geometry: Geometry, tile_size: int) -> None:
        self.array = source.tile_array(geometry.level)
        self.scale = geometry.scale
        self.tile_size = tile_size

    def __call__(self, y: int, x: int) -> np.ndarray:
        size = self.tile_size
        if not self._resampled:
            return read_region(self.array, y, y + size, x, x + size, PAD_VALUE)
        fy, fx = self.scale
        y0, y1 = int(round(y * fy)), int(round((y + size) * fy))
        x0, x1 = int(round(x * fx)), int(round((x + size) * fx))
        region = read_region(self.array, y0, max(y1, y0 + 1), x0, max(x1, x0 + 1), PAD_VALUE)
        return resize_rgb(region, size)

    @property
    def _resampled(self) -> bool:
        return self.scale != (1.0, 1.0)


def resize_rgb(region: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a ``(h, w, 3)`` uint8 image to ``(size, size, 3)`` (or ``size = (height, width)``),
    antialiased bilinear."""
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    tensor = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1)[None].float()
    antialias = region.shape[0] > height or region.shape[1] > width
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)
    return resized[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
