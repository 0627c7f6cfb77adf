"""Polygon regions: rasterisation, GeoJSON (QuPath) input, masking a label map in chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from skimage.draw import polygon2mask

from napari_feddp.regions import PolygonRegion, ellipse_polygon, mask_outside, rasterise, region_from_geojson
from napari_feddp.segmentation import region_from_argument


def test_rasterise_matches_scikit_image_on_random_polygons():
    rng = np.random.default_rng(0)
    for _ in range(100):
        # Off-integer vertices: no pixel centre lies exactly on an edge, where
        # tie-breaking rules may legitimately differ.
        vertices = rng.uniform(-20, 120, (rng.integers(3, 25), 2)) + 0.123
        np.testing.assert_array_equal(rasterise([vertices], (100, 110)), polygon2mask((100, 110), vertices))


def test_hole_is_excluded():
    outer = np.array([[0, 0], [0, 40], [40, 40], [40, 0]], float)
    hole = np.array([[10, 10], [10, 30], [30, 30], [30, 10]], float)
    mask = PolygonRegion((outer, hole)).mask((40, 40))
    assert mask[5, 5] and not mask[20, 20] and mask[35, 20]
    assert mask.sum() == 40 * 40 - 20 * 20


def test_mask_on_a_downsampled_window_is_the_crop_of_the_full_mask():
    region = PolygonRegion.from_yx([[[3.3, 5.1], [90.7, 20.2], [60.4, 150.9]]])
    full = region.mask((50, 80), downsample=(2.0, 2.0))
    window = region.mask((20, 30), downsample=(2.0, 2.0), origin=(10, 40))
    np.testing.assert_array_equal(window, full[10:30, 40:70])
    # Label pixel (i, j) covers level-0 [2i, 2i + 2): its centre (2i + 1, 2j + 1)
    # is where polygon2mask, with centres on integers, puts (i, j) after v / 2 - 0.5.
    vertices = region.rings[0] / 2 - 0.5
    np.testing.assert_array_equal(full, polygon2mask((50, 80), vertices))


def test_bounds_enclose_every_vertex():
    region = PolygonRegion.from_yx([[[10.5, 3.2], [20.1, 8.9], [12, 30]], [[50, 50], [51, 60], [55, 52]]])
    assert region.bounds() == (10, 3, 55, 60)


def test_ellipse_polygon_fills_like_an_ellipse():
    corners = np.array([[10, 20], [10, 80], [50, 80], [50, 20]], float)  # napari's ellipse data
    mask = PolygonRegion.from_yx([ellipse_polygon(corners, 256)]).mask((60, 100))
    yy, xx = np.mgrid[:60, :100] + 0.5
    exact = ((yy - 30) / 20) ** 2 + ((xx - 50) / 30) ** 2 <= 1
    assert (mask != exact).sum() < 0.02 * exact.sum()


def test_mask_outside_clears_only_outside_pixels_of_a_zarr_map():
    labels = zarr.create_array(zarr.storage.MemoryStore(), shape=(300, 400), chunks=(64, 64), dtype=np.uint8)
    triangle = np.array([[20.8, 30.8], [250.2, 60.7], [120.3, 390.1]])
    # The engine labels only its rectangle, the polygon's bounding box.
    labels[20:251, 30:391] = 1
    region = PolygonRegion.from_yx([triangle * 2])  # level-0 coordinates of a map at downsample 2
    cleared = mask_outside(labels, region, (2.0, 2.0))
    inside = polygon2mask((300, 400), triangle - 0.5)  # polygon2mask: pixel centres on integers
    result = labels[:]
    assert cleared == 231 * 361 - int(inside.sum())
    np.testing.assert_array_equal(result.astype(bool), inside)


def test_geojson_feature_collection_from_qupath(tmp_path):
    path = tmp_path / "roi.geojson"
    ring = [[100, 200], [300, 200], [300, 260], [100, 260], [100, 200]]  # [x, y], closed
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
    ]}))
    region = region_from_geojson(path)
    assert len(region.rings) == 1 and region.rings[0].shape == (4, 2)
    assert region.bounds() == (200, 100, 260, 300)
    assert region_from_argument(str(path)).bounds() == (200, 100, 260, 300)


def test_geojson_list_of_features_and_multipolygon():
    square = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    far = [[100, 100], [110, 100], [110, 110], [100, 110], [100, 100]]
    features = [{"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[square], [far]]}}]
    region = region_from_geojson(features)
    mask = region.mask((120, 120))
    assert mask[5, 5] and mask[105, 105] and not mask[50, 50]


def test_geojson_errors(tmp_path):
    points = tmp_path / "points.geojson"
    points.write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    with pytest.raises(ValueError, match="Polygon"):
        region_from_geojson(points)
    broken = tmp_path / "broken.geojson"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not a GeoJSON file"):
        region_from_geojson(broken)
    with pytest.raises(ValueError, match="does not exist"):
        region_from_argument(str(tmp_path / "missing.geojson"))
    with pytest.raises(ValueError, match="X,Y,W,H"):
        region_from_argument("1,2,3")
    assert region_from_argument("10,20,30,40") == (20, 10, 60, 40)
