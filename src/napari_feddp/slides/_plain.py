"""Open a plain PNG or JPEG picture (a field of view, not a slide) as a one-level :class:`Slide`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._open import Slide, SlideError

#: File name endings opened by :func:`open_plain_image`.
PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Pillow modes of single-channel pictures: masks and label images, not tissue.
_SINGLE_CHANNEL_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "F")


def is_plain_image_path(path: str | os.PathLike) -> bool:
    """True when the file name ends like a PNG or JPEG picture."""
    return str(path).lower().endswith(PLAIN_IMAGE_SUFFIXES)


def open_plain_image(path: str | os.PathLike) -> Slide:
    """Decode a PNG or JPEG picture into a one-level, in-memory :class:`Slide`.

    Such pictures are small (a camera field or a tile cut from a slide), so
    they are decoded whole. They carry no reliable pixel size (their dpi
    fields describe printing), so ``mpp`` is None: give it to the engine.

    Parameters
    ----------
    path : str or PathLike
        A ``.png``, ``.jpg`` or ``.jpeg`` file.

    Returns
    -------
    Slide
        ``kind="rgb"`` with one ``(Y, X, 3)`` uint8 level (alpha dropped, palette
        expanded), or ``kind="labels"`` with one ``(Y, X)`` level for
        single-channel pictures; ``vendor`` is ``"png"`` or ``"jpeg"``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    SlideError
        If the file is not a readable PNG or JPEG picture.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such image file: {path}")
    try:
        with Image.open(path) as picture:
            vendor = {"PNG": "png", "JPEG": "jpeg"}.get(picture.format)
            if vendor is None:
                raise SlideError(f"Cannot open {path.name}: expected a PNG or JPEG picture, received {picture.format}")
            single = picture.mode in _SINGLE_CHANNEL_MODES
            pixels = np.asarray(picture if single else picture.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise SlideError(f"Cannot open {path.name}: not a readable PNG or JPEG picture ({exc})") from None
    return Slide([pixels], path=path, vendor=vendor, kind="labels" if single else "rgb")
