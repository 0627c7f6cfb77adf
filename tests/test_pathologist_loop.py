"""The pathologist's loop in a real viewer: segment, correct with napari's tools, save, re-open, re-save."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from skimage.draw import polygon2mask

from .conftest import docked_segment_widget

PLUGIN = "napari-feddp"
MPP = 0.499  # CMU-1's level-0 micrometres per pixel


@pytest.fixture
def sample_and_widget(make_napari_viewer, tiny_checkpoint):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "cmu1_small_region")
    return viewer, docked_segment_widget(viewer, tiny_checkpoint)


def _segment(qtbot, widget):
    worker = widget.run()
    assert worker is not None, widget.status.value
    with qtbot.waitSignal(worker.finished, timeout=180_000):
        pass
    assert widget.last_result is not None and widget.last_result.complete, widget.status.value
    return widget.viewer.layers[-1]


def _paint_background(layer, label: int = 1, brush: int = 9) -> np.ndarray:
    """Paint ``label`` with the Labels brush on an unlabelled spot; returns the changed pixels."""
    data = np.asarray(layer.data)
    margin = brush + 2
    ys, xs = np.nonzero(data[margin:-margin, margin:-margin] == 0)
    assert ys.size, "no unlabelled pixel to paint on"
    before = data.copy()
    layer.brush_size = brush
    layer.paint((ys[len(ys) // 2] + margin, xs[len(xs) // 2] + margin), label)
    changed = np.asarray(layer.data) != before
    assert changed.sum() > brush  # a disc, not a pixel
    return changed


def _save_selected(viewer, layer, path) -> None:
    viewer.layers.selection = {layer}
    written = viewer.layers.save(str(path), selected=True, plugin=PLUGIN)
    assert [str(p) for p in written] == [str(path)]


@pytest.mark.slow
def test_small_result_is_editable_saved_reopened_and_resaved(qtbot, sample_and_widget, tmp_path):
    viewer, widget = sample_and_widget
    result_layer = _segment(qtbot, widget)
    assert result_layer._type_string == "labels"
    assert not result_layer.multiscale and result_layer.editable
    assert isinstance(result_layer.data, np.ndarray) and result_layer.data.shape == (2967, 2220)
    assert not widget.correct_button.visible  # nothing to window: the whole result is editable

    changed = _paint_background(result_layer)
    assert (result_layer.data[changed] == 1).all()

    out = tmp_path / "corrected.ome.tif"
    _save_selected(viewer, result_layer, out)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and len(tif.series[0].levels) >= 2 and tif.pages[0].is_tiled
        assert 'PhysicalSizeXUnit="µm"' in tif.ome_metadata

    reopened = viewer.open(str(out), plugin=PLUGIN)[0]
    assert reopened._type_string == "labels"
    assert tuple(reopened.scale) == pytest.approx(tuple(result_layer.scale))
    level0 = np.asarray(reopened.data[0] if reopened.multiscale else reopened.data)
    assert (level0[changed] == 1).all()  # the correction survived
    np.testing.assert_array_equal(level0, result_layer.data)

    # napari hands a re-opened multiscale layer over as MultiScaleData.
    again = tmp_path / "resaved.ome.tif"
    _save_selected(viewer, reopened, again)
    np.testing.assert_array_equal(tifffile.imread(again), result_layer.data)


@pytest.mark.slow
def test_large_result_is_corrected_through_a_window(qtbot, sample_and_widget, tmp_path):
    viewer, widget = sample_and_widget
    widget.editable_max_pixels = 1_000_000  # with this limit the sample's 6.6 MP result counts as large
    result_layer = _segment(qtbot, widget)
    assert result_layer.multiscale and not result_layer.editable
    assert widget.correct_button.visible
    labels = widget.last_nuclei.labels  # the nucleus labels the multiscale layer shows

    viewer.scene.camera.center = (0, 1400 * MPP, 1100 * MPP)
    viewer.scene.camera.zoom *= 6
    qtbot.waitUntil(lambda: np.ptp(result_layer.corner_pixels[:, 0])
                    * result_layer.downsample_factors[result_layer.data_level][0] < 1500, timeout=10_000)
    window = widget.correct_view()
    assert window is not None, widget.status.value
    assert window.editable and not window.multiscale
    oy, ox = window.metadata["origin"]
    assert oy > 0 and ox > 0 and window.data.shape[0] < 1500
    before = np.asarray(labels[:])

    changed = _paint_background(window)
    ys, xs = np.nonzero(changed)
    # Written back into the result, and seen by the multiscale layer over it.
    assert (labels[:][ys + oy, xs + ox] == 1).all()
    shown = np.asarray(result_layer.data[0][oy : oy + changed.shape[0], ox : ox + changed.shape[1]])
    assert (shown[changed] == 1).all()

    window.undo()
    np.testing.assert_array_equal(labels[:], before)
    window.redo()
    assert (labels[:][ys + oy, xs + ox] == 1).all()

    out = tmp_path / "large.ome.tif"
    _save_selected(viewer, result_layer, out)
    reopened = viewer.open(str(out), plugin=PLUGIN)[0]
    level0 = np.asarray(reopened.data[0] if reopened.multiscale else reopened.data)
    assert level0.shape == (2967, 2220)
    assert (level0[ys + oy, xs + ox] == 1).all()
    np.testing.assert_array_equal(level0, labels[:])

    # The window saved on its own lands where it lies over the slide.
    crop = tmp_path / "window.ome.tif"
    _save_selected(viewer, window, crop)
    written = tifffile.imread(crop)
    np.testing.assert_array_equal(written[oy:, ox:], window.data)
    assert not written[:oy].any() and not written[:, :ox].any()


def test_shapes_polygon_limits_labels_to_its_inside(qtbot, sample_and_widget):
    viewer, widget = sample_and_widget
    triangle_px = np.array([[1100.3, 900.6], [1520.2, 1010.4], [1290.7, 1420.1]])  # (y, x) over tissue
    # A Shapes layer drawn in the viewer is in world units (µm), not slide pixels.
    shapes = viewer.add_shapes([triangle_px * MPP], shape_type="polygon", name="roi")
    widget.reset_choices()
    assert shapes in widget.region.choices
    widget.region.value = shapes
    result_layer = _segment(qtbot, widget)
    assert widget.last_result.downsample == pytest.approx((1.0, 1.0))
    data = np.asarray(result_layer.data)
    # Label pixel (r, c) is centred on the slide's pixel (r, c): inside when that centre is.
    inside = polygon2mask(data.shape, triangle_px)
    assert data[inside].any()
    assert not data[~inside].any()
    assert result_layer.editable


def test_correction_window_writes_back_only_what_changed():
    import zarr

    from napari_feddp.segmentation import CorrectionWindow

    target = zarr.create_array(zarr.storage.MemoryStore(), shape=(6000, 5000), chunks=(512, 512), dtype=np.uint8)
    target[100:200, 100:200] = 1
    with pytest.raises(ValueError, match="zoom in"):
        CorrectionWindow(target, (0, 0, 6000, 5000))
    with pytest.raises(ValueError, match="pan to it"):
        CorrectionWindow(target, (7000, 0, 8000, 100))
    window = CorrectionWindow(target, (150, 120, 400, 300))
    assert window.origin == (150, 120) and window.data.shape == (250, 180)
    assert window.write_back() == 0
    window.data[0:10, 0:5] = 2
    assert window.write_back() == 50
    assert (target[150:160, 120:125] == 2).all() and target[160, 120] == 1
    # napari may swap a layer's data for a new array of the same shape.
    replaced = window.data.copy()
    replaced[200:210, 100:110] = 3
    assert window.write_back(replaced) == 100
    assert (target[350:360, 220:230] == 3).all()
    assert window.write_back() == 0
