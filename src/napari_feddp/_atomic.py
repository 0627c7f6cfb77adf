"""Atomic, exclusive file writes: readers see the old file or the new one, never a partial one.

Every file the product writes (checkpoints, ledgers, label images, GeoJSON,
logs) goes through :func:`atomic_path` or :func:`write_atomic`. The temporary
file has a unique name in the destination folder, so two writers never share
it, and ``os.replace`` stays on one file system. :func:`exclusive` keeps two
runs from writing the same output at once.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import filelock


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    The caller writes the temporary file by name (tifffile, json, ...). When
    the block raises (including ``KeyboardInterrupt``) the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


class OutputBusyError(OSError):
    """Another process is writing the same output file."""


@contextlib.contextmanager
def exclusive(paths) -> Iterator[None]:
    """Hold a lock on each output path for the duration of the block.

    The lock is an OS file lock on a hidden ``.NAME.lock`` next to the output
    (released by the kernel if the process dies), removed again on exit.

    Raises
    ------
    OutputBusyError
        At once, without waiting, if another process holds one of the locks.
    """
    with contextlib.ExitStack() as stack:
        for path in paths:
            path = Path(path)
            lock_path = path.with_name(f".{path.name}.lock")
            lock = filelock.FileLock(lock_path, timeout=0)
            try:
                lock.acquire()
            except filelock.Timeout:
                raise OutputBusyError(
                    f"{path}: another run is writing this file now; wait for it to finish or choose another name"
                ) from None
            stack.callback(lock.release)
            stack.callback(lock_path.unlink, missing_ok=True)  # runs before the release: no one else holds it
        yield


def _fsync_dir(directory: Path) -> None:
    """Persist a rename on POSIX; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
