"""A minimal, read-only TIFF directory (IFD) reader for the fast open path.

tifffile parses every page it touches completely: opening a 100,000-pixel
slide unpacks each level's TileOffsets and TileByteCounts (about 200,000
integers) into Python tuples, which makes the open time grow with the slide's
size. This module reads only what a pyramid needs: the tag entries of each
directory, with large arrays (the tile tables) left on disk until a level's
tiles are first read, and then read in one call as a numpy array.

It knows the TIFF and BigTIFF layouts, both byte orders, and nothing about
vendors: :mod:`._fastopen` decides which files it may handle and leaves every
other file to tifffile.
"""

from __future__ import annotations

import os
import struct

import numpy as np

#: Bytes per value of each TIFF data type.
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
#: numpy kinds of the numeric TIFF types (RATIONALs read as pairs of integers).
TYPE_NUMPY = {1: "u1", 3: "u2", 4: "u4", 5: "u4", 6: "i1", 7: "u1", 8: "i2", 9: "i4", 10: "i4", 11: "f4", 12: "f8",
              13: "u4", 16: "u8", 17: "i8", 18: "u8"}

#: A file with more directories than this is not a slide this reader handles.
MAX_DIRECTORIES = 1024


class TiffFormatError(ValueError):
    """The bytes are not a TIFF this reader understands (the caller falls back to tifffile)."""


class TiffDirectoryFile:
    """An open file's TIFF header and a way to read its directories (``os.pread``, no seek)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(self.fd).st_size
            head = self.read(0, 16)
            order = {b"II": "<", b"MM": ">"}.get(head[:2])
            if order is None or len(head) < 8:
                raise TiffFormatError("no TIFF byte-order mark")
            self.byteorder = order
            version = struct.unpack(order + "H", head[2:4])[0]
            if version == 42:
                self.offset_size, self.first_ifd = 4, struct.unpack(order + "I", head[4:8])[0]
            elif version == 43 and len(head) == 16:
                self.offset_size, self.first_ifd = 8, struct.unpack(order + "Q", head[8:16])[0]
            else:
                raise TiffFormatError(f"TIFF version {version} is not classic TIFF or BigTIFF")
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
        return os.pread(self.fd, size, offset)

    def read_exact(self, offset: int, size: int) -> bytes:
        data = self.read(offset, size)
        if len(data) != size:
            raise TiffFormatError(f"{size} bytes at {offset} lie past the end of the file ({self.size} bytes)")
        return data

    def close(self) -> None:
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        # A slide whose napari layer is deleted is never closed explicitly: release the
        # descriptor when the last array over it goes.
        try:
            self.close()
        except OSError:
            pass

    def directory(self, offset: int) -> tuple[Directory, int]:
        """The directory at ``offset`` and the offset of the next one (0 at the end of the chain)."""
        if offset < 8 or offset >= self.size:
            raise TiffFormatError(f"directory offset {offset} outside the file")
        big = self.offset_size == 8
        count_size, entry_size = (8, 20) if big else (2, 12)
        head = self.read(offset, 4096)
        count = struct.unpack(self.byteorder + ("Q" if big else "H"), head[:count_size])[0]
        if count == 0 or count > 4096:
            raise TiffFormatError(f"directory at {offset} has {count} entries")
        need = count_size + count * entry_size + self.offset_size
        if len(head) < need:
            head = self.read_exact(offset, need)
        entry_format = self.byteorder + ("HHQ8s" if big else "HHI4s")
        entries: dict[int, tuple[int, int, bytes]] = {}
        for i in range(count):
            start = count_size + i * entry_size
            code, dtype, n, field = struct.unpack(entry_format, head[start:start + entry_size])
            entries[code] = (dtype, n, field)
        next_at = count_size + count * entry_size
        next_offset = struct.unpack(self.byteorder + ("Q" if big else "I"), head[next_at:next_at + self.offset_size])[0]
        return Directory(self, offset, entries), next_offset

    def chain(self) -> list[Directory]:
        """Every top-level directory, in file order."""
        found, offset, seen = [], self.first_ifd, set()
        while offset:
            if offset in seen or len(found) >= MAX_DIRECTORIES:
                raise TiffFormatError("the directory chain loops or is too long")
            seen.add(offset)
            ifd, offset = self.directory(offset)
            found.append(ifd)
        return found


class Directory:
    """One IFD: its tag entries, values decoded on request."""

    def __init__(self, file: TiffDirectoryFile, offset: int, entries: dict[int, tuple[int, int, bytes]]) -> None:
        self.file = file
        self.offset = offset
        self.entries = entries

    def __contains__(self, code: int) -> bool:
        return code in self.entries

    def _location(self, code: int) -> tuple[int, int, int, bytes]:
        dtype, count, field = self.entries[code]
        size = TYPE_SIZES.get(dtype)
        if size is None:
            raise TiffFormatError(f"tag {code} has unknown type {dtype}")
        nbytes = size * count
        if nbytes <= self.file.offset_size:
            return dtype, count, -1, field[:nbytes]
        offset = struct.unpack(self.file.byteorder + ("Q" if self.file.offset_size == 8 else "I"), field)[0]
        return dtype, count, offset, b""

    def raw(self, code: int) -> bytes:
        """The value's bytes as stored."""
        dtype, count, offset, inline = self._location(code)
        return inline if offset < 0 else self.file.read_exact(offset, TYPE_SIZES[dtype] * count)

    def values(self, code: int) -> np.ndarray:
        """A numeric tag as a 1-D array (a RATIONAL as numerator, denominator pairs)."""
        dtype = self.entries[code][0]
        kind = TYPE_NUMPY.get(dtype)
        if kind is None:
            raise TiffFormatError(f"tag {code} of type {dtype} is not numeric")
        return np.frombuffer(self.raw(code), dtype=self.file.byteorder + kind)

    def value(self, code: int, default: int | None = None) -> int | None:
        """The first value of an integer tag, or ``default`` when absent."""
        if code not in self.entries:
            return default
        values = self.values(code)
        if len(values) == 0:
            raise TiffFormatError(f"tag {code} is empty")
        return int(values[0])

    def text(self, code: int) -> str | None:
        """An ASCII tag as text (NUL padding and surrounding space removed), or None."""
        if code not in self.entries:
            return None
        data = self.raw(code).rstrip(b"\x00")
        try:
            return data.decode("utf-8").strip()
        except UnicodeDecodeError:
            return data.decode("cp1252", "replace").strip()

    def element(self, code: int, index: int) -> int:
        """Value ``index`` (negative counts from the end) of an integer array tag, reading only that value."""
        dtype, count, offset, inline = self._location(code)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise TiffFormatError(f"tag {code} has no value {index}")
        size = TYPE_SIZES[dtype]
        data = inline[index * size:(index + 1) * size] if offset < 0 else self.file.read_exact(offset + index * size, size)
        return int(np.frombuffer(data, dtype=self.file.byteorder + TYPE_NUMPY[dtype])[0])

    def count(self, code: int) -> int:
        return self.entries[code][1]


__all__ = ["Directory", "TiffDirectoryFile", "TiffFormatError"]
