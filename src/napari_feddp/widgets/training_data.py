"""Add to training set: save the current view of a slide and its corrected labels as a tile.

Tiles go to the lab's dataset folder (``images/``, ``masks/``, provenance) and
are used by the next federated round; they never leave the lab.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import Container, FileEdit, Label, LineEdit, PushButton, create_widget

from ._style import show_message, wrap_message_label
from .segment import _view_region

if TYPE_CHECKING:  # pragma: no cover
    import napari


class TrainingDataWidget(Container):
    """Image layer, Labels layer, dataset folder; 'Add current view'."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__(labels=True)
        import napari.layers

        self.viewer = napari_viewer
        self.image = create_widget(annotation=napari.layers.Image, label="image")
        # Not ``self.labels``: that is magicgui's Container.labels (show field labels),
        # and shadowing it hides every field's label.
        self.labels_layer = create_widget(annotation=napari.layers.Labels, label="labels")
        self.dataset = FileEdit(label="dataset folder", mode="d")
        self.annotator = LineEdit(value=_user(), label="annotator")
        self.add_button = PushButton(text="Add current view to training set")
        self.status = Label(value="", label="status")
        wrap_message_label(self.status)
        self.extend([self.image, self.labels_layer, self.dataset, self.annotator, self.add_button, self.status])
        self.add_button.changed.connect(self.add_current_view)

    def add_current_view(self, *_):
        """Save the visible region; returns the saved tile or None (reason in the status line)."""
        from ..training import save_annotated_tile
        from ..training.from_layers import aligned_tile

        image, labels = self.image.value, self.labels_layer.value
        folder = self.dataset.value
        try:
            if image is None or labels is None:
                raise ValueError("choose an image layer and the Labels layer you corrected")
            if folder is None or str(folder) in ("", "."):
                raise ValueError("choose the lab's dataset folder")
            region = _view_region(self.viewer, image)
            level0 = image.data[0] if image.multiscale else image.data
            labels0 = labels.data[0] if labels.multiscale else labels.data
            rgb, mask = aligned_tile(level0, image.scale, image.translate, labels0, labels.scale,
                                     labels.translate, region)
            meta = image.metadata.get("feddp") or {}
            mpp = meta.get("mpp")
            provenance = {
                "source": Path(meta.get("path") or image.name).name,
                "level": 0,
                "region": list(region),
                "mpp": mpp[1] if mpp else None,
                "layer": {"image": image.name, "labels": labels.name},
                "annotator": str(self.annotator.value),
            }
            saved = save_annotated_tile(Path(folder), rgb, mask, provenance)
        except (ValueError, OSError) as exc:
            show_message(self.status, f"error: {exc}", error=True)
            return None
        show_message(self.status, f"added {saved.name} ({rgb.shape[1]} x {rgb.shape[0]} px)")
        return saved


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""
