"""Synthetic whole-slide images for benchmarks, built from real H&E tissue.

Every file is cached (never inside the repository) under
``$FEDDP_BENCH_CACHE`` or ``~/.cache/napari-feddp/benchmarks`` and rebuilt only
when missing, so later benchmarks can call these helpers freely::

    from _synthetic import pyramidal_jpeg_tiff, jpeg2000_svs, cmu1_path
    path = pyramidal_jpeg_tiff(20_000)        # 20k x 20k, 8 bit RGB, JPEG tiles
    jp2k = jpeg2000_svs()                      # lossless JPEG 2000 copy of CMU-1

How the big slides are made fast on a small machine: a pool of distinct
256 x 256 tiles is cut from the real CMU-1 sample (all 8 flips/rotations of
every tile that holds tissue, at 1x, 1/2 and 1/4 scale), each tile is JPEG
encoded **once**, and the pyramid is written by streaming those pre-encoded
bytes (``TiffWriter.write`` with an iterator of bytes, ``compression='jpeg'``,
``tile=``). A 100,000 x 100,000 slide therefore costs disk bandwidth, not
150,000 JPEG encodes.

Layout of :func:`pyramidal_jpeg_tiff`: a BigTIFF whose first page is level 0
and whose reduced levels (each half the size of the one above, down to a
longest side <= 2048) are SubIFDs of it, the way bfconvert, QuPath and
``tifffile`` write generic pyramids. Resolution tags carry the CMU-1 pixel size
(0.499 um). The tiles of each level come from tissue at a matching scale but
a level is *not* an exact downsample of the level above: these files are for
timing, not for checking pixels.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

#: The real Aperio H&E sample every synthetic slide is made from.
CMU1_CANDIDATES = (
    os.environ.get("FEDDP_CMU1", ""),
    "/work/shared/data/slides/CMU-1-Small-Region.svs",
    str(Path(__file__).resolve().parents[1] / "src/napari_feddp/data/CMU-1-Small-Region.svs"),
)
MPP = 0.499
TILE = 256
JPEG_QUALITY = 80
#: Stop adding pyramid levels once the longest side is at most this.
COARSEST_MAX_SIDE = 2048
#: A tile counts as tissue when at least this fraction of its pixels is not
#: bright background.
MIN_TISSUE_FRACTION = 0.5
#: Bump when the layout of generated files changes, so stale caches are not used.
FORMAT_VERSION = 1


def cache_dir() -> Path:
    """Folder for generated slides (created on demand)."""
    root = os.environ.get("FEDDP_BENCH_CACHE") or Path.home() / ".cache/napari-feddp/benchmarks"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cmu1_path() -> Path:
    """Path of the CMU-1-Small-Region.svs sample (env ``FEDDP_CMU1`` overrides)."""
    for candidate in CMU1_CANDIDATES:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("CMU-1-Small-Region.svs not found; set FEDDP_CMU1 to its path")


@lru_cache(maxsize=1)
def cmu1_pixels() -> np.ndarray:
    """Level 0 of CMU-1-Small-Region as a (2967, 2220, 3) uint8 array."""
    with tifffile.TiffFile(cmu1_path()) as tif:
        return tif.series[0].levels[0].asarray()


def _downscale(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8)


def tissue_tiles(scale: int = 1, tile: int = TILE) -> list[np.ndarray]:
    """Distinct ``tile`` x ``tile`` RGB tiles of CMU-1 tissue at 1/``scale`` size.

    Each tile with enough tissue is returned in all 8 flips/rotations.
    """
    image = _downscale(cmu1_pixels(), scale)
    tiles = []
    for y in range(0, image.shape[0] - tile + 1, tile):
        for x in range(0, image.shape[1] - tile + 1, tile):
            t = image[y : y + tile, x : x + tile]
            if (t.min(axis=2) < 200).mean() < MIN_TISSUE_FRACTION:
                continue
            for k in range(4):
                r = np.rot90(t, k)
                tiles.append(np.ascontiguousarray(r))
                tiles.append(np.ascontiguousarray(r[:, ::-1]))
    if not tiles:
        raise RuntimeError("no tissue tiles found in CMU-1")
    return tiles


def encode_jpeg(tile: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes exactly as ``tifffile`` writes an RGB tile with compression='jpeg'."""
    return imagecodecs.jpeg8_encode(
        tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
    )


def _level_shapes(side: int) -> list[tuple[int, int]]:
    shapes = [(side, side)]
    while max(shapes[-1]) > COARSEST_MAX_SIDE:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _tile_stream(shape: tuple[int, int], pool: list[bytes], seed: int) -> Iterator[bytes]:
    """Pre-encoded tiles for an image of ``shape``, row by row, in random pool order."""
    rows, cols = -(-shape[0] // TILE), -(-shape[1] // TILE)
    rng = np.random.default_rng(seed)
    for _ in range(rows):
        for index in rng.integers(0, len(pool), cols):
            yield pool[index]


def jpeg_level_options(level: int, n_levels: int, tile: int = TILE) -> dict:
    """``TiffWriter.write`` options of pyramid level ``level`` of ``n_levels``: JPEG tiles,
    coarser levels as SubIFDs of level 0, resolution in pixels per cm at :data:`MPP` x 2**level."""
    per_cm = 1e4 / MPP / 2**level
    return {
        "tile": (tile, tile),
        "compression": "jpeg",
        "photometric": "rgb",
        "subsampling": (2, 2),
        "subifds": n_levels - 1 if level == 0 else None,
        "subfiletype": 1 if level else 0,
        "resolution": (per_cm, per_cm),
        "resolutionunit": "CENTIMETER",
        "metadata": None,
    }


def pyramidal_jpeg_tiff(side: int, *, path: Path | None = None, verbose: bool = True) -> Path:
    """Return a cached ``side`` x ``side`` pyramidal JPEG TIFF of real tissue."""
    path = Path(path) if path else cache_dir() / f"synthetic-{side}-jpeg-v{FORMAT_VERSION}.tif"
    if path.is_file():
        return path
    shapes = _level_shapes(side)
    if verbose:
        print(f"writing {path} ({len(shapes)} levels: {shapes}) ...", file=sys.stderr, flush=True)
    pools = {}
    for scale in (1, 2, 4):
        pools[scale] = [encode_jpeg(t) for t in tissue_tiles(scale)]
    tmp = path.with_suffix(".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for level, shape in enumerate(shapes):
            pool = pools[min(2**level, 4)]
            tw.write(
                _tile_stream(shape, pool, seed=level),
                shape=(*shape, 3),
                dtype=np.uint8,
                **jpeg_level_options(level, len(shapes)),
                software="napari-feddp benchmarks/_synthetic.py",
            )
    tmp.replace(path)
    return path


def jpeg2000_svs(*, path: Path | None = None, tile: int = 240, verbose: bool = True) -> Path:
    """Return a cached lossless JPEG 2000 Aperio-style SVS copy of CMU-1.

    Level 0 holds exactly CMU-1's decoded level-0 pixels, as tiles compressed
    with 33005 (APERIO_JP2000_RGB, J2K codestreams, reversible 5/3 wavelet), so
    OpenSlide's Aperio driver reads it and both readers must give identical
    pixels. Like a real SVS it has a striped thumbnail as second page and a
    1/4 level after it.
    """
    path = Path(path) if path else cache_dir() / f"CMU-1-Small-Region-jp2k-v{FORMAT_VERSION}.svs"
    if path.is_file():
        return path
    if verbose:
        print(f"writing {path} ...", file=sys.stderr, flush=True)
    image = cmu1_pixels()
    h, w = image.shape[:2]
    desc = (
        f"Aperio Image Library v12.0.15 \r\n{w}x{h} ({tile}x{tile}) J2K/KDU Q=lossless"
        f"|AppMag = 20|MPP = {MPP}|Filename = CMU-1-Small-Region-jp2k"
    )
    level1 = _downscale(image, 4)
    thumb = _downscale(image, 8)
    tmp = path.with_suffix(".tmp")
    common = dict(photometric="rgb", metadata=None)
    with tifffile.TiffWriter(tmp, bigtiff=False) as tw:
        tw.write(image, tile=(tile, tile), compression="APERIO_JP2000_RGB", description=desc, **common)
        tw.write(thumb, description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]}", **common)
        tw.write(
            level1,
            tile=(tile, tile),
            compression="APERIO_JP2000_RGB",
            description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {level1.shape[1]}x{level1.shape[0]}",
            **common,
        )
    tmp.replace(path)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="build (or find) the cached synthetic slides")
    parser.add_argument("sides", nargs="*", type=int, default=[20_000, 100_000])
    args = parser.parse_args()
    print(jpeg2000_svs())
    for s in args.sides:
        print(pyramidal_jpeg_tiff(s))
