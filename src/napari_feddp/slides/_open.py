"""Open a whole-slide image lazily: tifffile's zarr store, read tile by tile.

Opening reads the TIFF directory only. Every level the file stores is a zarr
array over tifffile's store (``series.aszarr()``): a slice decodes only the
tiles it touches, on several threads. A small per-slide LRU of decoded tiles
(:data:`TILE_CACHE_BYTES`, like OpenSlide's 32 MiB cache) keeps panning, and
JPEG 2000 tiles that are slow to decode, from paying for decoding twice.
Levels the file lacks (a large image stored at one resolution) are computed
from level 0 with dask, chunk by chunk.

Every size the file declares is checked against :mod:`._limits` before any of
this is built, and every failure, at open or when a tile is read later,
reaches the caller as :class:`SlideError` naming the file.
"""

from __future__ import annotations

import logging
import math
import operator
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
from zarr.experimental.cache_store import CacheStore
from zarr.storage import MemoryStore, WrapperStore

from ._limits import MAX_ASSOCIATED_PIXELS, LimitError, StackLimitError, check_directories, check_levels
from ._metadata import read_slide_metadata
from ._pyramid import lazy_pyramid

#: Series names that hold a slide's label, macro or thumbnail picture. The
#: label and macro can show patient identifiers: never opened unless asked.
ASSOCIATED_NAMES = ("label", "macro", "thumbnail", "overview", "map")

#: File name endings this package reads as slides.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".tif", ".tiff")
#: Endings that always mean "a slide" (a generic .tif may be anything).
VENDOR_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif")

#: Single-level images larger than this (pixels per side) get a lazy pyramid.
PYRAMID_MIN_SIDE = 2048

#: Bytes of decoded tiles kept per open slide (0 turns the cache off). Read
#: when a slide is opened.
TILE_CACHE_BYTES = 32 * 2**20

#: Largest dask chunk (bytes) read from a stored level to compute the levels a
#: file lacks: a block of whole tiles, about 2048 x 2048 RGB pixels.
DASK_CHUNK_BYTES = 12 * 2**20


class SlideError(ValueError):
    """A slide file exists but cannot be read; the message names file and reason."""


class NotASlideError(SlideError):
    """The file is readable but is not a slide (e.g. a 3-D stack or a float image)."""


@dataclass(eq=False)
class Slide:
    """A lazily opened whole-slide image, or an image held in memory.

    Attributes
    ----------
    levels : list of array-like
        Pyramid, highest resolution first: what napari displays and the
        segmentation engine reads. RGB slides are ``(Y, X, 3)`` uint8, label
        images ``(Y, X)`` integers. Levels stored in a file are zarr arrays
        (slicing reads only the tiles it touches); computed levels are dask arrays.
    mpp : (float, float) or None
        ``(y, x)`` micrometres per level-0 pixel; ``None`` when unknown.
    path : Path or None
        The file (None for an image built with :meth:`from_array`).
    vendor : str
        ``aperio``, ``hamamatsu``, ``leica``, ``ventana``, ``ome-tiff`` or ``generic-tiff``;
        ``png`` or ``jpeg`` for pictures from :func:`~napari_feddp.slides.open_plain_image`;
        ``array`` for :meth:`from_array`.
    objective_power : float or None
        Scanning magnification (e.g. 20, 40).
    kind : str
        ``"rgb"`` for tissue images, ``"labels"`` for label maps (our own exports).
    associated : dict of str to int
        Names of the label/macro/thumbnail images in the file and their series
        index. They are *not* opened; see :meth:`read_associated`.
    pyramid_in_file : bool
        False when the levels after the first are computed from it.
    """

    levels: list
    mpp: tuple[float, float] | None = None
    path: Path | None = None
    vendor: str = "array"
    objective_power: float | None = None
    kind: str = "rgb"
    associated: dict[str, int] = field(default_factory=dict)
    pyramid_in_file: bool = True
    _tif: tifffile.TiffFile | None = field(default=None, repr=False)

    @classmethod
    def from_array(cls, image: Any, *, mpp: float | tuple[float, float] | None = None) -> Slide:
        """A one-level RGB slide of an in-memory ``(Y, X, 3|4)`` uint8 array (numpy, dask or zarr).

        Raises
        ------
        SlideError
            If ``image`` is not an RGB(A) uint8 image or ``mpp`` is not positive.
        """
        shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", None)
        if shape is None or dtype is None:
            raise SlideError(f"image: expected a Slide or an RGB array of shape (Y, X, 3) and dtype uint8, "
                             f"received {type(image).__name__}")
        if len(shape) != 3 or shape[2] not in (3, 4) or shape[0] < 1 or shape[1] < 1:
            raise SlideError(f"image: expected shape (Y, X, 3) (RGB) or (Y, X, 4) (RGBA), received {tuple(shape)}")
        if np.dtype(dtype) != np.uint8:
            raise SlideError(f"image: expected dtype uint8 (0-255 RGB), received {np.dtype(dtype)}; "
                             "convert first, e.g. skimage.util.img_as_ubyte(image)")
        if shape[2] == 4:  # alpha carries no tissue information
            image = (image if isinstance(image, (np.ndarray, da.Array)) else da.from_array(image, name=False))[..., :3]
        return cls([image], mpp=_pixel_size(mpp))

    def with_mpp(self, mpp: float | tuple[float, float]) -> Slide:
        """The same slide with level 0 at ``mpp`` micrometres per pixel (sharing the open file)."""
        return replace(self, mpp=_pixel_size(mpp))

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(height, width)`` in pixels."""
        return int(self.levels[0].shape[0]), int(self.levels[0].shape[1])

    @property
    def downsamples(self) -> list[tuple[float, float]]:
        """``(y, x)`` factor of each level relative to level 0."""
        height, width = self.shape
        return [(height / level.shape[0], width / level.shape[1]) for level in self.levels]

    def level_mpp(self, level: int) -> tuple[float, float] | None:
        """``(y, x)`` micrometres per pixel at ``level``, or None."""
        if self.mpp is None:
            return None
        dy, dx = self.downsamples[level]
        return (self.mpp[0] * dy, self.mpp[1] * dx)

    def metadata(self) -> dict:
        """Plain-data description, suitable for a napari layer's ``metadata``."""
        return {
            "path": str(self.path) if self.path else None,
            "vendor": self.vendor,
            "mpp": list(self.mpp) if self.mpp else None,
            "units": "micrometer" if self.mpp else "pixel",
            "objective_power": self.objective_power,
            "level_shapes": [list(level.shape[:2]) for level in self.levels],
            "level_downsamples": [list(d) for d in self.downsamples],
            "pyramid_in_file": self.pyramid_in_file,
            "associated_images": sorted(self.associated),
        }

    def read_associated(self, name: str) -> np.ndarray:
        """Decode the associated image ``name`` (e.g. ``"label"``, ``"macro"``).

        Label and macro pictures can carry patient identifiers: call this only
        on an explicit request from the user.
        """
        key = name.lower()
        if key not in self.associated:
            raise KeyError(
                f"{self.path.name if self.path else 'the image'} has no associated image {name!r}; "
                f"it has: {', '.join(sorted(self.associated)) or 'none'}"
            )
        try:
            with tifffile.TiffFile(self.path) as tif:
                series = tif.series[self.associated[key]]
                pixels = math.prod(series.shape[:-1]) if series.shape[-1:] in ((3,), (4,)) else math.prod(series.shape)
                if pixels > MAX_ASSOCIATED_PIXELS:
                    raise SlideError(
                        f"Cannot read the {key} image of {self.path.name}: it declares {pixels:,} pixels "
                        f"(at most {MAX_ASSOCIATED_PIXELS:,})"
                    )
                return series.asarray()
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(f"Cannot read the {key} image of {self.path.name}: {_reason(exc)}") from exc

    def close(self) -> None:
        """Release the file handle (arrays become unreadable)."""
        if self._tif is not None:
            self._tif.close()
            self._tif = None


def _pixel_size(mpp: Any) -> tuple[float, float] | None:
    if mpp is None:
        return None
    values = (mpp, mpp) if isinstance(mpp, (int, float)) else tuple(mpp)
    if len(values) != 2 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
    ):
        raise SlideError(f"mpp: expected a positive number or (y, x) pair of micrometres per pixel, received {mpp!r}")
    return (float(values[0]), float(values[1]))


def is_slide_path(path: str | os.PathLike) -> bool:
    """True when the file name has an ending this package reads."""
    return str(path).lower().endswith(SLIDE_SUFFIXES)


def open_slide(path: str | os.PathLike) -> Slide:
    """Open ``path`` lazily.

    Parameters
    ----------
    path : str or PathLike
        A ``.svs``, ``.ndpi``, ``.scn``, ``.bif``, (OME-)TIFF file.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    NotASlideError
        If the file is a TIFF but not an RGB slide or a 2-D label image.
    SlideError
        If the file is corrupt, truncated, or uses a codec that cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such slide file: {path}")
    with _TiffProblems() as problems:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:  # TiffFileError, struct.error, OSError, MemoryError, OverflowError, ...
            raise SlideError(f"Cannot open {path.name}: not a readable TIFF-based slide ({_reason(exc)})") from exc
        try:
            problems.check(path)
            # Bounded walk first: tifffile's series parsing grows faster than
            # linearly with the number of directories a file declares.
            check_directories(tif)
            tif.series  # noqa: B018 - parse the directory chain now, while problems are recorded
            problems.check(path)
            return _open_tiff(path, tif)
        except Exception as exc:
            tif.close()
            if isinstance(exc, SlideError):
                raise
            if isinstance(exc, StackLimitError):
                raise NotASlideError(f"{path.name} is not a slide: {exc}") from exc
            if isinstance(exc, LimitError):
                raise SlideError(f"Cannot open {path.name}: {exc}") from exc
            # whatever else a damaged file makes tifffile, imagecodecs, zarr or numpy raise
            raise SlideError(f"Cannot open {path.name}: the file is damaged ({_reason(exc)})") from exc


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reason(exc: BaseException) -> str:
    """``exc`` as one short line for a message: its type and text."""
    text = _one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _TiffProblems(logging.Handler):
    """Collect the errors tifffile logs (it logs, rather than raises, on a broken IFD chain)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR or any(w in message for w in ("invalid", "offset", "corrupt")):
            self.messages.append(message)

    def check(self, path: Path) -> None:
        """Raise :class:`SlideError` with the first problem recorded, if any."""
        if self.messages:
            raise SlideError(
                f"Cannot open {path.name}: the file is truncated or corrupt ({_one_line(self.messages[0])})"
            )

    def __enter__(self) -> _TiffProblems:
        logging.getLogger("tifffile").addHandler(self)
        return self

    def __exit__(self, *exc_info) -> None:
        logging.getLogger("tifffile").removeHandler(self)


def _open_tiff(path: Path, tif: tifffile.TiffFile) -> Slide:
    if not tif.series:
        raise SlideError(f"Cannot open {path.name}: the TIFF holds no image")
    main_index, associated = _choose_series(tif)
    series = tif.series[main_index]
    kind, axes_order = _classify(series, path)
    check_levels(series.levels)
    for level in series.levels:
        for page in level:
            if page is not None:
                _check_readable(path, tif, page)

    store = _NamedErrors(series.aszarr(), path.name)
    if TILE_CACHE_BYTES > 0:
        store = CacheStore(store, cache_store=MemoryStore(), max_size=TILE_CACHE_BYTES)
    group = zarr.open(store, mode="r")
    arrays = [group] if isinstance(group, zarr.Array) else [group[str(i)] for i in range(len(series.levels))]
    levels = [_standard_axes(array, level.axes, axes_order) for array, level in zip(arrays, series.levels)]
    pyramid_in_file = len(levels) > 1
    if not pyramid_in_file and max(levels[0].shape[:2]) > PYRAMID_MIN_SIDE:
        levels = [levels[0], *lazy_pyramid(_as_dask(levels[0]), labels=kind == "labels")[1:]]
    meta = read_slide_metadata(tif, series.pages[0] if series.pages else tif.pages[0])
    return Slide(levels, mpp=meta.mpp, path=path, vendor=meta.vendor, objective_power=meta.objective_power,
                 kind=kind, associated=associated, pyramid_in_file=pyramid_in_file, _tif=tif)


class _NamedErrors(WrapperStore):
    """tifffile's store, raising :class:`SlideError` naming the file when a tile cannot be read.

    A file can be damaged after it was opened (truncated, overwritten) or hold
    tiles that do not decode; napari, the segmentation engine and the computed
    levels all read through here.
    """

    def __init__(self, store: Any, name: str) -> None:
        super().__init__(store)
        self._name = name

    def _with_store(self, store: Any) -> _NamedErrors:
        return type(self)(store, self._name)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        try:
            return await self._store.get(key, prototype, byte_range)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(f"Cannot read {self._name}: {_describe_chunk(key)} is damaged ({_reason(exc)})") from exc


def _describe_chunk(key: str) -> str:
    """``'1/3.5.0'`` (level/row.column.sample) as words."""
    level, _, index = key.rpartition("/")
    parts = index.split(".")
    if len(parts) >= 2 and all(p.isdigit() for p in parts):
        where = f"the tile in row {parts[0]}, column {parts[1]}"
        return f"{where} of level {level}" if level.isdigit() else where
    return f"the data at {key!r}"


def _as_dask(array: Any) -> da.Array:
    """Dask view of a stored level whose chunks are blocks of whole file tiles
    (a task per tile would cost more in scheduling than decoding the tile)."""
    if isinstance(array, da.Array):
        return array
    chunks = da.core.normalize_chunks("auto", array.shape, limit=DASK_CHUNK_BYTES, dtype=array.dtype,
                                      previous_chunks=array.chunks)
    return da.from_zarr(array, chunks=chunks, name=False)  # name=False: no hashing of the store


def _standard_axes(array: zarr.Array, axes: str, order: str) -> Any:
    """The level as ``(Y, X, 3)`` RGB or ``(Y, X)`` labels: the zarr array itself where the
    file stores it so, else a dask view (length-1 axes dropped, planar RGB moved, alpha dropped)."""
    keep = [i for i, (a, n) in enumerate(zip(axes, array.shape)) if n > 1 or a in "YX"]
    if len(keep) == array.ndim and (order == "YX" or (order == "YXS" and array.shape[-1] == 3)):
        return array
    view = _as_dask(array)[tuple(slice(None) if i in keep else 0 for i in range(array.ndim))]
    if order in ("SYX", "CYX"):
        view = da.moveaxis(view, 0, -1)
    return view[..., :3] if view.ndim == 3 and view.shape[-1] == 4 else view


def _choose_series(tif: tifffile.TiffFile) -> tuple[int, dict[str, int]]:
    """Index of the main image (largest non-associated series) and the associated ones."""
    associated: dict[str, int] = {}
    candidates = []
    for index, series in enumerate(tif.series):
        name = (series.name or "").strip().lower()
        if index > 0 and any(name.startswith(key) for key in ASSOCIATED_NAMES):
            associated[name] = index
        else:
            candidates.append(index)
    if not candidates:
        raise SlideError(f"{tif.filename}: only label/macro images, no main image")
    main = max(candidates, key=lambda i: int(np.prod(tif.series[i].shape[-3:])))
    return main, associated


def _classify(series: tifffile.TiffPageSeries, path: Path) -> tuple[str, str]:
    """Decide whether ``series`` is an RGB slide or a label image; reject the rest."""
    axes, shape, dtype = series.axes, series.shape, series.dtype
    squeezed = "".join(a for a, n in zip(axes, shape) if n > 1 or a in "YX")
    if squeezed in ("YXS",) and shape[axes.index("S")] in (3, 4) and dtype == np.uint8:
        return "rgb", "YXS"
    if squeezed in ("SYX", "CYX") and shape[axes.index(squeezed[0])] in (3, 4) and dtype == np.uint8:
        return "rgb", squeezed
    is_integer = np.issubdtype(dtype, np.integer)
    if squeezed == "YX" and is_integer and (dtype != np.uint8 or "ome" in series.parent.flags):
        # Our own exports (OME-TIFF label maps); plain 8-bit greyscale TIFFs are
        # left to other readers.
        return "labels", "YX"
    raise NotASlideError(
        f"{path.name} is not a slide: expected an RGB uint8 image (axes YXS) or a 2-D "
        f"integer label image, got axes {axes!r}, shape {shape}, dtype {dtype}"
    )


#: tile tables up to this length are checked completely at open
_FULL_CHECK_TILES = 4096


def _check_readable(path: Path, tif: tifffile.TiffFile, page: tifffile.TiffPage) -> None:
    """Fail now, with a clear reason, if tiles lie past the end or cannot be decoded."""
    keyframe = page.keyframe
    try:
        tifffile.TIFF.DECOMPRESSORS[keyframe.compression]
    except KeyError as exc:
        name = getattr(keyframe.compression, "name", keyframe.compression)
        raise SlideError(
            f"Cannot open {path.name}: tiles use compression {name} "
            f"({int(keyframe.compression)}), which this installation cannot decode "
            "(is imagecodecs installed and up to date?)"
        ) from exc
    offsets, counts = page.dataoffsets, page.databytecounts
    if len(offsets) == 0:
        return
    size = tif.filehandle.size
    # This runs on every open. A full scan of level 0 (150,000 tiles on a
    # 100,000-pixel slide) costs 4 ms, as much as everything else that grows
    # with the slide, so large tables are checked on their last tile and on
    # every 64th tile: writers store a level's tiles in order, so a truncated
    # file loses the last ones first. A cut-off tile this misses fails when
    # it is decoded.
    if len(offsets) > _FULL_CHECK_TILES:
        last = len(offsets) - 1
        sample = range(0, len(offsets), 64)
        end = max(max(offsets[i] + counts[i] for i in sample), offsets[last] + counts[last])
        if end <= size:
            return
    elif max(offsets) + max(counts) <= size:
        return
    end = int(max(map(operator.add, offsets, counts)))
    if end > size:
        raise SlideError(
            f"Cannot open {path.name}: the file is truncated or corrupt "
            f"(image data should reach byte {end:,} but the file has {size:,} bytes)"
        )
