"""Save a region a pathologist annotated in napari as a training tile (no Qt here).

The widget passes the pixels of an image-layer region and of the Labels layer
painted over it; this module writes them into the lab's dataset folder in the
layout :class:`~napari_feddp.training.SegmentationDataset` reads, and appends a
provenance record so every tile can be traced back to its slide and region.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._atomic import write_atomic
from ._io import SUFFIXES, encode_png, encode_tiff
from .dataset import PROVENANCE_FILE
from .errors import DatasetError

IMAGE_FORMATS = ("png", "tif")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,150}$")


class SavedTile(NamedTuple):
    """Paths written by :func:`save_annotated_tile`."""

    name: str
    image: Path
    mask: Path
    provenance: Path


def save_annotated_tile(
    dataset_dir: str | Path,
    image: np.ndarray,
    mask: np.ndarray,
    provenance: Mapping[str, Any],
    *,
    name: str | None = None,
    image_format: str = "png",
    binary: bool = True,
    overwrite: bool = False,
) -> SavedTile:
    """Write ``images/NAME.png`` (or ``.tif``), ``masks/NAME.png`` and a provenance record.

    When ``mask`` holds one label per nucleus (more than one id), the nuclei are also written
    to ``instances/NAME.png`` (16-bit, ids renumbered 1..N): the targets from which contour
    models learn to separate touching nuclei.

    Parameters
    ----------
    dataset_dir : str or Path
        The lab's dataset folder (created if missing).
    image : ndarray
        ``(H, W, 3|4)`` uint8 RGB(A) pixels of the region as annotated (alpha is dropped).
    mask : ndarray
        ``(H, W)`` integer or boolean Labels-layer data of the same region.
    provenance : mapping
        JSON-serialisable description of where the tile comes from, e.g. ``source`` (slide
        file), ``level``, ``region`` (``[y0, x0, y1, x1]`` level-0 pixels), ``mpp`` (µm per
        pixel of ``image``; training resamples with it), ``layer`` names, ``annotator``. No
        patient identifiers.
    name : str or None
        File stem; default ``<source stem>_y<y0>_x<x0>_<8 hex of content hash>``.
    image_format : {"png", "tif"}
        Lossless format of the image file.
    binary : bool
        ``True``: any non-zero label is foreground (1) in ``masks/`` (painted instance ids are
        kept in ``instances/``). ``False``: labels are class indices (< 256).
    overwrite : bool
        Replace an existing tile of the same name instead of raising.

    Raises
    ------
    DatasetError
        If the arrays have the wrong type/shape or differ in size, the provenance is not
        JSON-serialisable, the name is invalid, or the tile exists and ``overwrite`` is false.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format: expected one of {IMAGE_FORMATS}, received {image_format!r}")
    rgb = _check_image(image)
    labels = _check_mask(mask, rgb.shape[:2], binary=binary)
    record = _check_provenance(provenance)
    name = name if name is not None else _default_name(record, rgb, labels)
    _check_name(name)
    root = Path(dataset_dir)
    image_path = root / "images" / f"{name}.{image_format}"
    mask_path = root / "masks" / f"{name}.png"
    _check_free(root, name, overwrite=overwrite)
    image_bytes = encode_png(rgb) if image_format == "png" else encode_tiff(rgb)
    mask_bytes = encode_png(labels)
    nuclei = _instances(mask) if binary else None
    write_atomic(image_path, image_bytes)
    write_atomic(mask_path, mask_bytes)
    instance_path = root / "instances" / f"{name}.png"
    if nuclei is not None:
        write_atomic(instance_path, encode_png(nuclei))
    elif instance_path.exists():  # an overwritten tile must not keep its old nuclei
        instance_path.unlink()
    provenance_path = _append_provenance(root, name, image_path, mask_path, image_bytes, mask_bytes, rgb, record)
    return SavedTile(name, image_path, mask_path, provenance_path)


def _check_image(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise DatasetError(
            f"annotated tile image: expected a uint8 array of shape (H, W, 3) or (H, W, 4), "
            f"received dtype {array.dtype} shape {array.shape}"
        )
    if min(array.shape[:2]) < 1:
        raise DatasetError(f"annotated tile image: expected a non-empty region, received shape {array.shape}")
    return np.ascontiguousarray(array[..., :3])


def _check_mask(mask: Any, size: tuple[int, ...], *, binary: bool) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise DatasetError(
            f"annotated tile mask: expected a 2-D integer Labels array, received dtype {array.dtype} shape {array.shape}"
        )
    if array.shape != tuple(size):
        raise DatasetError(
            f"annotated tile: image is {size[0]}x{size[1]} but mask is {array.shape[0]}x{array.shape[1]} (HxW); "
            f"expected the Labels region to match the image region"
        )
    if binary:
        return (array > 0).astype(np.uint8)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise DatasetError(
            f"annotated tile mask: expected class indices 0..255 with binary=False, "
            f"received values from {array.min()} to {array.max()}"
        )
    return array.astype(np.uint8)


def _instances(mask: Any) -> np.ndarray | None:
    """The nuclei of an instance Labels array, renumbered 1..N as uint16; None for a plain mask."""
    from skimage.segmentation import relabel_sequential

    array = np.asarray(mask)
    if array.dtype == bool or array.size == 0 or len(np.unique(array[array > 0])) < 2:
        return None
    relabelled, _, _ = relabel_sequential(np.where(array > 0, array, 0).astype(np.int64))
    if relabelled.max() > np.iinfo(np.uint16).max:
        raise DatasetError(f"annotated tile: at most 65535 nuclei per tile, received {int(relabelled.max())}")
    return relabelled.astype(np.uint16)


def _check_provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(provenance, Mapping):
        raise DatasetError(f"provenance: expected a dict, received {type(provenance).__name__}")
    try:
        record = json.loads(json.dumps(dict(provenance), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"provenance: expected JSON-serialisable values (str, numbers, lists, dicts), {exc}") from exc
    mpp = record.get("mpp")
    if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not mpp > 0):
        raise DatasetError(f"provenance 'mpp': expected a positive number of µm per pixel, received {mpp!r}")
    return record


def _default_name(record: dict[str, Any], rgb: np.ndarray, labels: np.ndarray) -> str:
    source = Path(str(record.get("source") or "tile")).name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", source.split(".")[0]).strip("-._") or "tile"
    region = record.get("region")
    where = ""
    if isinstance(region, (list, tuple)) and len(region) >= 2 and all(isinstance(v, (int, float)) for v in region[:2]):
        where = f"_y{int(region[0])}_x{int(region[1])}"
    digest = hashlib.sha256(rgb.tobytes() + labels.tobytes() + repr(rgb.shape).encode()).hexdigest()[:8]
    return f"{stem[:80]}{where}_{digest}"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise DatasetError(
            f"tile name: expected letters, digits, '.', '_' or '-' (first a letter or digit, "
            f"at most 151 characters), received {name!r}"
        )


def _check_free(root: Path, name: str, *, overwrite: bool) -> None:
    """Refuse to create a second file with the same stem (e.g. NAME.png next to NAME.tif)."""
    existing = [
        root / sub / f"{name}{suffix}" for sub in ("images", "masks") for suffix in SUFFIXES
        if (root / sub / f"{name}{suffix}").exists()
    ]
    if not existing:
        return
    if not overwrite:
        raise DatasetError(
            f"tile {name!r} already exists in {root} ({', '.join(p.name for p in existing)}); "
            f"pass overwrite=True or another name"
        )
    for path in existing:
        path.unlink()


def _append_provenance(
    root: Path, name: str, image_path: Path, mask_path: Path,
    image_bytes: bytes, mask_bytes: bytes, rgb: np.ndarray, record: dict[str, Any],
) -> Path:
    entry = {
        "name": name,
        "image": f"images/{image_path.name}",
        "mask": f"masks/{mask_path.name}",
        "image_sha256": hashlib.sha256(image_bytes).hexdigest(),
        "mask_sha256": hashlib.sha256(mask_bytes).hexdigest(),
        "shape": [int(rgb.shape[0]), int(rgb.shape[1])],
        "mpp": record.get("mpp"),
        "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "provenance": record,
    }
    path = root / PROVENANCE_FILE
    previous = path.read_bytes() if path.exists() else b""
    if previous and not previous.endswith(b"\n"):
        previous += b"\n"
    line = json.dumps(entry, sort_keys=True, ensure_ascii=False, allow_nan=False)
    write_atomic(path, previous + line.encode("utf-8") + b"\n")
    return path
