"""Segment a slide with a checkpoint and export the result: the service behind the
Segment widget and ``napari-feddp segment`` (no Qt here)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from .inference import InferenceSpec, Progress, SegmentationResult, segment_slide
from .models import ModelCard, load_checkpoint
from .models.store import resolve_checkpoint
from .regions import PolygonRegion, mask_outside, region_from_geojson


@dataclass
class LoadedModel:
    """A model ready for inference with what the engine and the viewer need."""

    model: torch.nn.Module
    card: ModelCard
    spec: InferenceSpec
    path: Path

    @property
    def class_colors(self) -> list[str]:
        return [c.color for c in self.card.classes]


def spec_from_card(card: ModelCard, model: torch.nn.Module | None = None) -> InferenceSpec:
    """Engine settings from a model card, checked against the model's size multiple."""
    spec = InferenceSpec.from_card(card)
    if model is not None and getattr(model, "size_multiple", 1) != spec.size_multiple:
        spec = dataclasses.replace(spec, size_multiple=int(model.size_multiple))
    return spec


def load_model(choice: str | os.PathLike | None = None, device: str = "cpu") -> LoadedModel:
    """Resolve ``choice`` (see :func:`~napari_feddp.models.store.resolve_checkpoint`) and load it."""
    path = resolve_checkpoint(choice)
    model, card = load_checkpoint(path, device=device)
    return LoadedModel(model=model, card=card, spec=spec_from_card(card, model), path=path)


# --- messages in the front end's words ------------------------------------


@dataclass(frozen=True)
class Controls:
    """How a front end lets the user give the pixel size, predict background tiles too, choose
    a checkpoint file and make a run need less memory: the engine's and the model store's hints
    name Python parameters (``tissue=False``), a user needs the control in front of them."""

    pixel_size: str
    whole_slide: str
    model: str
    smaller_run: str


#: ``napari-feddp segment``.
CLI_CONTROLS = Controls(
    pixel_size="pass --mpp MICRONS_PER_PIXEL",
    whole_slide="pass --all-tiles to predict every tile",
    model="pass a checkpoint with --model CKPT.safetensors",
    smaller_run="segment a --region or with a smaller --batch-size",
)
#: The Segment dock widget.
WIDGET_CONTROLS = Controls(
    pixel_size="set the pixel size field (µm/px)",
    whole_slide='choose region "whole slide" to predict every tile',
    model='choose model "checkpoint file…"',
    smaller_run='choose region "current view" or a smaller batch size',
)
# Hints of the engine and the model store, and the control each one stands for.
_HINTS = (
    (re.compile(r"pass tissue=False to predict (?:every tile|it anyway)"), "whole_slide"),
    (re.compile(r"pass mpp=<[^>]*> to segment_slide"), "pixel_size"),
    (re.compile(r"pass a checkpoint with --model CKPT\.safetensors"), "model"),
)


class SegmentationInputError(ValueError):
    """A setting the user chose cannot work; the message says which control to change."""


# How running out of memory shows besides MemoryError: torch's allocator, oneDNN (no memory for a
# convolution's kernel), and threads that cannot start.
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|cannot allocate memory|out of memory|could not create a primitive"
                            r"|can't start new thread", re.I)


def is_out_of_memory(error: BaseException | str) -> bool:
    """Whether ``error``, or an error it arose from, is the machine running out of memory."""
    seen: set[int] = set()
    while isinstance(error, BaseException) and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and _OUT_OF_MEMORY.search(str(error))):
            return True
        error = error.__cause__ or error.__context__
    return False


def user_message(error: BaseException | str, controls: Controls) -> str:
    """The text of ``error`` with every Python-parameter hint replaced by ``controls``' words."""
    if is_out_of_memory(error):
        return f"out of memory; close other programs, or {controls.smaller_run}"
    text = str(error)
    for pattern, control in _HINTS:
        text = pattern.sub(getattr(controls, control), text)
    return text


def check_pixel_size(
    image, loaded: LoadedModel, mpp: float | tuple[float, float] | None = None, controls: Controls = CLI_CONTROLS
) -> tuple[float, float] | None:
    """The level-0 ``(y, x)`` µm per pixel a run will use: ``mpp`` (the user's) if given, else
    the image's own; None only when the model needs no pixel size.

    Called before any tile is read, so that a missing or bad pixel size is reported in the
    front end's words (``controls``) instead of the engine's.

    Raises
    ------
    SegmentationInputError
        If ``mpp`` is not a positive number, or the model expects a pixel size and neither
        ``mpp`` nor the image gives one.
    """
    if mpp is not None:
        pair = (mpp, mpp) if isinstance(mpp, (int, float)) else tuple(mpp)
        if len(pair) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in pair
        ):
            raise SegmentationInputError(f"pixel size: expected a positive number of µm per pixel, received {mpp!r}")
        return (float(pair[0]), float(pair[1]))
    own = getattr(image, "mpp", None)
    if own is not None:
        return (float(own[0]), float(own[1]))
    if loaded.spec.mpp is None:
        return None
    path = getattr(image, "path", None)
    what = Path(path).name if path else "the image"
    raise SegmentationInputError(
        f"{what} has no pixel size and the model {loaded.card.name} expects {loaded.spec.mpp:g} µm/px: "
        f"{controls.pixel_size} (µm per pixel of the full-resolution image)"
    )


# --- inputs ----------------------------------------------------------------

#: An image of one level and at most this many pixels a side is a field of view
#: (a tile or a camera picture): all of it is tissue, and the tissue detector,
#: which works on a thumbnail at 8 µm per pixel, would see only a handful of pixels.
FIELD_OF_VIEW_MAX_SIDE = 2048


def open_image(path: str | os.PathLike):
    """Open a slide (:func:`~napari_feddp.slides.open_slide`) or a PNG / JPEG picture.

    Raises
    ------
    FileNotFoundError, napari_feddp.slides.SlideError
    """
    from .slides import is_plain_image_path, open_plain_image, open_slide

    return open_plain_image(path) if is_plain_image_path(path) else open_slide(path)


def is_field_of_view(image) -> bool:
    """True for a single-level slide or RGB array of at most :data:`FIELD_OF_VIEW_MAX_SIDE` pixels a side."""
    levels = getattr(image, "levels", None)
    levels = list(levels) if levels is not None else [image]
    return len(levels) == 1 and max(int(n) for n in levels[0].shape[:2]) <= FIELD_OF_VIEW_MAX_SIDE


# --- output files -----------------------------------------------------------


class OutputPathError(ValueError):
    """An output path cannot be written; found before any work is done."""


def check_output_path(path: str | os.PathLike, what: str) -> Path:
    """Refuse an output path that cannot be written, before anything is computed.

    ``what`` is how the user gave it (``"--out"``), to start the message with. Returns ``path``
    with ``~`` expanded.

    Raises
    ------
    OutputPathError
        If ``path`` is a folder, its folder is missing or not a folder, or no file can be
        created there (read-only or virtual file systems such as ``/proc``, missing permission).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{what}: {path} is a folder; give a file name (inside it, or elsewhere)")
    parent = path.parent
    if not parent.exists():
        raise OutputPathError(f"{what}: folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputPathError(f"{what}: {parent} is not a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{what}: {path} exists and cannot be overwritten (no write permission)")
    # Permission bits do not tell (root, read-only mounts, /proc, /sys): create a file to know.
    try:
        handle, probe = tempfile.mkstemp(prefix=".feddp-probe-", dir=parent)
    except OSError as exc:
        raise OutputPathError(f"{what}: cannot create files in {parent} ({exc.strerror or exc})") from None
    os.close(handle)
    os.unlink(probe)
    return path


def check_output_paths(outputs: dict[str, str | os.PathLike | None],
                       inputs: Sequence[str | os.PathLike] = ()) -> dict[str, Path]:
    """:func:`check_output_path` for every output given (how the user gave it -> its path; None
    entries are skipped); outputs must differ from each other and from the ``inputs`` the run reads.

    Raises
    ------
    OutputPathError
    """
    checked = {what: check_output_path(path, what) for what, path in outputs.items() if path is not None}
    seen: dict[Path, str] = {Path(p).expanduser().resolve(): "the input" for p in inputs}
    for what, path in checked.items():
        key = path.resolve()
        if key in seen:
            raise OutputPathError(f"{what}: {path} is also {seen[key]}; give another file name")
        seen[key] = f"the {what} file"
    return checked


T = TypeVar("T")


def write_together(writes: Sequence[tuple[Path, Callable[[Path], T]]]) -> list[T]:
    """Write several output files so that all of them appear, or none; returns what each
    ``writer(path)`` returned.

    Each writer fills a temporary file next to its target; only when every one has succeeded
    are they moved into place. A failure removes the temporaries (and any file already moved
    into place by this call), so a run never leaves half of its outputs.
    """
    temps = [path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial") for path, _ in writes]
    placed: list[Path] = []
    try:
        results = [write(temp) for (_, write), temp in zip(writes, temps)]
        for (path, _), temp in zip(writes, temps):
            os.replace(temp, path)
            placed.append(path)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    return results


def run_segmentation(
    image,
    loaded: LoadedModel,
    *,
    region: tuple[int, int, int, int] | PolygonRegion | None = None,
    **engine_options,
) -> Generator[Progress, None, SegmentationResult]:
    """:func:`~napari_feddp.inference.segment_slide` with the loaded model's settings.

    ``region`` is a level-0 rectangle ``(y0, x0, y1, x1)`` or polygons: the engine segments
    their bounding box, then every label pixel whose centre is outside them is set to 0.
    """
    if isinstance(region, PolygonRegion):
        run = segment_slide(image, loaded.model, loaded.spec, region=region.bounds(), **engine_options)
        return _inside_polygons(run, region)
    return segment_slide(image, loaded.model, loaded.spec, region=region, **engine_options)


def _inside_polygons(
    run: Generator[Progress, None, SegmentationResult], region: PolygonRegion
) -> Generator[Progress, None, SegmentationResult]:
    result = yield from run
    if result.complete:
        mask_outside(result.labels, region, result.downsample)
    return result


def region_from_argument(text: str) -> tuple[int, int, int, int] | PolygonRegion:
    """``--region``: ``"X,Y,W,H"`` in level-0 pixels (as the engine's ``(y0, x0, y1, x1)``), or a
    GeoJSON file of polygons in level-0 pixels (as QuPath exports annotations)."""
    path = Path(text)
    if path.suffix.lower() in (".geojson", ".json") or path.is_file():
        if not path.is_file():
            raise ValueError(f"--region: GeoJSON file {text!r} does not exist")
        try:
            return region_from_geojson(path)
        except ValueError as exc:
            raise ValueError(f"--region: {exc}") from None
    try:
        x, y, w, h = (int(float(v)) for v in text.split(","))
        if w <= 0 or h <= 0 or x < 0 or y < 0:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"--region: expected X,Y,W,H as four numbers or a GeoJSON file with a polygon, received {text!r}"
        ) from None
    return (y, x, y + h, x + w)


# --------------------------------------------------------------------------- editing results

#: A result (or, when a region was given, the region's part of it) of at most
#: this many label pixels is loaded into memory as one editable array (uint32
#: nucleus ids: 256 MiB, 8192 x 8192 label pixels); larger results stay on disk
#: and are corrected through windows.
EDITABLE_MAX_PIXELS = 2**26
#: Largest side of a correction window, in label pixels.
WINDOW_MAX_SIDE = 4096


def label_box(result: SegmentationResult, region: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Label pixels ``(y0, x0, y1, x1)`` covering a level-0 ``region``, clipped to the map."""
    (dy, dx), (height, width) = result.downsample, result.labels.shape
    y0, x0, y1, x1 = region
    return (
        max(int(y0 // dy), 0), max(int(x0 // dx), 0),
        min(int(-(-y1 // dy)), height), min(int(-(-x1 // dx)), width),
    )


def editable_box(result: SegmentationResult, max_pixels: int = EDITABLE_MAX_PIXELS) -> tuple[int, int, int, int] | None:
    """Part of the label map to load as one editable array, or None when it is too large.

    The whole map when it has at most ``max_pixels``; else the segmented
    region's part of it (everything outside is 0) when that is small enough.
    """
    height, width = result.labels.shape
    if height * width <= max_pixels:
        return (0, 0, height, width)
    if result.region is not None:
        box = label_box(result, result.region)
        if (box[2] - box[0]) * (box[3] - box[1]) <= max_pixels:
            return box
    return None


class CorrectionWindow:
    """An in-memory copy of part of a large label map whose edits go back to the map.

    ``target`` is the writable ``(H, W)`` label map, ``box`` the ``(y0, x0, y1, x1)`` label pixels
    to copy (clipped to the map; sides above ``max_side`` are refused). ``data`` is the copy to
    edit (a napari Labels layer's data), ``origin`` the ``(row, col)`` of ``data[0, 0]`` in ``target``.
    """

    def __init__(self, target, box: tuple[int, int, int, int], max_side: int = WINDOW_MAX_SIDE):
        height, width = (int(s) for s in target.shape)
        y0, x0 = max(int(box[0]), 0), max(int(box[1]), 0)
        y1, x1 = min(int(box[2]), height), min(int(box[3]), width)
        if y1 <= y0 or x1 <= x0:
            raise ValueError("the view does not show the segmentation: pan to it first")
        if max(y1 - y0, x1 - x0) > max_side:
            raise ValueError(
                f"the view is {x1 - x0} x {y1 - y0} label pixels; zoom in until it is at most "
                f"{max_side} on each side to correct it"
            )
        self.target = target
        self.origin = (y0, x0)
        self.data = np.array(target[y0:y1, x0:x1])
        self._written = self.data.copy()

    def write_back(self, data=None) -> int:
        """Write what changed since the last call into the map; returns the pixels changed.

        ``data``: the edited copy, when it replaced :attr:`data` (a napari layer's data may be
        swapped for a new array of the same shape).
        """
        if data is not None and data is not self.data:
            data = np.asarray(data)
            if data.shape != self.data.shape:
                raise ValueError(f"expected the window's shape {self.data.shape}, received {data.shape}")
            self.data = data
        changed = self.data != self._written
        if not changed.any():
            return 0
        rows, cols = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        y0, x0 = self.origin
        self.target[y0 + r0 : y0 + r1, x0 + c0 : x0 + c1] = self.data[r0:r1, c0:c1]
        self._written[r0:r1, c0:c1] = self.data[r0:r1, c0:c1]
        return int(changed.sum())
