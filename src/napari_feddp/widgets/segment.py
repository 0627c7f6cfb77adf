"""Segment dock widget: run the model over a slide in a worker thread, show one label per nucleus.

All the work happens in :mod:`napari_feddp.nuclei`, :mod:`napari_feddp.segmentation`
and :mod:`napari_feddp.inference`; this widget collects the choices, runs the
core's progress generator (the model's run, then labelling and measuring the
nuclei) in napari's ``thread_worker`` (so the viewer stays responsive and
Cancel works between batches and windows) and shows the nuclei as a Labels
layer aligned with the slide: one colour per nucleus, the measurements as the
layer's ``features`` (napari's status bar shows them under the cursor) and the
slide's summary in the status line.

Region
    ``tissue``, ``current view``, ``whole slide``, or any Shapes layer: its
    selected shapes (all of them when none is selected) that are polygons,
    rectangles or ellipses. The engine segments their bounding box and every
    label pixel whose centre is outside them is set to 0.

Correcting the result
    napari paints only single-scale layers, so the result is shown as one
    in-memory numpy layer whenever it fits in
    :data:`~napari_feddp.segmentation.EDITABLE_MAX_PIXELS` label pixels (about
    67 megapixels of uint32 nucleus ids, 256 MiB): the whole map, or for a
    region only the region's part (its ``metadata["origin"]`` says where it
    lies, and the writer saves it in place over the slide). This covers the
    bundled sample and regions up to 8192 label pixels a side. The brush paints
    a new nucleus id (the largest plus one) unless another is picked; saved to
    the training set, every non-zero id counts as nucleus. A larger result stays on
    disk as a multiscale layer, which napari cannot paint; **Correct current
    view** then copies the visible part (at most
    :data:`~napari_feddp.segmentation.WINDOW_MAX_SIDE` pixels a side) into an
    editable layer whose every stroke, fill and undo is written back into the
    result, so saving the multiscale layer saves the corrections.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
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
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.correct_button = PushButton(text="Correct current view", visible=False,
                                         tooltip="Copy the visible part of a large result into an editable layer")
        self.progress = ProgressBar(value=0, min=0, max=1000, label="progress")
        self.status = Label(value="", label="status")
        self.extend([self.image, self.model_source, self.checkpoint, self.pixel_size, self.device, self.region,
                     self.batch_size, self.overlap, self.run_button, self.cancel_button, self.correct_button,
                     self.progress, self.status])
        wrap_message_label(self.status)
        self._fit_model_picker()
        self.pixel_size.native.setDecimals(4)
        self._show_default_model()
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

    def _fit_model_picker(self) -> None:
        # A combo box is as wide as its longest entry by default; model lines are long.
        from qtpy.QtWidgets import QComboBox

        native = self.model_source.native
        native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        native.setMinimumContentsLength(18)

    def _show_default_model(self) -> None:
        """Select what ``resolve_checkpoint(None)`` uses, unless the user picked a model."""
        from ..models.store import NoModelError, resolve_checkpoint

        if self._model_picked:
            return
        try:
            default = str(resolve_checkpoint(None))
        except NoModelError:
            default = MODEL_FILE
        self._listing_models = True
        try:
            if default in self._models or default == MODEL_FILE:
                self.model_source.value = default
        finally:
            self._listing_models = False
        self._describe_model_choice()

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
        """List the models as the store holds them now; keep the user's pick, else show the default."""
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
            if picked is not None and picked in self.model_source.choices:
                self.model_source.value = picked
        finally:
            self._listing_models = False
        self._model_picked = picked is not None and picked in self.model_source.choices
        self._show_default_model()
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

    def _model_choice(self) -> str | None:
        if self.model_source.value == MODEL_FILE:
            path = Path(self.checkpoint.value)
            if not path.name or path.is_dir():
                raise ValueError("choose a checkpoint file (.safetensors with its .json card)")
            return str(path)
        return self.model_source.value

    def run(self, *_):
        """Start a segmentation in a worker thread; returns the worker (or None on bad input)."""
        from napari.qt.threading import create_worker

        from ..nuclei import segment_nuclei
        from ..segmentation import WIDGET_CONTROLS, check_pixel_size, is_field_of_view, load_model, user_message

        self.progress.value = 0
        layer = self.image.value
        if layer is None:
            self._set_status("Open a slide first.", error=True)
            return None
        self.refresh_models()  # a model received since the list was made (the default, unless one was picked)
        try:
            loaded = load_model(self._model_choice())
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
                device=self.device.value, cancel=self._cancel,
            )
        except (ValueError, FileNotFoundError) as exc:  # bad input: say it, lose nothing
            self._set_status(user_message(exc, WIDGET_CONTROLS), error=True)
            return None
        self._loaded, self._layer = loaded, layer
        self._model_title = _model_title(loaded.path)
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
        kwargs["translate"] = tuple(np.multiply(kwargs["translate"], level0_scale))
        if _layer_in_microns(layer):
            kwargs["units"] = ("micrometer", "micrometer")
        kwargs["translate"] = tuple(np.add(kwargs["translate"], layer.translate[-2:]))
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


def _model_title(path) -> str:
    """Short name of a model for the status line: file, card name, source and epsilon."""
    from ..models.store import describe_model

    info = describe_model(path)
    return f"{info.title} ({info.source}, {info.privacy_text})"


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
    zoom = float(viewer.camera.zoom)
    cy, cx = (float(c) for c in viewer.camera.center[-2:])
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
