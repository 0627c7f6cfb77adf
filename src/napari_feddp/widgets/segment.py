"""Segment dock widget: run the model over a slide in a worker thread, show one label per nucleus.

The work is the core's (:func:`napari_feddp.nuclei.segment_nuclei`); this widget collects the
choices, drives the core's progress generator in napari's ``thread_worker`` (the viewer stays
live, Cancel works between batches and windows) and adds the nuclei as a Labels layer aligned
with the slide, with the measurements as ``features`` and the summary in the status line.
Region: ``tissue``, ``current view``, ``whole slide``, or a Shapes layer's (selected) polygons,
rectangles and ellipses. A result of at most ``EDITABLE_MAX_PIXELS`` label pixels (the region's
part only, placed by ``metadata["origin"]``) is one numpy layer napari's brush can paint; a
larger one stays on disk, multiscale, and **Correct current view** copies the visible part into
an editable layer whose edits are written back into it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)

from ._style import show_message, wrap_message_label

if TYPE_CHECKING:  # pragma: no cover
    import napari

#: Model picker entry that shows a file field for any checkpoint.
MODEL_FILE = "checkpoint file…"
REGIONS = ("tissue", "current view", "whole slide")


def available_devices() -> list[str]:
    import torch

    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


class SegmentWidget(Container):
    """Image layer, model, device, region, batch size, overlap; Run and Cancel."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(labels=True)
        import napari.layers

        self.viewer = napari_viewer
        self.image = create_widget(annotation=napari.layers.Image, label="image")
        # The received models and the bundled one, by what their cards say; the
        # default is what resolve_checkpoint picks, until the user picks another.
        self._models = {}
        self._model_picked = False
        self._listing_models = False
        self.model_source = ComboBox(choices=self._model_choices, label="model")
        self.checkpoint = FileEdit(label="checkpoint", filter="*.safetensors", visible=False)
        self.pixel_size = FloatSpinBox(
            value=0.0, min=0.0, max=100.0, step=0.01, label="pixel size (µm/px)",
            tooltip="µm per pixel of the slide's full-resolution image: needed when the file has none, "
                    "or to override the file's. At 0 the file's own value is used.",
        )
        self.device = ComboBox(choices=available_devices(), value="auto", label="device")
        self.region = ComboBox(choices=self._region_choices, value="tissue", label="region")
        self.batch_size = SpinBox(value=8, min=1, max=512, label="batch size")
        self.overlap = FloatSpinBox(value=0.25, min=0.0, max=0.9, step=0.05, label="overlap")
        self.augment = CheckBox(value=False, label="test-time augmentation",
                                tooltip="Average every tile over its 8 flips and rotations: a little more "
                                        "accurate, 8 times the model time")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.correct_button = PushButton(text="Correct current view", visible=False,
                                         tooltip="Copy the visible part of a large result into an editable layer")
        self.progress = ProgressBar(value=0, min=0, max=1000, label="progress")
        self.status = Label(value="", label="status")
        self.extend([self.image, self.model_source, self.checkpoint, self.pixel_size, self.device, self.region,
                     self.batch_size, self.overlap, self.augment, self.run_button, self.cancel_button, self.correct_button,
                     self.progress, self.status])
        wrap_message_label(self.status)
        # A combo box is as wide as its longest entry by default; model lines are long.
        from qtpy.QtWidgets import QComboBox

        self.model_source.native.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_source.native.setMinimumContentsLength(18)
        self.pixel_size.native.setDecimals(4)
        self.refresh_models()
        self._on_image(self.image.value)
        self.model_source.changed.connect(self._on_model_source)
        self.image.changed.connect(self._on_image)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.correct_button.changed.connect(self.correct_view)
        from ..segmentation import EDITABLE_MAX_PIXELS

        #: Results larger than this many label pixels are shown multiscale.
        self.editable_max_pixels = EDITABLE_MAX_PIXELS
        self._large_result = None
        self.worker = None
        #: The last run's SegmentationResult (the class map) and its Nuclei (None unless complete).
        self.last_result = None
        self.last_nuclei = None
        self._cancel = threading.Event()
        self._activity = None

    # -- callbacks ---------------------------------------------------------
    def _region_choices(self, _widget=None) -> list[tuple[str, object]]:
        import napari.layers

        shapes = [layer for layer in self.viewer.layers if isinstance(layer, napari.layers.Shapes)]
        return [(name, name) for name in REGIONS] + [(f"shapes: {layer.name}", layer) for layer in shapes]

    def _model_choices(self, _widget=None) -> list[tuple[str, str]]:
        from ..models.store import available_models

        self._models = {str(info.path): info for info in available_models()}
        return [(info.description, path) for path, info in self._models.items()] + [(MODEL_FILE, MODEL_FILE)]

    def _describe_model_choice(self) -> None:
        value = self.model_source.value
        self.checkpoint.visible = value == MODEL_FILE
        info = self._models.get(value)
        self.model_source.tooltip = f"{info.description}\n{info.path}" if info is not None else None

    def reset_choices(self, *_) -> None:
        """Refresh the layer, region and model lists (napari calls this when layers change)."""
        for widget in self:
            if widget is not self.model_source and hasattr(widget, "reset_choices"):
                widget.reset_choices()
        self.refresh_models()

    def refresh_models(self) -> None:
        """List the models as the store holds them now; keep the user's pick, else select the default
        (what ``resolve_checkpoint(None)`` uses)."""
        from ..models.store import NoModelError, resolve_checkpoint

        picked = self.model_source.value if self._model_picked else None
        self._listing_models = True
        try:
            # Qt's combo box keeps old entries in place and appends new ones; emptied
            # first, it lists the models in the store's order (newest first) again.
            native = self.model_source.native
            native.blockSignals(True)
            native.clear()
            native.blockSignals(False)
            self.model_source.reset_choices()
            self._model_picked = picked in self.model_source.choices
            if not self._model_picked:
                try:
                    picked = str(resolve_checkpoint(None))
                except NoModelError:
                    picked = MODEL_FILE
            if picked in self.model_source.choices:
                self.model_source.value = picked
        finally:
            self._listing_models = False
        self._describe_model_choice()

    def _on_model_source(self, value: str) -> None:
        if not self._listing_models:
            self._model_picked = True
        self._describe_model_choice()

    def _on_image(self, layer) -> None:
        """Say in the pixel size field what the file gives, so an empty one is noticed."""
        mpp = _layer_mpp(layer) if layer is not None else None
        self.pixel_size.native.setSpecialValueText(
            f"from the slide ({mpp:.4g})" if mpp else "none in the file: set it"
        )

    def run(self, *_):
        """Start a segmentation in a worker thread; returns the worker (or None on bad input)."""
        from napari.qt.threading import create_worker

        from ..models.store import describe_model
        from ..nuclei import segment_nuclei
        from ..segmentation import WIDGET_CONTROLS, check_pixel_size, is_field_of_view, load_model, user_message

        self.progress.value = 0
        layer = self.image.value
        if layer is None:
            self._set_status("Open a slide first.", error=True)
            return None
        self.refresh_models()  # a model received since the list was made (the default, unless one was picked)
        try:
            model = self.model_source.value
            if model == MODEL_FILE:
                path = Path(self.checkpoint.value)
                if not path.name or path.is_dir():
                    raise ValueError("choose a checkpoint file (.safetensors with its .json card)")
                model = str(path)
            loaded = load_model(model)
            source, layer_mpp = _engine_source(layer)
            override = float(self.pixel_size.value) or None  # 0 means "the file's own"
            mpp = check_pixel_size(source, loaded, override or layer_mpp, WIDGET_CONTROLS)
            choice = self.region.value
            if isinstance(choice, str):
                region = _view_region(self.viewer, layer) if choice == "current view" else None
            else:
                region = shapes_region(choice, layer)
            self._cancel.clear()
            generator = segment_nuclei(
                source, loaded, mpp=mpp, region=region,
                tissue=choice != "whole slide" and not is_field_of_view(source),
                batch_size=int(self.batch_size.value), overlap=float(self.overlap.value),
                device=self.device.value, cancel=self._cancel, augment=bool(self.augment.value),
            )
        except (ValueError, FileNotFoundError) as exc:  # bad input: say it, lose nothing
            self._set_status(user_message(exc, WIDGET_CONTROLS), error=True)
            return None
        self._loaded, self._layer = loaded, layer
        info = describe_model(loaded.path)
        self._model_title = f"{info.title} ({info.source}, {info.privacy_text})"
        # Connected here, errors reach _on_error only (not also re-raised into Qt's event loop).
        worker = create_worker(lambda: (yield from generator), _start_thread=False, _connect={
            "yielded": self._on_progress, "returned": self._on_result,
            "errored": self._on_error, "finished": self._on_finished,
        })
        self.worker = worker
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self._set_status(f"Running {self._model_title} on {layer.name}…")
        from napari.utils import progress

        self._activity = progress(total=0, desc=f"FedDP: segmenting {layer.name}")
        worker.start()
        return worker

    def cancel(self, *_) -> None:
        """Ask the running segmentation to stop after the current batch."""
        self._cancel.set()
        self._set_status("Cancelling…")

    def _on_progress(self, progress) -> None:
        self.progress.value = int(1000 * progress.fraction)
        eta = f", about {progress.eta_seconds:.0f} s left" if progress.eta_seconds is not None else ""
        self._set_status(f"{progress.stage}: {progress.done}/{progress.total} {progress.unit}{eta}")
        if self._activity is not None and progress.total:
            self._activity.total = progress.total
            self._activity.n = progress.done
            self._activity.refresh()

    def _on_result(self, nuclei) -> None:
        result = nuclei.segmentation
        self.last_result, self.last_nuclei = result, (nuclei if nuclei.complete else None)
        if not result.complete:
            self._set_status(f"Cancelled after {result.tiles_done}/{result.tiles_total} tiles: no result added.")
            return
        if not nuclei.complete:
            self._set_status("Cancelled while finding the nuclei: no result added.")
            return
        from ..nuclei import describe_summary
        from ..segmentation import editable_box

        layer = self._layer
        # Placed in the image layer's own coordinates (its level-0 scale), not by the
        # result's pixel size: the two differ when the pixel size field overrides the file's.
        kwargs = nuclei.layer_kwargs("pixel")
        level0_scale = np.asarray(layer.scale[-2:], dtype=float)
        kwargs["scale"] = tuple(np.multiply(kwargs["scale"], level0_scale))
        kwargs["translate"] = tuple(np.multiply(kwargs["translate"], level0_scale) + layer.translate[-2:])
        if _layer_in_microns(layer):
            kwargs["units"] = ("micrometer", "micrometer")
        kwargs["metadata"].update(model=str(self._loaded.path), model_card=self._loaded.card.to_dict())
        box = editable_box(result, self.editable_max_pixels)
        if box is not None:  # one numpy array: napari's brush, fill and eraser work on it
            y0, x0, y1, x1 = box
            data, multiscale = np.asarray(nuclei.labels[y0:y1, x0:x1]), False
            kwargs["translate"] = tuple(np.add(kwargs["translate"], np.multiply((y0, x0), kwargs["scale"])))
            kwargs["metadata"]["origin"] = [y0, x0]
        else:
            data, multiscale = nuclei.pyramid, True
        # napari's default colormap: a colour per nucleus id.
        added = self.viewer.add_labels(
            data, multiscale=multiscale, **{**kwargs, "name": f"{layer.name} nuclei ({self._loaded.card.name})"},
        )
        added.selected_label = int(nuclei.table["label"].max(initial=0)) + 1  # the brush paints a new nucleus
        self._large_result = (added, nuclei) if multiscale else None
        self.correct_button.visible = multiscale
        self._set_status(f"Done with {self._model_title}: {describe_summary(nuclei.summary)}. "
                         f"{result.tiles_done} tiles in {result.elapsed_seconds + nuclei.elapsed_seconds:.1f} s "
                         f"({result.tiles_skipped} background tiles skipped).")

    def correct_view(self, *_):
        """Copy the visible part of the last large result into an editable Labels layer.

        Every edit of the new layer (brush, fill, eraser, undo) is written back
        into the result, and the multiscale layer redrawn, so saving that layer
        saves the corrections. Returns the new layer, or None (reason in the
        status line).
        """
        from ..segmentation import CorrectionWindow

        if self._large_result is None or self._large_result[0] not in self.viewer.layers:
            self._set_status("Segment a slide first: only a large (multiscale) result needs this.", error=True)
            return None
        layer, nuclei = self._large_result
        try:
            window = CorrectionWindow(nuclei.labels, _view_region(self.viewer, layer))
        except ValueError as exc:
            self._set_status(str(exc), error=True)
            return None
        translate = np.add(layer.translate, np.multiply(window.origin, layer.scale))
        edit = self.viewer.add_labels(
            window.data, scale=layer.scale, translate=translate, units=layer.units,
            colormap=layer.colormap, features=layer.features,
            metadata={**layer.metadata, "origin": list(window.origin)},
            name=f"{layer.name} correction",
        )
        edit.selected_label = layer.selected_label  # a new nucleus, as in the result layer

        def write_back(*_):
            if window.write_back(edit.data):
                layer.refresh()

        # paint: every committed stroke or fill; set_data: undo/redo and new data.
        edit.events.paint.connect(write_back)
        edit.events.set_data.connect(write_back)
        self._set_status(f"Correcting {window.data.shape[1]} x {window.data.shape[0]} px: "
                         "edits are written into the result.")
        return edit

    def _on_error(self, exc: Exception) -> None:
        from ..segmentation import WIDGET_CONTROLS, user_message

        # A failed run (disk full, out of memory, a damaged tile) is also a notification: it may come minutes later.
        show_message(self.status, f"Error: {user_message(exc, WIDGET_CONTROLS)}", error=True, notify=True)

    def _on_finished(self) -> None:
        self.run_button.enabled, self.cancel_button.enabled = True, False
        if self._activity is not None:
            self._activity.close()
            self._activity = None

    def _set_status(self, text: str, error: bool = False) -> None:
        show_message(self.status, text, error=error)


def _layer_mpp(layer) -> float | None:
    """The level-0 µm per pixel an image layer's file gives (x), or None."""
    mpp = (layer.metadata.get("feddp") or {}).get("mpp")
    if mpp:
        return float(mpp[-1])
    return float(layer.scale[-1]) if _layer_in_microns(layer) else None


def _layer_in_microns(layer) -> bool:
    units = getattr(layer, "units", None)
    return units is not None and all(str(u) in ("micrometer", "µm", "um") for u in tuple(units)[-2:])


def _engine_source(layer):
    """(image for the engine, level-0 mpp or None) for a napari image layer."""
    from ..slides import open_slide

    meta = layer.metadata.get("feddp") or {}
    if meta.get("path") and Path(meta["path"]).is_file():
        return open_slide(meta["path"]), None
    if not layer.rgb:
        raise ValueError(f"{layer.name}: expected an RGB image layer (H&E), got a single-channel image")
    data = layer.data[0] if layer.multiscale else layer.data
    mpp = tuple(float(s) for s in layer.scale[-2:]) if _layer_in_microns(layer) else None
    return data, mpp


def shapes_region(shapes, image):
    """The polygons of a Shapes layer in ``image``'s level-0 pixels.

    Uses the selected shapes, or all of them when none is selected; polygons,
    rectangles and ellipses count, lines and paths do not.

    Raises
    ------
    ValueError
        No polygon, rectangle or ellipse to use.
    """
    from ..regions import PolygonRegion, ellipse_polygon

    indices = sorted(shapes.selected_data) or range(len(shapes.data))
    polygons = []
    for index in indices:
        kind, vertices = shapes.shape_type[index], np.asarray(shapes.data[index], dtype=float)
        if kind not in ("polygon", "rectangle", "ellipse"):
            continue
        world = [shapes.data_to_world(v) for v in vertices]
        # napari puts pixel centres on integers; regions put pixel (r, c) over [r, r + 1).
        level0 = np.asarray([image.world_to_data(w)[-2:] for w in world]) + 0.5
        polygons.append(ellipse_polygon(level0) if kind == "ellipse" else level0)
    if not polygons:
        raise ValueError(f"{shapes.name}: draw a polygon, rectangle or ellipse to segment inside it")
    return PolygonRegion.from_yx(polygons)


def _view_region(viewer, layer) -> tuple[int, int, int, int]:
    """The part of ``layer`` visible in the canvas, as level-0 ``(y0, x0, y1, x1)``.

    From the camera (centre, zoom) and the canvas size, mapped through the
    layer's own transform: napari's ``corner_pixels`` are snapped to the
    loaded level's chunks, which can be several times what is on screen.
    """
    height, width = (float(n) for n in viewer.canvas.size[-2:])
    zoom = float(viewer.scene.camera.zoom)
    cy, cx = (float(c) for c in viewer.scene.camera.center[-2:])
    point = list(viewer.dims.point)
    corners = []
    for dy, dx in ((-1, -1), (1, 1)):
        point[-2:] = [cy + dy * height / 2 / zoom, cx + dx * width / 2 / zoom]
        corners.append(np.asarray(layer.world_to_data(point), dtype=float)[-2:])
    (y0, x0), (y1, x1) = np.minimum(*corners), np.maximum(*corners)
    shape = (layer.data[0] if layer.multiscale else layer.data).shape[:2]
    y0, x0 = max(0, int(np.floor(y0))), max(0, int(np.floor(x0)))
    y1, x1 = min(int(shape[0]), int(np.ceil(y1))), min(int(shape[1]), int(np.ceil(x1)))
    if y1 <= y0 or x1 <= x0:
        raise ValueError("the current view shows none of the image: pan or zoom onto it")
    return (y0, x0, y1, x1)
