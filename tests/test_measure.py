"""Per-nucleus measurements in physical units, against shapes whose values are known."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from skimage.draw import disk, ellipse

from napari_feddp.measure import COLUMNS, measure_nuclei, summarise, write_csv


def test_a_disk_measures_as_a_disk_in_micrometres():
    mpp = 0.5
    labels = np.zeros((100, 100), np.int32)
    labels[disk((40, 60), 10, shape=labels.shape)] = 7
    table = measure_nuclei(labels, mpp, origin_um=(1000.0, 2000.0))
    assert list(table) == list(COLUMNS) and table["label"].tolist() == [7]
    area_px = np.count_nonzero(labels)
    assert table["area_um2"][0] == pytest.approx(area_px * mpp**2)
    assert table["equivalent_diameter_um"][0] == pytest.approx(2 * math.sqrt(area_px / math.pi) * mpp)
    assert table["centroid_y_um"][0] == pytest.approx(1000.0 + 40 * mpp)
    assert table["centroid_x_um"][0] == pytest.approx(2000.0 + 60 * mpp)
    assert table["perimeter_um"][0] == pytest.approx(2 * math.pi * 10 * mpp, rel=0.06)
    assert table["eccentricity"][0] < 0.1 and table["solidity"][0] > 0.95
    assert np.isnan(table["mean_haematoxylin_od"][0])  # no image given


def test_shape_and_staining_columns():
    labels = np.zeros((60, 60), np.int32)
    labels[ellipse(20, 20, 5, 15, shape=labels.shape)] = 1  # elongated
    labels[disk((45, 45), 6, shape=labels.shape)] = 2
    rgb = np.full((60, 60, 3), 230, np.uint8)
    rgb[labels == 2] = (60, 40, 140)  # dark purple: haematoxylin
    table = measure_nuclei(labels, 0.25, rgb=rgb)
    assert table["eccentricity"][0] > 0.9 > table["eccentricity"][1]
    assert table["mean_haematoxylin_od"][1] > table["mean_haematoxylin_od"][0]


def test_summary_and_csv(tmp_path):
    labels = np.zeros((50, 50), np.int32)
    for i, (y, x) in enumerate([(10, 10), (10, 35), (35, 20)], start=1):
        labels[disk((y, x), 4 + i, shape=labels.shape)] = i
    table = measure_nuclei(labels, 1.0)
    summary = summarise(table, tissue_area_um2=2500.0)
    assert summary["nuclei"] == 3 and summary["tissue_area_mm2"] == pytest.approx(0.0025)
    assert summary["density_per_mm2"] == pytest.approx(3 / 0.0025)
    assert summary["area_um2_median"] == pytest.approx(np.median(table["area_um2"]))
    assert summarise(measure_nuclei(np.zeros((4, 4), np.int32), 1.0), None)["nuclei"] == 0
    path = write_csv(table, tmp_path / "nuclei.csv")
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(COLUMNS) and len(rows) == 4 and rows[1][0] == "1"


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="integer label image"):
        measure_nuclei(np.zeros((4, 4), np.float32), 1.0)
    with pytest.raises(ValueError, match="mpp"):
        measure_nuclei(np.zeros((4, 4), np.int32), -1)
    with pytest.raises(ValueError, match="does not match"):
        measure_nuclei(np.zeros((4, 4), np.int32), 1.0, rgb=np.zeros((3, 4, 3), np.uint8))


def test_tiled_measurements_equal_whole_image_measurements():
    from napari_feddp.measure import measure_nuclei_tiled

    labels = np.zeros((200, 260), np.int32)
    rng = np.random.default_rng(1)
    n = 0
    for cy in range(12, 190, 20):
        for cx in range(12, 250, 20):
            n += 1
            labels[disk((cy + rng.integers(-3, 4), cx + rng.integers(-3, 4)), 6 + rng.integers(0, 3),
                        shape=labels.shape)] = n
    rgb = rng.integers(0, 255, (200, 260, 3), dtype=np.uint8)
    whole = measure_nuclei(labels, 0.5, rgb=rgb, origin_um=(5.0, 7.0))
    tiled = measure_nuclei_tiled(labels, 0.5, read_rgb=lambda top, left, bottom, right: rgb[top:bottom, left:right], origin_um=(5.0, 7.0),
                                 window=50, halo_um=10.0)
    assert tiled["label"].tolist() == whole["label"].tolist()  # every nucleus once, seams included
    for column in COLUMNS[1:]:
        np.testing.assert_allclose(tiled[column], whole[column], rtol=1e-6)


def test_every_column_equals_scikit_image_regionprops():
    """The columns computed for all nuclei at once equal regionprops_table's, nucleus by nucleus."""
    from skimage.color import rgb2hed
    from skimage.measure import regionprops_table

    from napari_feddp.inference.instances import split_nuclei

    from .test_instances import _field_of_nuclei

    labels = split_nuclei(_field_of_nuclei(), 0.5)  # touching, irregular nuclei, some at the border
    labels[labels == 7] = 0  # ids need not be consecutive
    labels[labels == 20] = 9999
    rgb = np.random.default_rng(2).integers(0, 255, labels.shape + (3,), dtype=np.uint8)
    mpp = 0.5
    ours = measure_nuclei(labels, mpp, rgb=rgb)
    reference = regionprops_table(labels, intensity_image=rgb2hed(rgb)[..., 0], properties=[
        "label", "centroid", "area", "perimeter", "equivalent_diameter_area", "eccentricity", "solidity",
        "intensity_mean"])
    assert ours["label"].tolist() == reference["label"].tolist()
    pairs = {"centroid_y_um": ("centroid-0", mpp), "centroid_x_um": ("centroid-1", mpp), "area_um2": ("area", mpp**2),
             "perimeter_um": ("perimeter", mpp), "equivalent_diameter_um": ("equivalent_diameter_area", mpp),
             "eccentricity": ("eccentricity", 1), "solidity": ("solidity", 1),
             "mean_haematoxylin_od": ("intensity_mean", 1)}
    for column, (name, factor) in pairs.items():
        np.testing.assert_allclose(ours[column], reference[name] * factor, rtol=1e-9, atol=1e-12, err_msg=column)
