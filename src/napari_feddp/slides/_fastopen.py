"""Fast open path for the common slide layouts: Aperio SVS and pyramidal TIFFs.

Why: with tifffile, opening grows with the slide, because every level's tile
tables are unpacked into Python tuples (16 ms of a 45 ms open of a
100,000-pixel slide). Here the directories are read with :mod:`._tiffdir`
and a level's tile tables stay on disk until its first tile is read, so the
open costs about the same for a 20,000- and a 100,000-pixel slide.

Which files: a layout this module recognises exactly and whose pixels it
decodes exactly as tifffile does (same imagecodecs calls, checked against
tifffile in the tests):

* **Aperio SVS** (``ImageDescription`` starting with ``"Aperio "``): level 0,
  thumbnail, the further tiled levels, then label and macro, as tifffile's
  ``_series_svs`` reads them; one focal plane;
* **pyramidal TIFF with SubIFDs** (bfconvert, QuPath, tifffile, our
  synthetic slides): a single top-level directory holding level 0 and its
  reduced levels as SubIFDs, no ImageDescription, only baseline tags;

each level tiled, 8-bit RGB, chunky, stored uncompressed, LZW, Deflate, JPEG
(RGB or YCbCr) or JPEG 2000 (incl. Aperio 33003/33005), no predictor.
Everything else (NDPI, SCN, BIF, OME-TIFF, label images, strips, odd tags,
anything the checks here are unsure of, and every broken file, whose clear
error message tifffile's path produces) returns ``None`` from
:func:`open_fast` and is opened with tifffile.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from ._metadata import RESOLUTION_UNITS, SlideMetadata, aperio_metadata, plausible_mpp, resolution_mpp
from ._tiffdir import Directory, TiffDirectoryFile, TiffFormatError

#: Compression codes read on this path (others: tifffile's path).
COMPRESSIONS = {1: "none", 5: "lzw", 7: "jpeg", 8: "deflate", 32946: "deflate", 33003: "jpeg2000",
                33005: "jpeg2000", 34712: "jpeg2000"}
#: Tags a generic (non-vendor) pyramidal TIFF may carry on this path: the
#: baseline image tags. Any other tag may give the file a meaning tifffile
#: knows about (ImageJ, OME, NDPI, GeoTIFF, ...), so such files go there.
GENERIC_TAGS = frozenset({254, 256, 257, 258, 259, 262, 269, 270, 271, 272, 274, 277, 282, 283, 284, 296, 305, 306,
                          315, 316, 317, 322, 323, 324, 325, 330, 339, 347, 530, 531, 532})
#: Tags whose presence means a vendor format handled by tifffile (NDPI).
VENDOR_TAGS = frozenset({65420})


class NotFast(Exception):
    """This file is left to tifffile (the reason is for debugging only)."""


@dataclass(frozen=True)
class FastLayout:
    """What :func:`parse_layout` found: levels, vendor and the raw metadata fields."""

    vendor: str  # "aperio" or "generic-tiff"
    levels: list[Directory]
    description: str
    associated: dict[str, int]  # lower-case name -> tifffile series index


def parse_layout(file: TiffDirectoryFile) -> FastLayout:
    """Recognise the file's layout or raise :class:`NotFast` (or a parsing error).

    Only the arrangement of directories is checked here; each level's own tags are
    checked by :class:`TiledLevel`.
    """
    chain = file.chain()
    first = chain[0]
    if VENDOR_TAGS & first.entries.keys():
        raise NotFast("vendor tags")
    description = first.text(270) or ""
    if description.startswith("Aperio "):
        return _aperio(chain, description)
    if description or len(chain) != 1 or not first.entries.keys() <= GENERIC_TAGS:
        raise NotFast("not a plain pyramidal TIFF")
    levels = [first]
    for offset in first.values(330) if 330 in first else ():
        ifd, _ = file.directory(int(offset))
        if not ifd.entries.keys() <= GENERIC_TAGS or ifd.text(270):
            raise NotFast("SubIFD with other tags")
        levels.append(ifd)
    return FastLayout("generic-tiff", levels, description, {})


def _aperio(chain: list[Directory], description: str) -> FastLayout:
    levels = [chain[0]]
    associated: dict[str, int] = {}
    index = 1
    if len(chain) > 1:
        associated["thumbnail"] = 1
        index = 2
        while index < len(chain) and _is_tiled(chain[index]) and not chain[index].value(254, 0) & 1:
            levels.append(chain[index])
            index += 1
    series = 2
    for ifd in chain[index:index + 2]:  # label and macro, named as tifffile names them
        associated["macro" if ifd.value(254, 0) == 9 else "label"] = series
        series += 1
    return FastLayout("aperio", levels, description, associated)


def _is_tiled(ifd: Directory) -> bool:
    return 322 in ifd and 323 in ifd


def layout_metadata(layout: FastLayout) -> SlideMetadata:
    """Vendor, mpp and objective power, read as :func:`._metadata.read_slide_metadata` reads them."""
    first = layout.levels[0]
    resolution = None
    if 282 in first and 283 in first and 296 in first:
        resolution = resolution_mpp([float(v) for v in first.values(282)], [float(v) for v in first.values(283)],
                                    RESOLUTION_UNITS.get(first.value(296), ""))
    if layout.vendor == "aperio":
        return aperio_metadata(layout.description, resolution)
    return SlideMetadata(vendor=layout.vendor, mpp=plausible_mpp(resolution), objective_power=None)


# --------------------------------------------------------------------------- tiles


def _can_decode(compression: int) -> bool:
    if compression == 1:
        return True
    try:
        if compression == 7:
            import imagecodecs

            return hasattr(imagecodecs, "jpeg_decode")
        import tifffile

        tifffile.TIFF.DECOMPRESSORS[compression]
    except (ImportError, KeyError):
        return False
    return True


class TiledLevel:
    """One pyramid level: geometry, decoder, and its tile tables read on first use."""

    def __init__(self, ifd: Directory, path: Path) -> None:
        """Raises :class:`NotFast` unless the level is tiled 8-bit chunky RGB this path decodes."""
        if not _is_tiled(ifd):
            raise NotFast("untiled level")
        if ifd.value(277, 1) != 3 or ifd.value(284, 1) != 1 or ifd.value(317, 1) != 1:
            raise NotFast("not chunky 3-sample RGB without predictor")
        if 258 not in ifd or not all(int(v) == 8 for v in ifd.values(258)):
            raise NotFast("not 8 bits per sample")
        if 339 in ifd and not all(int(v) == 1 for v in ifd.values(339)):
            raise NotFast("not unsigned integer samples")
        self.compression, self.photometric = int(ifd.value(259, 1)), ifd.value(262)
        if (self.compression not in COMPRESSIONS or self.photometric not in (2, 6)
                or (self.photometric == 6 and self.compression != 7)):
            raise NotFast(f"compression {self.compression} / photometric {self.photometric}")
        if not _can_decode(self.compression):
            raise NotFast(f"no decoder for compression {self.compression}")
        self.ifd, self.path = ifd, path
        self.height, self.width = int(ifd.value(257)), int(ifd.value(256))
        self.tile_height, self.tile_width = int(ifd.value(323)), int(ifd.value(322))
        if self.tile_height <= 0 or self.tile_width <= 0:
            raise NotFast("empty tiles")
        self.down = -(-self.height // self.tile_height)
        self.across = -(-self.width // self.tile_width)
        ntiles = self.down * self.across
        if ifd.count(324) != ntiles or ifd.count(325) != ntiles:
            raise NotFast("tile tables do not match the tile grid")
        self._tables: tuple[np.ndarray, np.ndarray] | None = None
        self._decode = None
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    @property
    def chunks(self) -> tuple[int, int, int]:
        return (self.tile_height, self.tile_width, 3)

    def last_tile_end(self) -> int:
        """End of the last tile's bytes, read without loading the tables (a cheap truncation check)."""
        return self.ifd.element(324, -1) + self.ifd.element(325, -1)

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Tile offsets and byte counts, read once and checked against the file size."""
        with self._lock:
            if self._tables is None:
                offsets = self.ifd.values(324).astype(np.int64)
                counts = self.ifd.values(325).astype(np.int64)
                size = self.ifd.file.size
                end = int((offsets + counts).max(initial=0))
                if end > size:
                    from ._open import SlideError

                    raise SlideError(f"Cannot read {self.path.name}: the file is truncated or corrupt "
                                     f"(image data should reach byte {end:,} but the file has {size:,} bytes)")
                self._tables = (offsets, counts)
                self._decode = self._decoder()
            return self._tables

    def _decoder(self):
        # The closures below must not capture ``self``: a cycle would keep the file open
        # until the cyclic garbage collector runs.
        height, width, name = self.tile_height, self.tile_width, self.path.name
        size = height * width * 3
        if self.compression == 7:
            import imagecodecs

            tables = self.ifd.raw(347) if 347 in self.ifd else None
            colorspace = None
            if self.photometric == 2 and not self._is_jfif():
                colorspace = 2  # RGB JPEG without a JFIF marker (Aperio): do not convert from YCbCr
            shape = (height, width)

            def decode(data: bytes) -> np.ndarray:
                return imagecodecs.jpeg_decode(data, bitspersample=8, tables=tables, colorspace=colorspace,
                                               outcolorspace=2, shape=shape)
        elif self.compression == 1:
            def decode(data: bytes) -> np.ndarray:
                return np.frombuffer(data, np.uint8)
        else:
            import tifffile

            decompress = tifffile.TIFF.DECOMPRESSORS[self.compression]

            def decode(data: bytes) -> np.ndarray:
                out = decompress(data)
                return np.frombuffer(out, np.uint8) if isinstance(out, (bytes, bytearray)) else np.asarray(out)

        def decode_tile(data: bytes) -> np.ndarray:
            tile = decode(data)
            if tile.shape != (height, width, 3):
                flat = tile.reshape(-1)
                if flat.size < size:
                    raise ValueError(f"a tile of {name} decodes to {flat.size} values, expected {size}")
                tile = flat[:size].reshape(height, width, 3)
            return tile

        return decode_tile

    def _is_jfif(self) -> bool:
        offset, count = self.ifd.element(324, 0), self.ifd.element(325, 0)
        return offset > 0 and count >= 11 and self.ifd.file.read(offset + 6, 4) == b"JFIF"

    def tile(self, row: int, column: int) -> np.ndarray | None:
        """Decoded tile ``(row, column)``, or None where the file stores none (zarr's fill value)."""
        offsets, counts = self.tables()
        index = row * self.across + column
        offset, count = int(offsets[index]), int(counts[index])
        if offset == 0 or count == 0:
            return None
        return self._decode(self.ifd.file.read_exact(offset, count))


class TiffTileStore(MemoryStore):
    """Read-only zarr store over :class:`TiledLevel` objects (zarr format 2, one chunk per tile).

    The arrays' metadata live in the in-memory dict; chunk keys ``"<level>/<row>.<column>.0"``
    are decoded from the file on request, on ``maxworkers`` threads when zarr asks for
    several tiles at once.
    """

    def __init__(self, levels: list[TiledLevel], maxworkers: int = 1) -> None:
        #: Each level's zarr (format 2) array metadata, as stored under ``"<level>/.zarray"``.
        self.array_metadata = [
            {"zarr_format": 2, "shape": list(level.shape), "chunks": list(level.chunks), "dtype": "|u1",
             "compressor": None, "fill_value": 0, "order": "C", "filters": None, "dimension_separator": "."}
            for level in levels]
        prototype = default_buffer_prototype()
        store_dict = {".zgroup": prototype.buffer.from_bytes(b'{"zarr_format": 2}')}
        for i, meta in enumerate(self.array_metadata):
            store_dict[f"{i}/.zarray"] = prototype.buffer.from_bytes(json.dumps(meta).encode())
        super().__init__(store_dict=store_dict, read_only=True)
        self._levels = levels
        self._maxworkers = max(1, int(maxworkers))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def with_read_only(self, read_only: bool = False) -> TiffTileStore:
        if not read_only:
            raise ValueError("a slide's tile store is read-only")
        return self

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__

    def _executor(self) -> ThreadPoolExecutor | None:
        if self._maxworkers < 2:
            return None
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._maxworkers, thread_name_prefix="feddp-decode")
            return self._pool

    async def get(self, key, prototype=None, byte_range=None):
        if key in self._store_dict or byte_range is not None:
            return await super().get(key, prototype, byte_range)
        level, _, chunk = key.partition("/")
        try:
            row, column, _ = (int(i) for i in chunk.split("."))
            tiled = self._levels[int(level)]
        except (ValueError, IndexError):
            return None
        pool = self._executor()
        if pool is None:
            tile = tiled.tile(row, column)
        else:
            tile = await asyncio.get_running_loop().run_in_executor(pool, tiled.tile, row, column)
        if tile is None:
            return None
        prototype = prototype or default_buffer_prototype()
        return prototype.buffer.from_array_like(np.ascontiguousarray(tile).reshape(-1))

    async def exists(self, key: str) -> bool:
        return key in self._store_dict

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None
        super().close()


@dataclass(eq=False)
class FastSlideFile:
    """The open file, its layout, levels and tile store (closed together)."""

    file: TiffDirectoryFile
    layout: FastLayout
    levels: list[TiledLevel]
    store: TiffTileStore

    def metadata(self) -> SlideMetadata:
        return layout_metadata(self.layout)

    def close(self) -> None:
        self.store.close()
        self.file.close()


def open_fast(path: Path, maxworkers: int) -> FastSlideFile | None:
    """Open ``path`` on the fast path, or return None (the caller uses tifffile)."""
    try:
        file = TiffDirectoryFile(path)
    except (TiffFormatError, OSError):
        return None
    try:
        layout = parse_layout(file)
        levels = [TiledLevel(ifd, path) for ifd in layout.levels]
        shapes = [level.shape for level in levels]
        if any(b[0] >= a[0] or b[1] >= a[1] for a, b in zip(shapes, shapes[1:])):
            raise NotFast(f"level shapes {shapes} are not a pyramid")
        # A truncated file loses its last tiles first: check each level's last tile now (two
        # values read per level); the full tables are checked when a level is first read.
        if any(level.last_tile_end() > file.size for level in levels):
            raise NotFast("tiles past the end of the file")
    except (NotFast, TiffFormatError, KeyError, ValueError, OSError):
        file.close()
        return None
    return FastSlideFile(file, layout, levels, TiffTileStore(levels, maxworkers))


__all__ = ["COMPRESSIONS", "FastLayout", "FastSlideFile", "NotFast", "TiffTileStore", "TiledLevel", "layout_metadata",
           "open_fast", "parse_layout"]
