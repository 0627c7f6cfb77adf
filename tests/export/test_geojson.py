"""QuPath GeoJSON export: polygons re-rasterised give back the mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.draw import disk, ellipse, polygon2mask

from napari_feddp.export import geojson as geojson_module
from napari_feddp.export import labels_to_features, write_geojson


def _nuclei_mask(shape=(600, 500), n=60, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    for _ in range(n):
        r, c = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10)
        rr, cc = ellipse(r, c, rng.integers(3, 9), rng.integers(3, 9), shape=shape,
                         rotation=rng.uniform(0, np.pi))
        mask[rr, cc] = 1
    return mask


def _rasterise(features, shape, downsample=1.0) -> np.ndarray:
    out = np.zeros(shape, bool)
    for feature in features:
        ring = np.asarray(feature["geometry"]["coordinates"][0])  # level-0 (x, y)
        # Back to label-map index space, pixel centres at integers.
        rows, cols = ring[:, 1] / downsample - 0.5, ring[:, 0] / downsample - 0.5
        out |= polygon2mask(shape, np.column_stack([rows, cols]))
    return out


def _dice(a, b) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_polygons_rasterise_back_to_mask():
    mask = _nuclei_mask()
    features = list(labels_to_features(mask, class_names=["background", "nucleus"],
                                       class_colors=["#000000", "#00ff7f"]))
    from scipy import ndimage

    assert len(features) == ndimage.label(mask)[1]  # one feature per connected object
    assert _dice(_rasterise(features, mask.shape), mask.astype(bool)) > 0.99
    props = features[0]["properties"]
    assert props["classification"] == {"name": "nucleus", "color": [0, 255, 127]}
    assert props["objectType"] == "detection"


def test_level0_coordinates_with_downsample():
    mask = np.zeros((100, 100), np.uint8)
    mask[10:20, 30:50] = 1
    (feature,) = labels_to_features(mask, class_names=["bg", "nucleus"], downsample=4.0)
    ring = np.asarray(feature["geometry"]["coordinates"][0])
    assert ring[:, 0].min() == pytest.approx(30 * 4, abs=2.1) and ring[:, 0].max() == pytest.approx(50 * 4, abs=2.1)
    assert ring[:, 1].min() == pytest.approx(10 * 4, abs=2.1) and ring[:, 1].max() == pytest.approx(20 * 4, abs=2.1)


def test_objects_crossing_strips_are_exported_once(monkeypatch):
    monkeypatch.setattr(geojson_module, "STRIP_ROWS", 64)
    monkeypatch.setattr(geojson_module, "MARGIN_ROWS", 32)
    mask = _nuclei_mask(shape=(400, 300), n=80, seed=3)
    rr, cc = disk((64, 100), 10)  # straddles the first strip boundary
    mask[rr, cc] = 1
    features = list(labels_to_features(mask, class_names=["bg", "nucleus"]))
    from scipy import ndimage

    assert len(features) == ndimage.label(mask)[1]
    assert _dice(_rasterise(features, mask.shape), mask.astype(bool)) > 0.99


def test_multiclass_and_file_output(tmp_path):
    labels = np.zeros((80, 80), np.uint8)
    labels[5:15, 5:15] = 1
    labels[40:60, 40:70] = 2
    path, count = write_geojson(tmp_path / "objects.geojson", labels,
                                class_names=["bg", "tumour", "stroma"], class_colors=["#000000", "#ff0000", "#0000ff"])
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and count == 2 == len(data["features"])
    names = sorted(f["properties"]["classification"]["name"] for f in data["features"])
    assert names == ["stroma", "tumour"]


def test_unknown_class_is_a_clear_error(tmp_path):
    labels = np.full((10, 10), 3, np.uint8)
    with pytest.raises(ValueError, match="class 3 but only 2 class names"):
        write_geojson(tmp_path / "x.geojson", labels, class_names=["bg", "nucleus"])
    assert not list(tmp_path.iterdir())


def test_tall_objects_are_never_cut(monkeypatch):
    monkeypatch.setattr(geojson_module, "STRIP_ROWS", 32)
    monkeypatch.setattr(geojson_module, "MARGIN_ROWS", 8)
    mask = np.zeros((300, 60), np.uint8)
    mask[5:290, 10:20] = 1  # one object far taller than strip + margin
    mask[100:140, 40:50] = 1
    features = list(labels_to_features(mask, class_names=["bg", "tissue"]))
    assert len(features) == 2
    assert _dice(_rasterise(features, mask.shape), mask.astype(bool)) > 0.99


def _touching_nuclei(shape=(300, 260), seed=5) -> np.ndarray:
    """Instance labels: ellipses with their own ids, many touching (no background between them)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    n = 0
    for r in range(12, shape[0] - 12, 14):
        for c in range(12, shape[1] - 12, 14):
            n += 1
            rr, cc = ellipse(r + rng.integers(-2, 3), c + rng.integers(-2, 3), 8, 6, shape=shape,
                             rotation=rng.uniform(0, np.pi))
            labels[rr, cc] = 5000 + n  # slide-wide ids, far from 1
    return labels


def test_one_polygon_per_nucleus_with_its_measurements(tmp_path, monkeypatch):
    from napari_feddp.export import nuclei_to_features, write_nuclei_geojson
    from napari_feddp.measure import COLUMNS, measure_nuclei

    monkeypatch.setattr(geojson_module, "STRIP_ROWS", 64)  # nuclei across strip seams too
    monkeypatch.setattr(geojson_module, "MARGIN_ROWS", 16)
    labels = _touching_nuclei()
    ids = np.unique(labels[labels > 0])
    from skimage.measure import label

    assert label(labels > 0).max() < len(ids)  # touching: connected components would merge them
    table = measure_nuclei(labels, 0.5)  # no image: the staining column is NaN
    features = list(nuclei_to_features(labels, table=table, class_color="#00ff7f", downsample=2.0))
    assert len(features) == len(ids)
    names = sorted(int(f["properties"]["name"].split()[-1]) for f in features)
    assert names == ids.tolist()  # every nucleus once, seams included
    for feature in features[:25]:
        properties = feature["properties"]
        nucleus = int(properties["name"].split()[-1])
        assert properties["objectType"] == "detection"
        assert properties["classification"] == {"name": "nucleus", "color": [0, 255, 127]}
        row = int(np.searchsorted(table["label"], nucleus))
        measurements = properties["measurements"]
        assert set(measurements) == set(COLUMNS) - {"label", "mean_haematoxylin_od"}  # NaN left out
        assert measurements["area_um2"] == pytest.approx(table["area_um2"][row])
        # The polygon, back on the label grid, is this nucleus.
        drawn = _rasterise([feature], labels.shape, downsample=2.0)
        assert _dice(drawn, labels == nucleus) > 0.95
    path, count = write_nuclei_geojson(tmp_path / "nuclei.geojson", labels, table=table)
    data = json.loads(path.read_text())  # valid JSON: no NaN written
    assert count == len(data["features"]) == len(ids)


def test_nuclei_export_needs_integer_labels():
    from napari_feddp.export import nuclei_to_features

    with pytest.raises(ValueError, match="integer label image"):
        list(nuclei_to_features(np.ones((4, 4), np.float32)))
    with pytest.raises(ValueError, match="'label' column"):
        list(nuclei_to_features(np.ones((4, 4), np.uint8), table={"area_um2": np.ones(1)}))
