"""Limits a slide file must respect before anything is built from it.

A TIFF declares its own sizes: image dimensions, tile sizes, the number of
images (IFDs) and of sub-resolutions (SubIFDs). A damaged or hostile file can
declare a billion pixels in one tile, or a hundred thousand SubIFDs, and the
work and memory that follow scale with what is declared, not with the file's
size. Every slide is checked against the limits below first: the directory
chain before tifffile parses it into series, then the chosen image's levels
before any zarr store, dask graph or computed pyramid is made. The limits are
far above what any scanner writes (the largest slides are about 200,000 pixels
per side, with tiles of 240 to 1,024 pixels and under 20 levels).
"""

from __future__ import annotations

import math
import struct

import tifffile

#: Largest image side, in pixels, at any level.
MAX_SIDE = 500_000
#: Largest tile side, in pixels (tiles must also be at least 1 pixel).
MAX_TILE_SIDE = 4096
#: Largest strip (a block of whole rows, in untiled images), in decoded bytes.
MAX_STRIP_BYTES = 256 * 2**20
#: Most resolution levels in the image that is opened.
MAX_LEVELS = 64
#: Most images (IFDs) in the file's main directory chain.
MAX_IFDS = 1024
#: Most SubIFDs (sub-resolutions) listed by one IFD.
MAX_SUBIFDS = 1024
#: Most directories in all: the chain's IFDs and every SubIFD they list.
MAX_DIRECTORIES = 4096
#: Largest associated picture (label, macro, thumbnail), in pixels.
MAX_ASSOCIATED_PIXELS = 8192 * 8192

# Directories and the tables they point to normally fill distinct parts of the
# file. Counted over every IFD and SubIFD, they may add up to at most this
# many times the file's size (plus a small allowance for shared small values):
# beyond it, the same large table is listed over and over, which would be
# parsed and held in memory once per listing.
_DIRECTORY_BYTES_PER_FILE_BYTE = 2
_DIRECTORY_BYTES_ALLOWANCE = 2**20

#: tifffile rejects IFDs with more tags than this; so does the walk below.
_MAX_TAGS = 4096
_SUBIFDS_TAG = 330


class LimitError(ValueError):
    """A declared size exceeds a limit; the message says which and by how much."""


class StackLimitError(LimitError):
    """The file holds more images than any slide: a stack (time series, many planes), not a slide."""


def check_directories(tif: tifffile.TiffFile) -> None:
    """Walk the IFD chain and the SubIFDs it lists, reading only their entries.

    Stops at the first limit exceeded, so the cost is bounded by the limits
    whatever the file declares. Raises :class:`LimitError` for too many
    directories, a chain that loops or leaves the file, or directories that
    describe more bytes than the file holds.
    """
    fmt = tif.tiff
    handle = tif.filehandle
    size = handle.size
    budget = _DIRECTORY_BYTES_PER_FILE_BYTE * size + _DIRECTORY_BYTES_ALLOWANCE
    described = 0
    directories = 0
    seen: set[int] = set()
    try:
        offset = tif.pages.first.offset
    except IndexError:
        raise LimitError("the file is truncated or corrupt (its first image directory cannot be read)") from None
    while offset:
        if offset in seen:
            raise LimitError(f"the file is corrupt (its chain of images loops: the directory at byte {offset:,} comes twice)")
        if offset < 8 or offset >= size:
            raise LimitError(f"the file is truncated or corrupt (an image directory lies at byte {offset:,}, outside its {size:,} bytes)")
        seen.add(offset)
        if len(seen) > MAX_IFDS:
            raise StackLimitError(f"it holds more than {MAX_IFDS:,} images (IFDs)")
        entries, next_offset = _read_directory(handle, fmt, offset)
        directories += 1
        described += _directory_bytes(fmt, entries)
        declared = sum(count for code, _dtype, count, _value in entries if code == _SUBIFDS_TAG)
        if declared > MAX_SUBIFDS:
            raise LimitError(
                f"image {len(seen) - 1} lists {declared:,} sub-resolutions (SubIFDs); at most {MAX_SUBIFDS:,} are read"
            )
        subifds = _subifd_offsets(handle, fmt, entries)
        directories += len(subifds)
        if directories > MAX_DIRECTORIES:
            raise StackLimitError(f"it holds more than {MAX_DIRECTORIES:,} image directories (IFDs and SubIFDs)")
        for sub_offset in subifds:
            if 8 <= sub_offset < size:
                described += _directory_bytes(fmt, _read_directory(handle, fmt, sub_offset)[0])
        if described > budget:
            raise LimitError(
                f"the file is corrupt (its directories and the tables they list add up to {described:,} bytes, "
                f"far more than its {size:,} bytes hold)"
            )
        offset = next_offset


def _read_directory(handle, fmt, offset: int) -> tuple[list[tuple], int]:
    """The ``(code, dtype, count, value)`` entries of the IFD at ``offset`` and the next IFD's offset."""
    handle.seek(offset)
    head = handle.read(fmt.tagnosize)
    if len(head) != fmt.tagnosize:
        raise LimitError(f"the file is truncated or corrupt (the image directory at byte {offset:,} is cut off)")
    (tagno,) = struct.unpack(fmt.tagnoformat, head)
    if tagno > _MAX_TAGS:
        raise LimitError(f"the file is corrupt (the image directory at byte {offset:,} declares {tagno:,} tags, at most {_MAX_TAGS:,})")
    block = handle.read(tagno * fmt.tagsize + fmt.offsetsize)
    if len(block) != tagno * fmt.tagsize + fmt.offsetsize:
        raise LimitError(f"the file is truncated or corrupt (the image directory at byte {offset:,} is cut off)")
    entries = list(struct.iter_unpack(fmt.tagheaderformat, block[: tagno * fmt.tagsize]))
    (next_offset,) = struct.unpack(fmt.offsetformat, block[-fmt.offsetsize :])
    return entries, int(next_offset)


def _value_size(dtype: int, count: int) -> int:
    value_format = tifffile.TIFF.DATA_FORMATS.get(dtype)
    return 0 if value_format is None else count * struct.calcsize(value_format)


def _directory_bytes(fmt, entries: list[tuple]) -> int:
    """Bytes of the IFD itself and of the values it stores elsewhere in the file."""
    total = fmt.tagnosize + len(entries) * fmt.tagsize + fmt.offsetsize
    for _code, dtype, count, _value in entries:
        value_size = _value_size(dtype, count)
        if value_size > fmt.tagoffsetthreshold:
            total += value_size
    return total


def _subifd_offsets(handle, fmt, entries: list[tuple]) -> tuple[int, ...]:
    """Offsets listed by the SubIFDs tag (330), whose count is within the limit."""
    for code, dtype, count, value in entries:
        if code != _SUBIFDS_TAG:
            continue
        value_format = tifffile.TIFF.DATA_FORMATS.get(dtype)
        if value_format is None or count == 0:
            return ()
        size = _value_size(dtype, count)
        if size <= fmt.tagoffsetthreshold:
            data = value[:size]
        else:
            (where,) = struct.unpack(fmt.offsetformat, value)
            handle.seek(where)
            data = handle.read(size)
            if len(data) != size:
                raise LimitError(f"the file is truncated or corrupt (the list of SubIFDs at byte {where:,} is cut off)")
        item = value_format[-1]
        repeat = int(value_format[:-1] or 1)
        return struct.unpack(f"{fmt.byteorder}{count * repeat}{item}", data)[::repeat]
    return ()


def check_levels(levels: list[tifffile.TiffPageSeries]) -> None:
    """Check level count, sizes, tile sizes and tile tables of the image to open.

    Raises :class:`LimitError` when a limit is exceeded or a tile table does
    not match the image size it belongs to.
    """
    if len(levels) > MAX_LEVELS:
        raise LimitError(f"the image has {len(levels):,} resolution levels; at most {MAX_LEVELS} are read")
    for number, level in enumerate(levels):
        sizes = dict(zip(level.axes, level.shape))
        height, width = sizes.get("Y", 0), sizes.get("X", 0)
        where = f"level {number}" if len(levels) > 1 else "the image"
        if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
            raise LimitError(
                f"{where} declares {width:,} × {height:,} pixels; images must be 1 to {MAX_SIDE:,} pixels per side"
            )
        for page in level:
            if page is not None:
                _check_page(page, where)


def _check_page(page: tifffile.TiffPage | tifffile.TiffFrame, where: str) -> None:
    keyframe = page.keyframe
    height, width = keyframe.imagelength, keyframe.imagewidth
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise LimitError(
            f"{where} declares {width:,} × {height:,} pixels; images must be 1 to {MAX_SIDE:,} pixels per side"
        )
    tiled = keyframe.is_tiled or 322 in keyframe.tags or 323 in keyframe.tags  # TileWidth, TileLength
    if tiled:
        tile_height, tile_width = keyframe.tilelength, keyframe.tilewidth
        if not (1 <= tile_height <= MAX_TILE_SIDE and 1 <= tile_width <= MAX_TILE_SIDE):
            raise LimitError(
                f"{where} has tiles of {tile_width:,} × {tile_height:,} pixels; "
                f"tiles must be 1 to {MAX_TILE_SIDE:,} pixels per side"
            )
        if keyframe.tiledepth != 1:
            raise LimitError(f"{where} has 3-D tiles ({keyframe.tiledepth:,} deep)")
    else:
        rows = keyframe.rowsperstrip
        itemsize = keyframe.dtype.itemsize if keyframe.dtype is not None else 1
        strip_bytes = rows * width * keyframe.samplesperpixel * itemsize
        if rows < 1 or strip_bytes > MAX_STRIP_BYTES:
            raise LimitError(
                f"{where} is stored in strips of {rows:,} rows ({strip_bytes:,} bytes each); "
                f"strips must hold 1 row or more and at most {MAX_STRIP_BYTES:,} bytes"
            )
    expected = math.prod(keyframe.chunked)
    offsets, counts = len(page.dataoffsets), len(page.databytecounts)
    if offsets != expected or counts != expected:
        kind = "tile" if tiled else "strip"
        raise LimitError(
            f"{where} lists {offsets:,} {kind} offsets and {counts:,} {kind} byte counts, "
            f"but {width:,} × {height:,} pixels need {expected:,} {kind}s"
        )
