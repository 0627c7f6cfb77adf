"""Small real TIFF files written on the fly for reader tests (no mocks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def tissue_like_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth pinkish RGB texture (compresses like tissue, not like noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 180 + 40 * np.sin(yy / 37.0) * np.cos(xx / 23.0)
    noise = rng.integers(0, 12, size=(height, width))
    rgb = np.stack([base + noise, base * 0.7 + noise, base * 0.9 + noise], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_pyramid(
    path: Path,
    image: np.ndarray,
    *,
    levels: int = 3,
    tile: int = 256,
    compression: str | int = "zlib",
    description: str | None = None,
    resolution: tuple[float, float] | None = None,
    ome: bool = False,
    metadata: dict | None = None,
    extratags=(),
) -> Path:
    """Write ``image`` as a tiled pyramidal TIFF with SubIFDs (like bfconvert/QuPath)."""
    pyramid = [image]
    for _ in range(levels - 1):
        pyramid.append(pyramid[-1][::2, ::2])
    options = dict(tile=(tile, tile), compression=compression, photometric="rgb")
    if resolution is not None:
        options.update(resolution=resolution, resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=False, ome=ome) as writer:
        writer.write(
            pyramid[0], subifds=levels - 1, description=description,
            metadata=metadata if ome else None, extratags=extratags, **options,
        )
        for level in pyramid[1:]:
            writer.write(level, subfiletype=1, metadata=None, **options)
    return path
