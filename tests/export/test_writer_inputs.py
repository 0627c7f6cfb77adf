"""The npe2 labels writer takes every form napari hands over and writes pyramidal OME-TIFF in µm."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from napari.layers._multiscale_data import MultiScaleData

from napari_feddp._writer import write_labels
from napari_feddp.slides import open_slide


def _labels() -> np.ndarray:
    labels = np.zeros((1500, 1300), np.uint8)
    labels[100:300, 200:260] = 1
    labels[1200:1490, 1000:1299] = 2
    return labels


def _as(kind: str, labels: np.ndarray):
    levels = [labels, labels[::2, ::2], labels[::4, ::4]]
    if kind == "numpy":
        return labels
    if kind == "dask":
        return da.from_array(labels, chunks=(512, 512))
    if kind == "zarr":
        array = zarr.create_array(zarr.storage.MemoryStore(), shape=labels.shape, chunks=(256, 256), dtype=labels.dtype)
        array[:] = labels
        return array
    if kind == "list":
        return levels
    if kind == "tuple":
        return tuple(da.from_array(level) for level in levels)
    if kind == "MultiScaleData":
        return MultiScaleData([da.from_array(level) for level in levels])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["numpy", "dask", "zarr", "list", "tuple", "MultiScaleData"])
def test_every_input_form_writes_level0_as_a_pyramid_in_microns(tmp_path, kind):
    labels = _labels()
    out = tmp_path / f"{kind}.ome.tif"
    meta = {"name": "nuclei", "scale": (0.5, 0.5), "units": ("micrometer", "micrometer"), "metadata": {}}
    assert write_labels(str(out), _as(kind, labels), meta) == [str(out)]
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and len(tif.series[0].levels) == 2
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), labels)
        np.testing.assert_array_equal(tif.series[0].levels[1].asarray(), labels[::2, ::2])
    assert open_slide(out).mpp == pytest.approx((0.5, 0.5))


def test_layer_in_pixels_has_no_physical_size(tmp_path):
    out = tmp_path / "px.ome.tif"
    write_labels(str(out), _labels(), {"name": "x", "scale": (1.0, 1.0), "units": ("pixel", "pixel")})
    with tifffile.TiffFile(out) as tif:
        assert "PhysicalSizeX" not in tif.ome_metadata


def test_origin_places_a_crop_where_it_lies_in_the_map(tmp_path):
    crop = np.ones((40, 30), np.uint8)
    out = tmp_path / "crop.ome.tif"
    meta = {"name": "roi", "scale": (0.5, 0.5), "units": ("micrometer", "micrometer"),
            "metadata": {"origin": [100, 50]}}
    write_labels(str(out), crop, meta)
    written = tifffile.imread(out)
    assert written.shape == (140, 80)
    assert written[100:, 50:].all() and written.sum() == crop.sum()


def test_empty_level_list_is_refused(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        write_labels(str(tmp_path / "e.ome.tif"), [], {"name": "x", "scale": (1, 1)})
