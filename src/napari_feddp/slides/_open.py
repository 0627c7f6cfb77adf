"""Open a whole-slide image as a lazy dask pyramid (tifffile -> zarr -> dask).

Nothing here decodes level-0 pixels: opening reads the TIFF directory only, and
every array handed out is a dask array whose chunks are whole blocks of the
file's own tiles (about :data:`DASK_CHUNK_SIDE` pixels a side).

Reading speed (see ``docs/benchmarks.md``): a region read is one dask task per
dask chunk it touches; inside a task, zarr fetches the chunk's tiles
concurrently and tifffile decodes them on ``maxworkers`` threads. Decoded tiles
are kept in a small per-slide LRU (:data:`TILE_CACHE_BYTES`), so panning over
tiles just seen, and the JPEG 2000 slides whose tiles are slow to decode, do
not pay for decoding twice (OpenSlide keeps a similar 32 MiB cache).
"""

from __future__ import annotations

import logging
import operator
import os
import struct
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import tifffile
import zarr
from zarr.storage import WrapperStore

from ._fastopen import FastSlideFile, open_fast
from ._metadata import SlideMetadata, read_slide_metadata
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

#: Open Aperio SVS and plain pyramidal TIFFs with :mod:`._fastopen` (directories read
#: without tifffile's per-tile tables); False opens every file with tifffile.
FAST_OPEN = os.environ.get("NAPARI_FEDDP_FAST_OPEN", "1") != "0"

#: Side (pixels) aimed at for the dask chunks of levels read from the file:
#: a whole number of tiles, at most this many pixels (one tile if tiles are
#: larger). One dask task per file tile costs about 0.5 ms of scheduling per
#: tile, more than decoding a JPEG tile; a task per block of tiles lets zarr
#: fetch and decode the block's tiles concurrently and keeps the task graph of
#: a 100,000-pixel slide small.
DASK_CHUNK_SIDE = 2048


class SlideError(ValueError):
    """A slide file exists but cannot be read; the message names file and reason."""


class NotASlideError(SlideError):
    """The file is readable but is not a slide (e.g. a 3-D stack or a float image)."""


@dataclass(eq=False)
class Slide:
    """A lazily opened whole-slide image.

    Attributes
    ----------
    path : Path
        The file.
    levels : list of dask.array.Array
        Pyramid, highest resolution first. RGB slides are ``(Y, X, 3)`` uint8;
        label images are ``(Y, X)`` integers.
    downsamples : list of (float, float)
        ``(y, x)`` factor of each level relative to level 0.
    mpp : (float, float) or None
        ``(y, x)`` micrometres per level-0 pixel; ``None`` when the file has none.
    vendor : str
        ``aperio``, ``hamamatsu``, ``leica``, ``ventana``, ``ome-tiff`` or ``generic-tiff``
        (``png`` or ``jpeg`` for pictures from :func:`~napari_feddp.slides.open_plain_image`).
    objective_power : float or None
        Scanning magnification (e.g. 20, 40).
    kind : str
        ``"rgb"`` for tissue images, ``"labels"`` for label maps (our own exports).
    associated : dict of str to int
        Names of the label/macro/thumbnail images in the file and their series
        index. They are *not* opened; see :meth:`read_associated`.
    region_arrays : list of zarr.Array or None
        The zarr arrays behind ``levels`` (same shapes, same pixels) where a
        level is stored as ``(Y, X, 3)``, else None. Slicing them reads a small
        region without building a dask graph, about 4x less CPU per 256 x 256
        read; the segmentation engine reads its tiles through them.
    """

    path: Path
    downsamples: list[tuple[float, float]]
    mpp: tuple[float, float] | None
    vendor: str
    objective_power: float | None
    kind: str
    associated: dict[str, int] = field(default_factory=dict)
    pyramid_in_file: bool = True
    region_arrays: list | None = field(default=None, repr=False)
    _tif: tifffile.TiffFile | None = field(default=None, repr=False)
    _fast: FastSlideFile | None = field(default=None, repr=False)
    _levels: list[da.Array] | None = field(default=None, repr=False)
    _build_levels: Callable[[], list[da.Array]] | None = field(default=None, repr=False)

    @property
    def levels(self) -> list[da.Array]:
        """The pyramid as lazy dask arrays (built on first use where ``region_arrays`` exist)."""
        if self._levels is None:
            self._levels = self._build_levels()
        return self._levels

    @property
    def layer_levels(self) -> list:
        """The pyramid napari displays: ``region_arrays`` where the file stores a
        level as ``(Y, X, 3)`` (napari slices them directly, no dask graph per
        view), the lazy dask ``levels`` elsewhere (computed pyramid levels)."""
        if self.region_arrays is None:
            return list(self.levels)
        if len(self.region_arrays) == len(self.downsamples):
            return list(self.region_arrays)  # no dask graph needed
        return [
            self.region_arrays[i] if i < len(self.region_arrays) else level for i, level in enumerate(self.levels)
        ]

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(height, width)`` in pixels."""
        return tuple(self.layer_levels[0].shape[:2])  # type: ignore[return-value]

    def level_mpp(self, level: int) -> tuple[float, float] | None:
        """``(y, x)`` micrometres per pixel at ``level``, or None."""
        if self.mpp is None:
            return None
        dy, dx = self.downsamples[level]
        return (self.mpp[0] * dy, self.mpp[1] * dx)

    def metadata(self) -> dict:
        """Plain-data description, suitable for a napari layer's ``metadata``."""
        return {
            "path": str(self.path),
            "vendor": self.vendor,
            "mpp": list(self.mpp) if self.mpp else None,
            "units": "micrometer" if self.mpp else "pixel",
            "objective_power": self.objective_power,
            "level_shapes": [list(lv.shape[:2]) for lv in self.layer_levels],
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
                f"{self.path.name} has no associated image {name!r}; "
                f"it has: {', '.join(sorted(self.associated)) or 'none'}"
            )
        if self._tif is not None:
            return self._tif.series[self.associated[key]].asarray()
        with tifffile.TiffFile(self.path) as tif:
            return tif.series[self.associated[key]].asarray()

    def close(self) -> None:
        """Release the file handle (arrays become unreadable)."""
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        if self._fast is not None:
            self._fast.close()
            self._fast = None


def is_slide_path(path: str | os.PathLike) -> bool:
    """True when the file name has an ending this package reads."""
    return str(path).lower().endswith(SLIDE_SUFFIXES)


def open_slide(path: str | os.PathLike, *, maxworkers: int | None = None) -> Slide:
    """Open ``path`` lazily.

    Parameters
    ----------
    path : str or PathLike
        A ``.svs``, ``.ndpi``, ``.scn``, ``.bif``, (OME-)TIFF file.
    maxworkers : int, optional
        Threads that decode tiles concurrently when a read spans several tiles
        (default: the number of CPUs). Matters most for JPEG 2000 slides.

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
    workers = maxworkers or os.cpu_count() or 1
    fast = open_fast(path, workers) if FAST_OPEN else None
    if fast is not None:
        try:
            return _open_fast(path, fast)
        except Exception:
            fast.close()
            raise
    with _TiffProblems() as problems:
        try:
            tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, ValueError, OSError, struct.error) as exc:
            raise SlideError(f"Cannot open {path.name}: not a readable TIFF-based slide ({exc})") from exc
        try:
            tif.series  # noqa: B018 - parse the directory chain now, while problems are recorded
            if problems.messages:
                raise SlideError(
                    f"Cannot open {path.name}: the file is truncated or corrupt "
                    f"({problems.messages[0]})"
                )
            return _open_tiff(path, tif, workers)
        except Exception:
            tif.close()
            raise


class _TiffProblems(logging.Handler):
    """Collect the errors tifffile logs (it logs, rather than raises, on a broken IFD chain)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR or any(w in message for w in ("invalid", "offset", "corrupt")):
            self.messages.append(message)

    def __enter__(self) -> _TiffProblems:
        logging.getLogger("tifffile").addHandler(self)
        return self

    def __exit__(self, *exc_info) -> None:
        logging.getLogger("tifffile").removeHandler(self)


def _open_tiff(path: Path, tif: tifffile.TiffFile, maxworkers: int) -> Slide:
    if not tif.series:
        raise SlideError(f"Cannot open {path.name}: the TIFF holds no image")
    main_index, associated = _choose_series(tif)
    series = tif.series[main_index]
    kind, axes_order = _classify(series, path)
    for level in series.levels:
        for page in level.pages:
            if page is not None:
                _check_readable(path, tif, page)

    store = series.aszarr(maxworkers=maxworkers)
    if TILE_CACHE_BYTES > 0:
        store = _TileCacheStore(store, TILE_CACHE_BYTES)
    group = zarr.open(store, mode="r")
    if isinstance(group, zarr.Array):
        arrays = [group]
    else:
        arrays = [group[str(i)] for i in range(len(series.levels))]
    token = uuid.uuid4().hex
    levels = [
        _to_standard_axes(_dask_level(a, series.levels[i].axes, token, i), series.levels[i].axes, axes_order)
        for i, a in enumerate(arrays)
    ]

    region_arrays = [
        a if (a.ndim == 3 and series.levels[i].axes == "YXS" and tuple(a.shape) == tuple(levels[i].shape)) else None
        for i, a in enumerate(arrays)
    ]
    pyramid_in_file = len(levels) > 1
    if _needs_pyramid(levels):
        levels = lazy_pyramid(levels[0], labels=(kind == "labels"))

    base = levels[0].shape
    downsamples = [(base[0] / lv.shape[0], base[1] / lv.shape[1]) for lv in levels]
    meta: SlideMetadata = read_slide_metadata(tif, series.pages[0] if series.pages else tif.pages[0])
    return Slide(
        path=path,
        _levels=levels,
        downsamples=downsamples,
        mpp=meta.mpp,
        vendor=meta.vendor,
        objective_power=meta.objective_power,
        kind=kind,
        associated=associated,
        pyramid_in_file=pyramid_in_file,
        region_arrays=region_arrays if all(a is not None for a in region_arrays) else None,
        _tif=tif,
    )


def _open_fast(path: Path, fast: FastSlideFile) -> Slide:
    """A :class:`Slide` from :func:`open_fast`'s levels (RGB, zarr arrays; dask built on first use)."""
    store = fast.store
    if TILE_CACHE_BYTES > 0:
        store = _TileCacheStore(store, TILE_CACHE_BYTES)
    arrays = [_zarr_array(store, meta, str(i)) for i, meta in enumerate(fast.store.array_metadata)]
    token = uuid.uuid4().hex
    computed_pyramid = _needs_pyramid(arrays)

    def build_levels() -> list[da.Array]:
        levels = [_dask_level(a, "YXS", token, i) for i, a in enumerate(arrays)]
        return lazy_pyramid(levels[0]) if computed_pyramid else levels

    levels = build_levels() if computed_pyramid else None  # computed levels: shapes come from dask
    shapes = [a.shape for a in (levels or arrays)]
    meta = fast.metadata()
    return Slide(
        path=path,
        downsamples=[(shapes[0][0] / s[0], shapes[0][1] / s[1]) for s in shapes],
        mpp=meta.mpp,
        vendor=meta.vendor,
        objective_power=meta.objective_power,
        kind="rgb",
        associated=dict(fast.layout.associated),
        pyramid_in_file=len(arrays) > 1,
        region_arrays=arrays,
        _fast=fast,
        _levels=levels,
        _build_levels=build_levels,
    )


def _needs_pyramid(levels: list) -> bool:
    """A single stored level larger than :data:`PYRAMID_MIN_SIDE` gets a lazily computed pyramid."""
    return len(levels) == 1 and max(levels[0].shape[:2]) > PYRAMID_MIN_SIDE


def _dask_level(array: zarr.Array, axes: str, token: str, index: int) -> da.Array:
    """Dask view of a stored level: chunks of whole file tiles, an explicit unique name (dask
    would otherwise tokenize the zarr array, which costs milliseconds per level and gives a
    random token anyway: the stores cannot be hashed deterministically)."""
    return da.from_zarr(array, chunks=_dask_chunks(array.chunks, array.shape, axes),
                        name=f"feddp-slide-{token}-level{index}")


def _zarr_array(store, metadata: dict, path: str) -> zarr.Array:
    """A read-only zarr array of ``store`` at ``path`` with the given (format 2) ``metadata``, built
    without a round trip through zarr's event loop (1 ms per level); zarr.open_array otherwise."""
    try:
        from zarr.core.array import AsyncArray
        from zarr.core.metadata import ArrayV2Metadata
        from zarr.storage import StorePath

        return zarr.Array(AsyncArray(metadata=ArrayV2Metadata.from_dict(dict(metadata)),
                                     store_path=StorePath(store, path)))
    except Exception:  # noqa: BLE001 - another zarr version: the public, slower way
        return zarr.open_array(store=store, path=path, mode="r", zarr_format=2)


def _dask_chunks(tile: tuple[int, ...], shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
    """Dask chunks made of whole file tiles, about ``DASK_CHUNK_SIDE`` pixels a side.

    ``tile`` is the zarr chunk (one TIFF tile or strip). Only the Y and X axes
    grow; a chunk never exceeds ``DASK_CHUNK_SIDE**2`` pixels unless a single
    tile or strip already does.
    """
    if "Y" not in axes or "X" not in axes or len(tile) != len(axes):
        return tuple(tile)
    iy, ix = axes.index("Y"), axes.index("X")
    ty, tx = max(tile[iy], 1), max(tile[ix], 1)
    kx = max(1, DASK_CHUNK_SIDE // tx)
    ky = max(1, DASK_CHUNK_SIDE // ty)
    ky = max(1, min(ky, DASK_CHUNK_SIDE * DASK_CHUNK_SIDE // (kx * tx * ty)))
    chunks = list(tile)
    chunks[iy] = min(ky * ty, max(shape[iy], 1))
    chunks[ix] = min(kx * tx, max(shape[ix], 1))
    return tuple(chunks)


class _TileCacheStore(WrapperStore):
    """Read-only zarr store wrapper keeping the most recently decoded tiles.

    tifffile's store decodes a tile on every ``get``; this keeps up to
    ``max_bytes`` of decoded tiles (least recently used dropped first). Cached
    arrays are made read-only, so a consumer can never alter the cache.
    """

    def __init__(self, store, max_bytes: int) -> None:
        super().__init__(store)
        self._max_bytes = int(max_bytes)
        self._tiles: OrderedDict[str, np.ndarray] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def _with_store(self, store):
        return type(self)(store, self._max_bytes)

    async def get(self, key, prototype, byte_range=None):
        if byte_range is not None or key.endswith("zarr.json"):
            return await self._store.get(key, prototype, byte_range)
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
        if tile is not None:
            return prototype.buffer.from_array_like(tile)
        buffer = await self._store.get(key, prototype, byte_range)
        if buffer is None:
            return None
        tile = buffer.as_numpy_array()
        if tile.nbytes <= self._max_bytes:
            tile.flags.writeable = False
            with self._lock:
                if key not in self._tiles:
                    self._tiles[key] = tile
                    self._nbytes += tile.nbytes
                    while self._nbytes > self._max_bytes:
                        _, old = self._tiles.popitem(last=False)
                        self._nbytes -= old.nbytes
        return buffer

    def clear_cache(self) -> None:
        """Drop every cached tile."""
        with self._lock:
            self._tiles.clear()
            self._nbytes = 0


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


def _to_standard_axes(array: da.Array, axes: str, order: str) -> da.Array:
    """Drop length-1 axes and return (Y, X, 3) for RGB or (Y, X) for labels."""
    keep = [i for i, (a, n) in enumerate(zip(axes, array.shape)) if n > 1 or a in "YX"]
    index = tuple(slice(None) if i in keep else 0 for i in range(array.ndim))
    array = array[index]
    if order in ("SYX", "CYX"):
        array = da.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]  # RGBA slides: alpha carries no tissue information
    return array


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
