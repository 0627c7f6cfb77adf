"""Slide info dock widget: what the reader knows about the selected slide layer.

It is also the explicit opt-in for a slide's label and macro pictures, which
can show patient identifiers and are therefore never opened by default.

Selecting another layer (a segmentation, a Shapes layer with regions) keeps it
useful: it then describes the slide those lie on, or the last slide selected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtWidgets import QLabel, QMessageBox, QPushButton, QVBoxLayout, QWidget

if TYPE_CHECKING:  # pragma: no cover
    import napari


def slide_info_text(meta: dict | None) -> str:
    """Human-readable summary of a layer's FedDP slide metadata."""
    if not meta:
        return "Select a slide layer opened by FedDP."
    mpp = meta.get("mpp")
    mpp_text = f"{mpp[1]:.4g} × {mpp[0]:.4g} µm/px" if mpp else "unknown (shown in pixels)"
    power = meta.get("objective_power")
    shapes = meta.get("level_shapes") or []
    lines = [
        f"Vendor: {meta.get('vendor')}",
        f"Pixel size: {mpp_text}",
        f"Objective: {power:g}x" if power else "Objective: unknown",
        f"Size: {shapes[0][1]} × {shapes[0][0]} px" if shapes else "Size: unknown",
        f"Levels: {len(shapes)}" + ("" if meta.get("pyramid_in_file", True) else " (computed on the fly)"),
        "Associated images: " + (", ".join(meta.get("associated_images") or []) or "none"),
    ]
    return "\n".join(lines)


class SlideInfoWidget(QWidget):
    """Shows slide metadata; a button opts in to the label/macro pictures."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.info = QLabel()
        self.info.setWordWrap(True)
        self.show_associated = QPushButton("Show label && macro images…")
        self.show_associated.setToolTip("Slide labels and macro photographs can show patient identifiers.")
        self.show_associated.clicked.connect(self._on_show_associated)
        layout = QVBoxLayout(self)
        layout.addWidget(self.info)
        layout.addWidget(self.show_associated)
        layout.addStretch()
        self._last_slide = None
        self.viewer.layers.selection.events.active.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._refresh()

    def slide_layer(self):
        """The slide image layer described: the selected one, else the one under the selection.

        With a Labels (or any other) layer selected, it is the slide that layer
        lies on, preferring the last slide selected; with nothing on screen to
        go by, the last slide selected (or the only slide open).
        """
        slides = [layer for layer in self.viewer.layers if _is_slide(layer)]
        active = self.viewer.layers.selection.active
        if active is not None and _is_slide(active):
            self._last_slide = active
            return active
        last = self._last_slide if self._last_slide in slides else None
        if active is not None:
            under = [layer for layer in slides if _overlaps(layer, active)]
            if under:
                return last if last in under else under[-1]  # the topmost, as drawn
        if last is not None:
            return last
        return slides[0] if len(slides) == 1 else None

    def _refresh(self, *_) -> None:
        layer = self.slide_layer()
        meta = None if layer is None else layer.metadata.get("feddp")
        text = slide_info_text(meta)
        self.info.setText(text if layer is None else f"Slide: {layer.name}\n{text}")
        self.show_associated.setEnabled(bool(meta and meta.get("associated_images")))

    def _on_show_associated(self, *_) -> int:
        layer = self.slide_layer()
        meta = None if layer is None else layer.metadata.get("feddp")
        if not meta or not meta.get("associated_images"):
            return 0
        answer = QMessageBox.question(self, "Show label and macro images?",
                                      "Label and macro images can show patient names or identifiers.\n"
                                      "Show them anyway?")
        return self.add_associated_layers(meta["path"]) if answer == QMessageBox.StandardButton.Yes else 0

    def add_associated_layers(self, path: str) -> int:
        """Add the slide's associated pictures as layers; returns how many."""
        from .._reader import associated_layer_data
        from ..slides import open_slide

        slide = open_slide(path)
        try:
            layers = associated_layer_data(slide)
        finally:
            slide.close()
        for data, kwargs, _ in layers:
            self.viewer.add_image(data, **kwargs)
        return len(layers)


def _is_slide(layer) -> bool:
    """An image layer opened by the FedDP reader (it carries the slide's metadata)."""
    import napari.layers

    return isinstance(layer, napari.layers.Image) and bool(layer.metadata.get("feddp"))


def _overlaps(slide, layer) -> bool:
    """Whether ``layer`` lies over ``slide`` in the canvas (last two world axes)."""
    import numpy as np

    a = np.asarray(slide.extent.world, dtype=float)[:, -2:]
    b = np.asarray(layer.extent.world, dtype=float)[:, -2:]
    return bool(np.all(a[0] <= b[1]) and np.all(b[0] <= a[1]))
