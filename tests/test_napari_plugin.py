"""The plugin inside a real napari viewer (Xvfb): reader, writer, sample data, widget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_feddp._reader import SlideUnitsWarning, napari_get_reader
from napari_feddp.slides import open_slide

from ._slide_factory import tissue_like_rgb, write_pyramid
from .conftest import require_data

PLUGIN = "napari-feddp"


def test_svs_opens_as_one_multiscale_layer_in_microns(make_napari_viewer, cmu1_path):
    viewer = make_napari_viewer()
    layers = viewer.open(str(cmu1_path), plugin=PLUGIN)
    assert len(layers) == 1 and len(viewer.layers) == 1  # no label/macro layers
    layer = layers[0]
    assert layer.multiscale and layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    meta = layer.metadata["feddp"]
    assert meta["vendor"] == "aperio" and meta["objective_power"] == 20
    expected = tifffile.imread(cmu1_path)[1000:1256, 700:956]
    np.testing.assert_array_equal(np.asarray(layer.data[0][1000:1256, 700:956]), expected)
    assert "label" in meta["associated_images"]


@pytest.mark.parametrize("name", ["openslide-python_small.svs", "boxes.tiff"])
def test_other_shared_slides_open(make_napari_viewer, name):
    path = require_data(f"slides/{name}")
    viewer = make_napari_viewer()
    if name == "boxes.tiff":
        with pytest.warns(SlideUnitsWarning, match="pixel units"):
            layers = viewer.open(str(path), plugin=PLUGIN)
        assert tuple(layers[0].scale) == (1.0, 1.0)
        assert layers[0].multiscale and len(layers[0].data) == 4
    else:
        layers = viewer.open(str(path), plugin=PLUGIN)
        assert layers[0].data.shape == (16, 16, 3)


def test_reader_declines_files_that_are_not_slides(tmp_path):
    gray = tmp_path / "mask.tif"
    tifffile.imwrite(gray, np.zeros((32, 32), np.uint8))
    text = tmp_path / "fake.tiff"
    text.write_text("hello")
    assert napari_get_reader(str(gray)) is None
    assert napari_get_reader(str(text)) is None
    assert napari_get_reader(str(tmp_path / "image.png")) is None
    assert napari_get_reader([str(gray), str(text)]) is None


def test_corrupt_slide_reports_reason_and_viewer_survives(make_napari_viewer, tmp_path, cmu1_path):
    viewer = make_napari_viewer()
    viewer.open(str(cmu1_path), plugin=PLUGIN)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(cmu1_path.read_bytes()[:500_000])
    with pytest.raises(Exception, match=r"broken\.svs.*(truncated|corrupt)") as info:
        viewer.open(str(broken), plugin=PLUGIN)
    assert "Traceback" not in str(info.value).splitlines()[0]
    assert len(viewer.layers) == 1  # what was open is still there
    assert np.asarray(viewer.layers[0].data[-1]).shape[-1] == 3


def test_sample_data_loads(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "cmu1_small_region")
    layer = viewer.layers[-1]
    assert layer.multiscale and tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert layer.data[0].shape == (2967, 2220, 3)


def test_labels_writer_round_trip(make_napari_viewer, tmp_path, cmu1_path):
    viewer = make_napari_viewer()
    image = viewer.open(str(cmu1_path), plugin=PLUGIN)[0]
    rng = np.random.default_rng(1)
    labels = np.zeros(image.data[0].shape[:2], dtype=np.int32)
    for _ in range(40):
        y, x = rng.integers(0, 2800), rng.integers(0, 2000)
        labels[y : y + 60, x : x + 90] = rng.integers(1, 70000)
    layer = viewer.add_labels(labels, scale=image.scale, units=image.units, name="nuclei")
    out = tmp_path / "nuclei.ome.tif"
    written = layer.save(str(out), plugin=PLUGIN)
    assert Path(written[0]) == out
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and len(tif.series[0].levels) >= 2
        assert tif.pages[0].is_tiled and tif.pages[0].compression != 1
    back = viewer.open(str(out), plugin=PLUGIN)[0]
    assert back._type_string == "labels"
    assert tuple(back.scale) == pytest.approx(tuple(image.scale))
    np.testing.assert_array_equal(np.asarray(back.data[0]), labels)
    # Aligned with the slide: same physical extent.
    assert open_slide(out).mpp == pytest.approx((0.499, 0.499))


def test_labels_writer_refuses_64bit_overflow(tmp_path):
    from napari_feddp._writer import write_labels

    data = np.full((300, 300), 2**40, dtype=np.int64)
    with pytest.raises(ValueError, match="do not fit in int32"):
        write_labels(str(tmp_path / "big.ome.tif"), data, {"name": "x", "scale": (1, 1)})
    assert not (tmp_path / "big.ome.tif").exists()
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_slide_info_widget_and_associated_opt_in(make_napari_viewer, cmu1_path):
    from napari_feddp.widgets.slide_info import SlideInfoWidget

    viewer = make_napari_viewer()
    viewer.open(str(cmu1_path), plugin=PLUGIN)
    widget = SlideInfoWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert "aperio" in widget.info.text() and "0.499" in widget.info.text()
    assert widget.show_associated.isEnabled()
    assert len(viewer.layers) == 1
    added = widget.add_associated_layers(str(cmu1_path))
    assert added == 3 and len(viewer.layers) == 4
    assert any("[label]" in layer.name for layer in viewer.layers)


def test_pixel_size_from_generic_tiff_in_viewer(make_napari_viewer, tmp_path):
    path = write_pyramid(tmp_path / "scan.tiff", tissue_like_rgb(900, 700), resolution=(1e4 / 0.25, 1e4 / 0.25))
    viewer = make_napari_viewer()
    layer = viewer.open(str(path), plugin=PLUGIN)[0]
    assert tuple(layer.scale) == pytest.approx((0.25, 0.25))


def test_canvas_renders_the_slide(make_napari_viewer, cmu1_path):
    viewer = make_napari_viewer(show=True)
    viewer.open(str(cmu1_path), plugin=PLUGIN)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[0] > 100
    # Tissue is pink/purple: the rendered canvas is not blank.
    assert shot[..., :3].std() > 10


def test_npe2_validate():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(npe2), "validate", PLUGIN], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout
