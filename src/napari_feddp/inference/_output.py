"""The label map's zarr store: created up front, written chunk by chunk."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.storage

from .errors import InferenceError

#: Label maps up to this many bytes live in memory when no store is given;
#: larger ones go to a temporary directory on disk.
IN_MEMORY_MAX_BYTES = 64 * 2**20


def create_output(
    out: str | os.PathLike | Any | None,
    shape: tuple[int, int],
    chunks: tuple[int, int],
    dtype: np.dtype,
    attributes: dict,
    *,
    overwrite: bool = False,
) -> tuple[zarr.Array, Path | None, tempfile.TemporaryDirectory | None]:
    """Create the (empty, zero-filled) label array; return it, its directory and the temporary
    directory handle (both None when they do not apply).

    ``out`` is a directory for a zarr v3 array, any zarr store, or None: in memory when the
    labels take at most :data:`IN_MEMORY_MAX_BYTES`, else a temporary directory removed when
    the result is garbage collected. ``overwrite`` replaces an existing store at ``out``.
    """
    tempdir = None
    path: Path | None = None
    nbytes = int(shape[0]) * int(shape[1]) * np.dtype(dtype).itemsize
    if out is None:
        if nbytes <= IN_MEMORY_MAX_BYTES:
            store: Any = zarr.storage.MemoryStore()
        else:
            tempdir = tempfile.TemporaryDirectory(prefix="napari-feddp-labels-")
            path = Path(tempdir.name) / "labels.zarr"
            store = zarr.storage.LocalStore(path)
    elif isinstance(out, (str, os.PathLike)):
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if not overwrite:
                raise InferenceError(
                    f"out: expected a new or empty directory for the label store, received existing {path}; "
                    "pass overwrite=True to replace it"
                )
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        store = zarr.storage.LocalStore(path)
    else:
        store = out
    array = zarr.create_array(
        store,
        shape=tuple(int(s) for s in shape),
        chunks=tuple(int(c) for c in chunks),
        dtype=dtype,
        fill_value=0,
        attributes=attributes,
        dimension_names=("y", "x"),
        overwrite=overwrite,
    )
    return array, path, tempdir


class ChunkWriter:
    """Collect finished label pieces and write each output chunk once, when whole.

    Chunks that stay all zero (background) are never written: the store's
    fill value already says 0, and nothing is stored for them.
    """

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.chunks = tuple(int(c) for c in array.chunks)
        self._buffers: dict[tuple[int, int], list] = {}

    def _chunk_box(self, r: int, c: int) -> tuple[int, int, int, int]:
        ch, cw = self.chunks
        return r * ch, c * cw, min((r + 1) * ch, self.shape[0]), min((c + 1) * cw, self.shape[1])

    def put(self, y0: int, x0: int, labels: np.ndarray) -> None:
        """Place finished ``labels`` at ``(y0, x0)``; pieces must never overlap."""
        ch, cw = self.chunks
        y1, x1 = y0 + labels.shape[0], x0 + labels.shape[1]
        for r in range(y0 // ch, (y1 - 1) // ch + 1):
            for c in range(x0 // cw, (x1 - 1) // cw + 1):
                by0, bx0, by1, bx1 = self._chunk_box(r, c)
                entry = self._buffers.get((r, c))
                if entry is None:
                    entry = [np.zeros((by1 - by0, bx1 - bx0), self.array.dtype), 0]
                    self._buffers[(r, c)] = entry
                sy0, sy1, sx0, sx1 = max(y0, by0), min(y1, by1), max(x0, bx0), min(x1, bx1)
                entry[0][sy0 - by0 : sy1 - by0, sx0 - bx0 : sx1 - bx0] = labels[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
                entry[1] += (sy1 - sy0) * (sx1 - sx0)
                if entry[1] >= entry[0].size:
                    self._write((r, c))

    def flush_rows_before(self, y: int) -> None:
        """Write every buffered chunk that lies entirely above row ``y``."""
        ch = self.chunks[0]
        for key in [k for k in self._buffers if min((k[0] + 1) * ch, self.shape[0]) <= y]:
            self._write(key)

    def flush_all(self) -> None:
        """Write every buffered chunk."""
        for key in list(self._buffers):
            self._write(key)

    def discard(self) -> None:
        """Drop buffered, unfinished chunks (on cancel)."""
        self._buffers.clear()

    def _write(self, key: tuple[int, int]) -> None:
        buffer, _ = self._buffers.pop(key)
        if buffer.any():
            by0, bx0, by1, bx1 = self._chunk_box(*key)
            self.array[by0:by1, bx0:bx1] = buffer
