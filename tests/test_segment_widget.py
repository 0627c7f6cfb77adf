"""The Segment widget in a real napari viewer: run, result layer, cancel, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from napari_feddp.widgets.segment import SegmentWidget

from .conftest import docked_segment_widget

PLUGIN = "napari-feddp"


@pytest.fixture
def widget_with_slide(make_napari_viewer, cmu1_path, tiny_checkpoint):
    viewer = make_napari_viewer()
    viewer.open(str(cmu1_path), plugin=PLUGIN)
    return viewer, docked_segment_widget(viewer, tiny_checkpoint)


@pytest.mark.slow
def test_run_adds_aligned_labels_layer(qtbot, widget_with_slide):
    viewer, widget = widget_with_slide
    assert widget.image.value is viewer.layers[0]
    widget.batch_size.value = 4
    worker = widget.run()
    assert worker is not None and widget.cancel_button.enabled
    # The GUI thread stays live while the worker runs: camera changes are processed.
    viewer.scene.camera.zoom *= 1.5
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    labels = viewer.layers[-1]
    assert labels._type_string == "labels" and labels.metadata["complete"] is True
    slide = viewer.layers[0]
    # Aligned in microns: same physical extent as the slide.
    extent_slide = np.asarray(slide.data[0].shape[:2]) * np.asarray(slide.scale)
    data0 = labels.data[0] if labels.multiscale else labels.data
    extent_labels = np.asarray(data0.shape) * np.asarray(labels.scale)
    np.testing.assert_allclose(extent_labels, extent_slide, rtol=0.01)
    # One label per nucleus, each in its own colour, with its measurements as features.
    nuclei = widget.last_nuclei
    data0 = np.asarray(data0)
    ids = np.unique(data0[data0 > 0])
    assert data0.dtype == np.uint32 and len(ids) == nuclei.count > 1
    assert not np.array_equal(labels.get_color(int(ids[0])), labels.get_color(int(ids[1])))
    assert sorted(labels.features["index"]) == ids.tolist()
    assert {"area_um2", "eccentricity", "mean_haematoxylin_od"} <= set(labels.features.columns)
    assert labels.selected_label == ids.max() + 1  # the brush adds a new nucleus
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert "Done" in widget.status.value
    assert f"{nuclei.count:,} nuclei in" in widget.status.value and "per mm²" in widget.status.value


def test_cancel_adds_no_result(qtbot, widget_with_slide):
    viewer, widget = widget_with_slide
    widget.batch_size.value = 1
    widget.region.value = "whole slide"
    worker = widget.run()
    widget.cancel()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    assert len(viewer.layers) == 1  # a cancelled run is never shown as a result
    assert widget.last_result is not None and not widget.last_result.complete
    assert "Cancelled" in widget.status.value


def test_current_view_region(qtbot, widget_with_slide):
    viewer, widget = widget_with_slide
    viewer.scene.camera.center = (0, 1200 * 0.499, 1100 * 0.499)
    viewer.scene.camera.zoom = viewer.scene.camera.zoom * 6
    widget.region.value = "current view"
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    result = widget.last_result
    assert result.complete and result.region is not None
    y0, x0, y1, x1 = result.region
    assert (y1 - y0) < 2967 and (x1 - x0) < 2220
    # Exactly what is on screen (canvas pixels / zoom, in slide pixels of 0.499 µm), not the
    # loaded level's chunks around it.
    height, width = viewer.canvas.size
    zoom = viewer.scene.camera.zoom
    assert abs((y1 - y0) - height / zoom / 0.499) <= 3 and abs((x1 - x0) - width / zoom / 0.499) <= 3
    assert abs((y0 + y1) / 2 - 1200) <= 3 and abs((x0 + x1) / 2 - 1100) <= 3


def test_bad_checkpoint_says_so_and_keeps_layers(tmp_path, widget_with_slide):
    viewer, widget = widget_with_slide
    widget.checkpoint.value = str(tmp_path / "missing.safetensors")
    assert widget.run() is None
    assert "missing" in widget.status.value
    assert len(viewer.layers) == 1 and widget.run_button.enabled


def test_plugin_dock_widget_is_listed(make_napari_viewer):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    assert isinstance(widget, SegmentWidget)
