"""Read and write the image/mask files of a local training dataset.

PNG goes through Pillow (which keeps palette indices of ``P`` mode masks);
TIFF goes through tifffile. Every failure is re-raised as
:class:`~napari_feddp.training.errors.DatasetError` naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from .errors import DatasetError

#: File endings read as images or masks (lower case).
SUFFIXES = (".png", ".tif", ".tiff")
TIFF_SUFFIXES = (".tif", ".tiff")
MASK_MODES = ("auto", "binary", "classes")


def is_supported(path: Path) -> bool:
    """True for visible PNG/TIFF files (dotfiles such as ``._x.png`` are skipped)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in SUFFIXES


def read_size(path: Path) -> tuple[int, int]:
    """Return ``(height, width)`` of an image file, reading only its header.

    Raises
    ------
    DatasetError
        If the file cannot be parsed as PNG/TIFF.
    """
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes, shape = series.axes, series.shape
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        with Image.open(path) as img:
            width, height = img.size
        return int(height), int(width)
    except Exception as exc:  # any parser error means "unreadable"
        raise DatasetError(f"cannot read {path}: not a readable PNG/TIFF ({type(exc).__name__}: {exc})") from exc


def _decode(path: Path) -> np.ndarray:
    """Decode all pixels of the first image in ``path``."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                return tif.series[0].asarray()
        with Image.open(path) as img:
            img.load()
            if img.mode == "1":
                return np.asarray(img, dtype=np.uint8)
            if img.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(img).astype(np.uint16)
            return np.asarray(img)
    except Exception as exc:
        raise DatasetError(f"cannot read {path}: file is corrupt or truncated ({type(exc).__name__}: {exc})") from exc


def _read_array(path: Path) -> np.ndarray:
    """The pixels of ``path``, singleton axes dropped and a planar ``(C, Y, X)`` channel axis moved last."""
    array = np.squeeze(_decode(path))
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    return array


def read_image(path: Path) -> np.ndarray:
    """Read an RGB image as ``(H, W, 3)`` uint8 (an alpha channel is dropped).

    Raises
    ------
    DatasetError
        If the file is unreadable, not 8-bit, or not RGB/RGBA.
    """
    array = _read_array(path)
    if array.dtype != np.uint8:
        raise DatasetError(f"image {path}: expected 8-bit RGB (uint8), received dtype {array.dtype}")
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise DatasetError(
            f"image {path}: expected an RGB image of shape (H, W, 3), received shape {array.shape}"
        )
    return np.ascontiguousarray(array[..., :3])


def read_mask(path: Path, *, n_classes: int = 2, mask_mode: str = "auto") -> np.ndarray:
    """Read a label mask (greyscale, palette, or RGB with equal channels) as ``(H, W)`` uint8 class indices.

    Parameters
    ----------
    path : Path
        PNG or TIFF file.
    n_classes : int
        Number of classes the model predicts, background (0) included.
    mask_mode : {"auto", "binary", "classes"}
        ``"auto"``: values ``{0, 1}`` and class indices ``< n_classes`` are kept; ``{0, 255}``
        becomes ``{0, 1}``. ``"binary"``: any non-zero value is foreground (use for
        instance-label maps). ``"classes"``: values are class indices ``< n_classes``.

    Raises
    ------
    DatasetError
        If the file is unreadable, coloured, or holds values that fit none of the accepted encodings.
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode: expected one of {MASK_MODES}, received {mask_mode!r}")
    array = _integer_labels(path, "mask", "integer labels")
    if mask_mode == "binary":
        return (array > 0).astype(np.uint8)
    return _class_indices(array, path, n_classes=n_classes, mask_mode=mask_mode)


def read_instances(path: Path) -> np.ndarray:
    """Read a nucleus instance map (0 background, one integer id per nucleus) as ``(H, W)`` int32.

    Raises
    ------
    DatasetError
        If the file is unreadable, not a single-channel integer image, or holds negative ids.
    """
    array = _integer_labels(path, "instance map", "integer ids")
    if array.size and array.min() < 0:
        raise DatasetError(f"instance map {path}: expected ids >= 0, received {array.min()}")
    return array.astype(np.int32, copy=False)


def find_instance_map(dataset_dir: Path, name: str) -> Path | None:
    """``DIR/instances/NAME.{png,tif,tiff}`` when the dataset has per-nucleus annotations, else None."""
    for suffix in SUFFIXES:
        path = Path(dataset_dir) / "instances" / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _integer_labels(path: Path, what: str, expected: str) -> np.ndarray:
    """The single-channel integer image of a mask or instance map (RGB with equal channels is grey)."""
    array = _read_array(path)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DatasetError(
                f"mask {path}: expected a greyscale label mask, received a colour image "
                f"(shape {array.shape}); save the mask as single-channel class indices"
            )
        array = rgb[..., 0]
    if array.ndim != 2:
        raise DatasetError(f"mask {path}: expected a 2-D mask (H, W), received shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(f"{what} {path}: expected {expected}, received dtype {array.dtype}")
    return array


def _class_indices(array: np.ndarray, path: Path, *, n_classes: int, mask_mode: str) -> np.ndarray:
    values = np.unique(array)
    shown = ", ".join(str(v) for v in values[:12]) + (" ..." if len(values) > 12 else "")
    if values.size and values[0] < 0:
        raise DatasetError(f"mask {path}: expected non-negative labels, received values {{{shown}}}")
    if mask_mode == "auto" and values.size and values[-1] == 255 and set(values.tolist()) <= {0, 255}:
        return (array == 255).astype(np.uint8)
    if values.size and values[-1] >= n_classes:
        hint = "" if mask_mode == "classes" else "; for an instance-label map pass mask_mode='binary'"
        raise DatasetError(
            f"mask {path}: expected 0/1, 0/255 or class indices 0..{n_classes - 1}, "
            f"received values {{{shown}}}{hint}"
        )
    return array.astype(np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``(H, W)`` or ``(H, W, 3)`` array, or a uint16 ``(H, W)`` one."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_tiff(array: np.ndarray) -> bytes:
    """Losslessly compressed (zlib) TIFF bytes of a uint8 array."""
    buffer = io.BytesIO()
    photometric = "rgb" if array.ndim == 3 else "minisblack"
    tifffile.imwrite(buffer, array, photometric=photometric, compression="zlib")
    return buffer.getvalue()
