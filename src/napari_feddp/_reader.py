"""npe2 reader: whole-slide images as one lazy multiscale layer in micrometres."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from .slides import NotASlideError, Slide, SlideError, is_slide_path, open_slide
from .slides._open import VENDOR_SUFFIXES

#: Set to 1 to add a slide's label and macro pictures as extra layers. They can
#: show patient identifiers, so this is off unless the user opts in.
SHOW_ASSOCIATED_ENV = "NAPARI_FEDDP_SHOW_ASSOCIATED"

LayerData = tuple  # (data, add_kwargs, layer_type)


class SlideUnitsWarning(UserWarning):
    """The slide has no physical pixel size: it is shown in pixel units."""


def napari_get_reader(path: str | list[str]) -> Callable | None:
    """Return :func:`read_slide` if ``path`` is a slide this plugin reads, else None.

    Vendor formats (.svs, .ndpi, .scn, .bif) are always claimed, so that a
    corrupt file gets our clear error. A generic ``.tif``/``.tiff`` is claimed
    when it is an RGB slide or one of our label exports, and when it is a TIFF
    too damaged to read or declaring sizes beyond the slide limits: its error
    is shown rather than the file passed to a reader that could hang or run
    out of memory on it. Anything else (stacks, float images, non-TIFF data)
    is declined for other readers. Opening is checked against the limits
    first, so this answers in well under a second whatever the file declares.
    """
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)) or not is_slide_path(path):
        return None
    if str(path).lower().endswith(VENDOR_SUFFIXES):
        return read_slide
    try:
        slide = open_slide(path)
    except (NotASlideError, FileNotFoundError):
        return None
    except SlideError:
        # A TIFF that tifffile cannot parse at all may still be another
        # format's business; one it can parse but not read is ours to explain.
        return read_slide if _looks_like_tiff(path) else None
    # Hand the slide we just opened to the reader instead of parsing it twice.
    return functools.partial(read_slide, _opened=slide)


def read_slide(
    path: str | list[str], *, show_associated: bool | None = None, _opened: Slide | None = None
) -> list[LayerData]:
    """Read a slide into napari layer data.

    Returns one multiscale RGB image layer (the slide's lazy levels, highest
    resolution first) with ``scale`` in micrometres, or a labels layer for our
    OME-TIFF label exports. Associated label/macro images are added only when
    ``show_associated`` is true (or the environment variable
    ``NAPARI_FEDDP_SHOW_ASSOCIATED=1`` is set).
    """
    if isinstance(path, list):
        path = path[0]
    slide = _opened if _opened is not None else open_slide(path)
    layers = [slide_layer_data(slide)]
    if show_associated is None:
        show_associated = os.environ.get(SHOW_ASSOCIATED_ENV, "") == "1"
    if show_associated:
        layers.extend(associated_layer_data(slide))
    return layers


def slide_layer_data(slide: Slide) -> LayerData:
    """Layer data tuple for the main image of ``slide``."""
    meta = slide.metadata()
    kwargs: dict = {"name": Path(slide.path).name, "metadata": {"feddp": meta}}
    if slide.mpp is not None:
        kwargs["scale"] = slide.mpp
        kwargs["units"] = ("micrometer", "micrometer")
    else:
        warnings.warn(
            f"{slide.path.name}: no physical pixel size in the file's metadata; "
            "showing it in pixel units (measurements will be in pixels, not µm).",
            SlideUnitsWarning,
            stacklevel=2,
        )
    data = slide.levels if len(slide.levels) > 1 else slide.levels[0]
    kwargs["multiscale"] = len(slide.levels) > 1
    if slide.kind == "labels":
        return (data, kwargs, "labels")
    kwargs["rgb"] = True
    kwargs["contrast_limits"] = (0, 255)  # avoids a pass over the data to guess them
    return (data, kwargs, "image")


def associated_layer_data(slide: Slide) -> list[LayerData]:
    """Layers for the label/macro/thumbnail pictures (explicit opt-in only)."""
    layers = []
    for name in sorted(slide.associated):
        image = slide.read_associated(name)
        layers.append((image, {"name": f"{slide.path.name} [{name}]", "rgb": image.ndim == 3}, "image"))
    return layers


def _looks_like_tiff(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head[:2] in (b"II", b"MM")
