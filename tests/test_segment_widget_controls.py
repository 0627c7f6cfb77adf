"""The Segment and Slide info widgets in a real napari viewer: model picker, pixel size, status, layout."""

from __future__ import annotations

import numpy as np
import pytest

from napari_feddp._reader import SlideUnitsWarning
from napari_feddp.models.store import REFUSED_FOLDER, bundled_checkpoint
from napari_feddp.widgets import ERROR_COLOR
from napari_feddp.widgets.segment import MODEL_FILE, SegmentWidget

from .conftest import require_data, save_received_model

PLUGIN = "napari-feddp"


def _open_boxes(viewer):
    with pytest.warns(SlideUnitsWarning):  # boxes.tiff has no pixel size: shown in pixels
        return viewer.open(str(require_data("slides/boxes.tiff")), plugin=PLUGIN)[0]


def _wait(qtbot, worker):
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass


def test_model_picker_lists_received_and_bundled_models(make_napari_viewer, isolated_feddp_home):
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    bundled = str(bundled_checkpoint())
    assert widget.model_source.value == bundled  # nothing received yet
    assert [name for name in widget.model_source.choices] == [bundled, MODEL_FILE]
    assert widget.model_source.native.itemText(0).startswith("feddp-nuclei · bundled · ")
    assert "ε 7.92" in widget.model_source.native.itemText(0)

    store = isolated_feddp_home / "models"
    received = save_received_model(store)
    save_received_model(store / REFUSED_FOLDER, "refused1")
    widget.reset_choices()  # napari calls this when layers change; Run does too
    assert list(widget.model_source.choices) == [str(received), bundled, MODEL_FILE]
    assert widget.model_source.value == str(received)  # the lab's promoted model is the default
    text = widget.model_source.native.currentText()
    assert text.startswith("federation-run7 (tiny-federated) · received · ") and "ε 3" in text
    assert str(received) in widget.model_source.tooltip

    # Once the user picks a model, a newer one received later does not replace the choice.
    widget.model_source.value = bundled
    save_received_model(store, "run8")
    widget.reset_choices()
    assert widget.model_source.value == bundled
    assert len(widget.model_source.choices) == 4
    assert widget.checkpoint.native.isHidden()
    widget.model_source.value = MODEL_FILE
    assert not widget.checkpoint.native.isHidden()  # the file field appears


def test_pixel_size_field_lets_boxes_segment_and_status_names_the_model(
    qtbot, make_napari_viewer, received_model
):
    viewer = make_napari_viewer()
    image = _open_boxes(viewer)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    assert widget.image.value is image
    assert widget.pixel_size.native.specialValueText() == "none in the file: set it"

    widget.progress.value = 700  # what a previous run left
    assert widget.run() is None
    assert widget.progress.value == 0  # reset as the new run starts, even one that stops at once
    assert "boxes.tiff has no pixel size" in widget.status.value
    assert "set the pixel size field" in widget.status.value and "mpp=" not in widget.status.value
    assert ERROR_COLOR in widget.status.native.styleSheet()

    widget.pixel_size.value = 0.5
    worker = widget.run()
    assert worker is not None
    assert "federation-run7" in widget.status.value  # "Running <model> on <image>…"
    _wait(qtbot, worker)
    assert widget.progress.value == 1000
    status = widget.status.value
    assert status.startswith("Done with federation-run7 (tiny-federated) (received, ε 3)")
    assert ERROR_COLOR not in widget.status.native.styleSheet()
    labels = viewer.layers[-1]
    assert labels._type_string == "labels" and labels.metadata["model"] == str(received_model)
    # Drawn over the image in its own (pixel) coordinates.
    data0 = labels.data[0] if labels.multiscale else labels.data
    np.testing.assert_allclose(np.asarray(data0.shape) * labels.scale, image.data[0].shape[:2], rtol=0.01)

    worker = widget.run()  # a second run starts from an empty bar
    assert widget.progress.value == 0
    _wait(qtbot, worker)


def test_pixel_size_override_keeps_the_result_over_the_slide(qtbot, make_napari_viewer, cmu1_path,
                                                             tiny_checkpoint):
    viewer = make_napari_viewer()
    image = viewer.open(str(cmu1_path), plugin=PLUGIN)[0]
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    assert widget.pixel_size.native.specialValueText() == "from the slide (0.499)"
    widget.model_source.value = MODEL_FILE
    widget.checkpoint.value = str(tiny_checkpoint)
    widget.pixel_size.value = 0.25  # the model then reads the slide at half its pixels
    viewer.scene.camera.center = (0, 1200 * 0.499, 1100 * 0.499)
    viewer.scene.camera.zoom = viewer.scene.camera.zoom * 6
    widget.region.value = "current view"
    worker = widget.run()
    _wait(qtbot, worker)
    result, labels = widget.last_result, viewer.layers[-1]
    assert result.downsample == pytest.approx((2.0, 2.0), rel=1e-3)
    # One label pixel covers two slide pixels, in the slide's micrometres (0.499 each).
    np.testing.assert_allclose(labels.scale, np.asarray(image.scale) * 2, rtol=1e-3)


def test_test_time_augmentation_box_reaches_the_engine(qtbot, make_napari_viewer, cmu1_path, tiny_checkpoint):
    """The checkbox gives the core's augmented result for the same region; unchecked, the plain one."""
    from napari_feddp.inference import run_to_completion
    from napari_feddp.segmentation import load_model, run_segmentation
    from napari_feddp.slides import open_slide

    viewer = make_napari_viewer()
    viewer.open(str(cmu1_path), plugin=PLUGIN)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    assert widget.augment.value is False and "8 times" in widget.augment.tooltip
    widget.model_source.value = MODEL_FILE
    widget.checkpoint.value = str(tiny_checkpoint)
    widget.region.value = "current view"
    viewer.scene.camera.center = (0, 1200 * 0.499, 1100 * 0.499)
    viewer.scene.camera.zoom = viewer.scene.camera.zoom * 6
    results = {}
    for augment in (False, True):
        widget.augment.value = augment
        _wait(qtbot, widget.run())
        results[augment] = widget.last_result
    region = results[True].region
    assert region == results[False].region
    loaded, slide = load_model(str(tiny_checkpoint)), open_slide(cmu1_path)
    try:
        core = run_to_completion(run_segmentation(slide, loaded, region=region, device="cpu", augment=True))
    finally:
        slide.close()
    np.testing.assert_array_equal(results[True].labels[:], core.labels[:])
    assert (results[True].labels[:] != results[False].labels[:]).any()


def test_long_error_wraps_inside_the_dock(qtbot, make_napari_viewer, cmu1_path, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.open(str(cmu1_path), plugin=PLUGIN)
    widget = SegmentWidget(viewer)
    dock = viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    qtbot.wait(50)
    # The dock may hold its width for a while; the widget's size hint is what it would grow to.
    width, hint = dock.width(), widget.native.sizeHint().width()
    missing = tmp_path / ("a-checkpoint-name-far-longer-than-any-dock-is-wide-" * 4 + ".safetensors")
    widget.model_source.value = MODEL_FILE
    widget.checkpoint.value = str(missing)
    assert widget.run() is None
    qtbot.wait(50)
    assert "model file not found" in widget.status.value
    assert widget.status.native.wordWrap()
    assert dock.width() <= width  # the message wraps (and is clipped) rather than widening the dock
    assert widget.native.sizeHint().width() <= hint
    assert widget.status.native.toolTip() == widget.status.value  # the whole text, on hover
    from napari.utils.notifications import NotificationSeverity, notification_manager

    posted = notification_manager.records[-1]  # and in napari's notifications, where it can be read whole
    assert posted.message == widget.status.value and posted.severity == NotificationSeverity.ERROR
    assert ERROR_COLOR in widget.status.native.styleSheet()

    widget.status.value = ""
    long_status = "word " * 80  # wraps at spaces, growing in height only
    widget._set_status(long_status)
    qtbot.wait(50)
    assert dock.width() <= width and widget.native.sizeHint().width() <= hint
    assert widget.status.native.height() > widget.status.native.fontMetrics().height() * 2


def test_every_field_has_a_label(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    buttons = {widget.run_button, widget.cancel_button, widget.correct_button}
    unlabeled = [w for w in widget if w not in buttons and not w.label]
    assert unlabeled == []
    assert widget.pixel_size.label == "pixel size (µm/px)"


def test_slide_info_follows_the_slide_under_other_layers(make_napari_viewer, cmu1_path):
    from napari_feddp.widgets.slide_info import SlideInfoWidget

    viewer = make_napari_viewer()
    slide = viewer.open(str(cmu1_path), plugin=PLUGIN)[0]
    widget = SlideInfoWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert "aperio" in widget.info.text() and widget.slide_layer() is slide

    labels = viewer.add_labels(np.zeros((100, 100), np.uint8), scale=(4.99, 4.99), name="nuclei")
    assert viewer.layers.selection.active is labels
    assert widget.slide_layer() is slide  # the slide the labels lie on
    assert "Slide: CMU-1-Small-Region.svs" in widget.info.text() and "0.499" in widget.info.text()
    assert widget.show_associated.isEnabled()

    shapes = viewer.add_shapes([[[5000, 5000], [5100, 5100]]], shape_type="rectangle", name="far away")
    assert viewer.layers.selection.active is shapes
    assert widget.slide_layer() is slide  # not under it: the last slide selected
    assert "aperio" in widget.info.text()

    viewer.layers.remove(slide)
    assert widget.slide_layer() is None
    assert widget.info.text() == "Select a slide layer opened by FedDP."


def test_a_run_that_fails_midway_is_a_notification(qtbot, make_napari_viewer, tmp_path, tiny_checkpoint):
    from napari.utils.notifications import NotificationSeverity, notification_manager

    # The slide file is damaged while the model runs, as a network share that drops out would do.
    copy = tmp_path / "CMU-1-Small-Region.svs"
    copy.write_bytes(require_data("slides/CMU-1-Small-Region.svs").read_bytes())
    viewer = make_napari_viewer()
    viewer.open(str(copy), plugin=PLUGIN)
    widget = SegmentWidget(viewer)
    widget.model_source.value = MODEL_FILE
    widget.checkpoint.value = str(tiny_checkpoint)
    widget.region.value = "whole slide"
    widget.batch_size.value = 1
    posted_before = len(notification_manager.records)

    def damage(*_):
        with open(copy, "r+b") as handle:
            handle.truncate(64 * 1024)

    worker = widget.run()
    assert worker is not None
    worker.yielded.connect(damage)  # the first progress report: the first tile is done, most are not read yet
    _wait(qtbot, worker)
    assert widget.status.value.startswith("Error: ")
    assert ERROR_COLOR in widget.status.native.styleSheet()
    errors = [r for r in notification_manager.records[posted_before:] if r.severity == NotificationSeverity.ERROR]
    assert [r.message for r in errors] == [widget.status.value]  # once, short as it may be
    assert widget.run_button.enabled  # the widget is ready for the next run
