"""'Add to training set' in a real viewer: the saved tile is aligned and loads for training."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_feddp.training import SegmentationDataset
from napari_feddp.training.from_layers import aligned_tile
from napari_feddp.widgets.training_data import TrainingDataWidget


def test_aligned_tile_resamples_labels_through_world_coordinates():
    image = np.zeros((100, 100, 3), np.uint8)
    labels = np.zeros((50, 50), np.uint8)  # half resolution, as the engine's output may be
    labels[10:20, 5:15] = 1
    # Label pixel i covers image pixels 2i, 2i+1: centre at 2i + 0.5.
    rgb, mask = aligned_tile(image, (1, 1), (0, 0), labels, (2, 2), (0.5, 0.5), (0, 0, 60, 60))
    assert rgb.shape == (60, 60, 3) and mask.shape == (60, 60)
    expected = np.zeros((60, 60), np.uint8)
    expected[20:40, 10:30] = 1
    assert (mask == expected).mean() > 0.98


def test_aligned_tile_errors():
    image, labels = np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10), np.uint8)
    with pytest.raises(ValueError, match="outside the image"):
        aligned_tile(image, (1, 1), (0, 0), labels, (1, 1), (0, 0), (20, 20, 30, 30))
    big = np.zeros((3000, 3000, 3), np.uint8)
    with pytest.raises(ValueError, match="zoom in"):
        aligned_tile(big, (1, 1), (0, 0), labels, (1, 1), (0, 0), (0, 0, 3000, 3000))


def test_widget_adds_current_view(make_napari_viewer, cmu1_path, tmp_path, qtbot):
    viewer = make_napari_viewer(show=True)
    image = viewer.open(str(cmu1_path), plugin="napari-feddp")[0]
    painted = np.zeros(image.data[0].shape[:2], np.int32)
    painted[1300:1340, 1000:1050] = 7  # an instance id painted with the brush
    viewer.add_labels(painted, scale=image.scale, name="corrected")
    viewer.scene.camera.center = (0, 1320 * 0.499, 1025 * 0.499)
    viewer.scene.camera.zoom *= 8
    qtbot.waitUntil(lambda: np.ptp(image.corner_pixels[:, 0]) * image.downsample_factors[image.data_level][0]
                    < 2048, timeout=10_000)
    widget = TrainingDataWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    widget.image.value = image
    widget.dataset.value = tmp_path / "lab-data"
    saved = widget.add_current_view()
    assert saved is not None, widget.status.value
    assert saved.image.exists() and saved.mask.exists()
    from PIL import Image

    mask = np.asarray(Image.open(saved.mask))
    rgb = np.asarray(Image.open(saved.image))
    assert mask.shape == rgb.shape[:2] and set(np.unique(mask)) == {0, 1}
    # The painted rectangle is inside the saved view, at the right place.
    region = saved_region(saved)
    y0, x0 = region[0], region[1]
    assert mask[1300 - y0 + 5, 1000 - x0 + 5] == 1
    full = tifffile.imread(cmu1_path)
    np.testing.assert_array_equal(rgb, full[region[0]:region[2], region[1]:region[3]])
    dataset = SegmentationDataset(tmp_path / "lab-data", crop_size=64, source_mpp=0.499)
    assert len(dataset) == 1


def test_widget_explains_missing_choices(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = TrainingDataWidget(viewer)
    assert widget.add_current_view() is None
    assert "choose" in widget.status.value


def saved_region(saved) -> list[int]:
    import json

    records = [json.loads(line) for line in saved.provenance.read_text().splitlines() if line.strip()] \
        if saved.provenance.suffix == ".jsonl" else [json.loads(saved.provenance.read_text())]
    record = next(r for r in records if r.get("name", saved.name) == saved.name)
    return record.get("region") or record["provenance"]["region"]


def test_every_field_shows_its_label(make_napari_viewer):
    from qtpy.QtWidgets import QLabel

    widget = TrainingDataWidget(make_napari_viewer())
    assert widget.labels is True  # magicgui's "show labels" switch, not a layer picker
    texts = {label.text() for label in widget.native.findChildren(QLabel)}
    assert {"image", "labels", "dataset folder", "annotator"} <= texts
