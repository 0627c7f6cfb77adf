"""The whole pathologist's loop in one real napari viewer, from the sample slide to a DP training step.

Open the bundled sample, segment the current view with the **Segment** dock,
paint a correction with the Labels brush, save it with the plugin's writer,
add the view to a lab dataset with the **Add to training set** dock, and train
the segmenting model one DP-SGD round on that dataset with a fresh privacy
ledger. Every widget state is saved as a screenshot under
``$FEDDP_TEST_ARTEFACTS/viewer-loop`` (else the test's temporary folder), so a
person can look at what the viewer showed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from napari_feddp.models import load_checkpoint
from napari_feddp.training import (
    PrivacyLedger,
    SegmentationDataset,
    TrainConfig,
    dataset_fingerprint,
    read_provenance,
    train_local,
)
from napari_feddp.widgets.segment import MODEL_FILE, SegmentWidget
from napari_feddp.widgets.training_data import TrainingDataWidget

pytestmark = [pytest.mark.gui, pytest.mark.slow]

PLUGIN = "napari-feddp"
MPP = 0.499  # CMU-1's level-0 micrometres per pixel
CENTRE = (1300, 1050)  # level-0 (y, x) over tissue with nuclei
WINDOW_SIZE = (1400, 900)
MIN_PNG_BYTES = 10_000


@pytest.fixture
def artefacts(tmp_path) -> Path:
    """Folder for the screenshots: ``$FEDDP_TEST_ARTEFACTS/viewer-loop``, else ``tmp_path/screenshots``."""
    root = os.environ.get("FEDDP_TEST_ARTEFACTS")
    folder = Path(root) / "viewer-loop" if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(viewer, folder: Path, name: str) -> Path:
    """Save the whole napari window (canvas and docks) as ``folder/name.png``.

    Parameters
    ----------
    viewer : napari.Viewer
        A shown viewer.
    folder : Path
        Where the PNG goes.
    name : str
        File stem.

    Returns
    -------
    Path
        The PNG written.
    """
    from qtpy.QtWidgets import QApplication

    for _ in range(10):  # let Qt lay out and paint the docks before grabbing
        QApplication.processEvents()
    path = folder / f"{name}.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    return path


def assert_informative_png(path: Path) -> None:
    """The PNG exists, is larger than :data:`MIN_PNG_BYTES` and is not one flat colour."""
    assert path.is_file(), path
    assert path.stat().st_size > MIN_PNG_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 100, f"{path.name}: almost a single colour"


def show_region(viewer, image, qtbot, zoom: float = 5.0) -> None:
    """Centre the canvas on :data:`CENTRE` and zoom in until the view is a small region of the slide."""
    viewer.reset_view()
    viewer.scene.camera.center = (0, CENTRE[0] * MPP, CENTRE[1] * MPP)
    viewer.scene.camera.zoom *= zoom
    qtbot.waitUntil(lambda: np.ptp(image.corner_pixels[:, 0])
                    * image.downsample_factors[image.data_level][0] < 1000, timeout=10_000)


def paint_correction(layer, box: tuple[int, int, int, int], label: int = 1, brush: int = 15) -> np.ndarray:
    """Paint a disc of ``label`` with the brush on the unlabelled spot nearest the centre of ``box``.

    Parameters
    ----------
    layer : napari.layers.Labels
        An editable (single-scale) Labels layer.
    box : (y0, x0, y1, x1)
        Part of the layer's data to paint in (the segmented region).
    label : int
        The label painted.
    brush : int
        Brush diameter in data pixels.

    Returns
    -------
    ndarray of bool
        The pixels the stroke changed.
    """
    data = np.asarray(layer.data)
    margin = brush + 2
    y0, x0, y1, x1 = box[0] + margin, box[1] + margin, box[2] - margin, box[3] - margin
    ys, xs = np.nonzero(data[y0:y1, x0:x1] == 0)
    assert ys.size, "no unlabelled pixel to paint on"
    nearest = np.argmin((ys - (y1 - y0) / 2) ** 2 + (xs - (x1 - x0) / 2) ** 2)
    before = data.copy()
    layer.mode = "paint"
    layer.selected_label = label
    layer.brush_size = brush
    layer.paint((ys[nearest] + y0, xs[nearest] + x0), label)
    changed = np.asarray(layer.data) != before
    assert changed.sum() > brush * brush // 2  # a disc, not a pixel
    return changed


@pytest.mark.slow
def test_sample_to_dp_training_step(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path, artefacts):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(*WINDOW_SIZE)
    (image,) = viewer.open_sample(PLUGIN, "cmu1_small_region")
    assert image.rgb and image.multiscale

    # 1. Segment the current view with the Segment dock and a checkpoint file.
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment")
    segment.reset_choices()
    segment.model_source.value = MODEL_FILE
    segment.checkpoint.value = str(tiny_checkpoint)
    segment.region.value = "current view"
    show_region(viewer, image, qtbot)
    shots = [screenshot(viewer, artefacts, "01-sample-and-segment-dock")]
    worker = segment.run()
    assert worker is not None, segment.status.value
    with qtbot.waitSignal(worker.finished, timeout=180_000):
        pass
    result = segment.last_result
    assert result is not None and result.complete, segment.status.value
    assert "Done with tiny-unet" in segment.status.value
    assert result.downsample == pytest.approx((1.0, 1.0))
    layer = viewer.layers[-1]
    assert layer._type_string == "labels" and layer.editable and not layer.multiscale
    oy, ox = layer.metadata["origin"]
    view = result.region
    assert (view[2] - view[0]) * (view[3] - view[1]) < 1000 * 1000  # a small region, not the slide
    # The sample's result fits in memory: the whole map, 0 outside the region.
    assert layer.data.shape == (2967, 2220) and (oy, ox) == (0, 0)
    inside = np.zeros(layer.data.shape, bool)
    inside[view[0]:view[2], view[1]:view[3]] = True
    assert layer.data[inside].any() and not layer.data[~inside].any()
    shots.append(screenshot(viewer, artefacts, "02-segmented"))

    # 2. Correct: paint a nucleus with the Labels brush where the model found none.
    viewer.layers.selection.active = layer
    changed = paint_correction(layer, view)
    assert (layer.data[changed] == 1).all()
    shots.append(screenshot(viewer, artefacts, "03-corrected"))

    # 3. Save with napari's writer (the plugin's pyramidal OME-TIFF), in place over the slide.
    out = tmp_path / "corrected.ome.tif"
    viewer.layers.selection = {layer}
    written = viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    assert [str(p) for p in written] == [str(out)]
    saved = tifffile.imread(out)
    assert saved.shape == (2967, 2220)
    np.testing.assert_array_equal(saved[oy:oy + layer.data.shape[0], ox:ox + layer.data.shape[1]], layer.data)
    rows, cols = np.nonzero(changed)
    assert (saved[rows + oy, cols + ox] == 1).all()  # the correction is in the file

    # 4. Add the same view to the lab's training set.
    dataset_dir = tmp_path / "lab-data"
    training = TrainingDataWidget(viewer)
    viewer.window.add_dock_widget(training, name="Add to training set")
    training.reset_choices()
    training.image.value = image
    training.labels_layer.value = layer
    training.dataset.value = dataset_dir
    training.annotator.value = "pathologist-a"
    tile = training.add_current_view()
    assert tile is not None, training.status.value
    assert training.status.value.startswith(f"added {tile.name}")
    (entry,) = read_provenance(dataset_dir)
    record = entry["provenance"]
    assert entry["name"] == tile.name and entry["mpp"] == pytest.approx(MPP)
    assert record["annotator"] == "pathologist-a" and record["source"] == "CMU-1-Small-Region.svs"
    ty0, tx0, ty1, tx1 = record["region"]
    # The view that was segmented (the canvas may have changed by a pixel as the docks' text changed).
    assert np.abs(np.subtract((ty0, tx0, ty1, tx1), view)).max() <= 2
    rgb, mask = np.asarray(Image.open(tile.image)), np.asarray(Image.open(tile.mask))
    assert rgb.shape == (ty1 - ty0, tx1 - tx0, 3) and mask.shape == rgb.shape[:2]
    assert (mask[rows + oy - ty0, cols + ox - tx0] == 1).all()  # the painted nucleus is in the tile
    shots.append(screenshot(viewer, artefacts, "04-added-to-training-set"))

    # 5. One DP-SGD round of the segmenting model on the lab's folder, with a fresh ledger.
    model, card = load_checkpoint(tiny_checkpoint)
    data = SegmentationDataset(dataset_dir, crop_size=64, target_mpp=card.input.mpp,
                               normalization=(card.input.normalization.mean, card.input.normalization.std), seed=0)
    assert len(data) == 1
    ledger_dir = tmp_path / "ledger"
    ledger = PrivacyLedger(ledger_dir, "lab-a", dataset_fingerprint(dataset_dir), dataset_dir=dataset_dir)
    assert ledger.n_rounds == 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(steps=2, batch_size=1, max_physical_batch_size=1, crop_size=64, noise_multiplier=1.0,
                         epsilon_max=1000.0, seed=0)
    step = train_local(model, data, config, ledger=ledger, round_id=1)
    assert step.steps == 2 and step.dp_mode == "sample"
    assert math.isfinite(step.loss) and step.loss > 0
    assert step.epsilon is not None and math.isfinite(step.epsilon) and step.epsilon > 0
    assert any(not torch.equal(before[k], step.state_dict[k]) for k in before)
    reopened = PrivacyLedger(ledger_dir, "lab-a", dataset_fingerprint(dataset_dir), dataset_dir=dataset_dir)
    assert reopened.n_rounds == 1 and reopened.epsilon == pytest.approx(step.epsilon)

    for path in shots:
        assert_informative_png(path)
