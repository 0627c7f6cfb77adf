"""`napari-feddp segment` on the real CMU-1 sample, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_feddp.cli import main
from napari_feddp.slides import open_slide

from ._slide_factory import write_pyramid


@pytest.mark.slow
def test_segment_writes_aligned_labels_and_geojson(tmp_path, cmu1_path, tiny_checkpoint, capsys):
    out, geo = tmp_path / "mask.ome.tif", tmp_path / "objects.geojson"
    rc = main(["segment", str(cmu1_path), "--out", str(out), "--model", str(tiny_checkpoint),
               "--geojson", str(geo), "--batch-size", "4"])
    assert rc == 0
    printed = capsys.readouterr()
    assert "labels:" in printed.out and "tiles predicted" in printed.out
    assert "tiles" in printed.err  # the progress bar
    slide, labels = open_slide(cmu1_path), open_slide(out)
    assert labels.kind == "labels" and labels.shape == slide.shape  # model mpp 0.5 ~ slide 0.499
    assert labels.mpp == pytest.approx(slide.mpp)
    data = json.loads(geo.read_text())
    assert data["type"] == "FeatureCollection"
    for feature in data["features"][:20]:
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert (ring[:, 0] <= slide.shape[1] + 1).all() and (ring[:, 1] <= slide.shape[0] + 1).all()


def test_segment_region_only(tmp_path, cmu1_path, tiny_checkpoint):
    out = tmp_path / "roi.ome.tif"
    assert main(["segment", str(cmu1_path), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--region", "1000,1200,300,200", "--all-tiles", "--quiet"]) == 0
    labels = tifffile.imread(out)
    outside = labels.copy()
    outside[1200:1400, 1000:1300] = 0
    assert not outside.any()


@pytest.mark.slow
def test_entry_point_runs(tmp_path, cmu1_path, tiny_checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "napari_feddp.cli", "segment", str(cmu1_path), "--out", str(tmp_path / "m.ome.tif"),
         "--model", str(tiny_checkpoint), "--region", "1000,1200,400,400", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.ome.tif").exists()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]  # the progress bar, if any, is closed on its own line first
    assert last.startswith("napari-feddp segment: error: "), err
    return last


def test_missing_slide(tmp_path, tiny_checkpoint, capsys):
    rc = main(["segment", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "m.ome.tif"),
               "--model", str(tiny_checkpoint)])
    assert rc == 2 and "No such slide file" in _error_line(capsys)


def test_not_a_slide(tmp_path, tiny_checkpoint, capsys):
    path = tmp_path / "mask.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8))
    rc = main(["segment", str(path), "--out", str(tmp_path / "m.ome.tif"), "--model", str(tiny_checkpoint)])
    assert rc == 2 and "is not a slide" in _error_line(capsys)


def test_bad_checkpoint(tmp_path, cmu1_path, tiny_checkpoint, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    (tmp_path / "broken.json").write_text(tiny_checkpoint.with_suffix(".json").read_text())
    rc = main(["segment", str(cmu1_path), "--out", str(tmp_path / "m.ome.tif"), "--model", str(broken)])
    line = _error_line(capsys)
    assert rc == 2 and "broken.safetensors" in line
    assert not (tmp_path / "m.ome.tif").exists()


def test_no_tissue(tmp_path, tiny_checkpoint, capsys):
    blank = np.full((1024, 1024, 3), 245, np.uint8)
    path = write_pyramid(tmp_path / "blank.tif", blank, levels=2, resolution=(1e4 / 0.5, 1e4 / 0.5))
    rc = main(["segment", str(path), "--out", str(tmp_path / "m.ome.tif"), "--model", str(tiny_checkpoint)])
    assert rc == 2 and "tissue" in _error_line(capsys).lower()


def test_default_is_the_bundled_model(tmp_path, cmu1_path, capsys):
    out = tmp_path / "m.ome.tif"
    assert main(["segment", str(cmu1_path), "--out", str(out), "--region", "1000,1300,256,256", "--quiet"]) == 0
    labels = tifffile.imread(out)
    roi = labels[1300:1556, 1000:1256]
    assert 0.02 < (roi > 0).mean() < 0.8  # the shipped model finds nuclei, not everything


def test_federation_model_takes_precedence(tmp_path, cmu1_path, tiny_checkpoint, isolated_feddp_home):
    from napari_feddp.models.store import resolve_checkpoint

    assert resolve_checkpoint().name == "feddp-nuclei.safetensors"
    store = isolated_feddp_home / "models"
    store.mkdir()
    for suffix in (".safetensors", ".json"):
        (store / f"round-9{suffix}").write_bytes(tiny_checkpoint.with_suffix(suffix).read_bytes())
    assert resolve_checkpoint() == store / "round-9.safetensors"


def test_no_model_available(tmp_path, cmu1_path, capsys, monkeypatch):
    from napari_feddp.models import store

    monkeypatch.setattr(store, "bundled_checkpoint", lambda: None)  # a build without a model
    rc = main(["segment", str(cmu1_path), "--out", str(tmp_path / "m.ome.tif")])
    line = _error_line(capsys)
    assert rc == 2 and "no model is bundled" in line and "--model" in line


def test_bad_region_and_out(tmp_path, cmu1_path, tiny_checkpoint, capsys):
    rc = main(["segment", str(cmu1_path), "--out", str(tmp_path / "m.ome.tif"), "--model", str(tiny_checkpoint),
               "--region", "1,2,3"])
    assert rc == 2 and "X,Y,W,H" in _error_line(capsys)
    rc = main(["segment", str(cmu1_path), "--out", str(tmp_path / "m.png"), "--model", str(tiny_checkpoint)])
    assert rc == 2 and ".ome.tif" in _error_line(capsys)


def test_segment_inside_geojson_polygon(tmp_path, cmu1_path, tiny_checkpoint):
    # A QuPath annotation: [x, y] in level-0 pixels, pixel (r, c) covering [c, c+1) x [r, r+1), ring closed.
    ring = [[1000.4, 1150.2], [1350.7, 1240.9], [1180.1, 1500.6], [990.3, 1420.8], [1000.4, 1150.2]]
    geo = tmp_path / "annotation.geojson"
    geo.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "a1", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
    ]}))
    out = tmp_path / "inside.ome.tif"
    assert main(["segment", str(cmu1_path), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--region", str(geo), "--all-tiles", "--quiet"]) == 0
    labels = tifffile.imread(out)
    assert labels.shape == open_slide(cmu1_path).shape
    # Pixel (r, c) is inside when its centre (r + 0.5, c + 0.5) is; polygon2mask puts centres on integers.
    from skimage.draw import polygon2mask

    yx = np.asarray(ring)[:-1, ::-1] - 0.5
    inside = polygon2mask(labels.shape, yx)
    assert labels[inside].any()
    assert not labels[~inside].any()


def test_region_geojson_without_polygon(tmp_path, cmu1_path, tiny_checkpoint, capsys):
    geo = tmp_path / "points.geojson"
    geo.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]}}))
    rc = main(["segment", str(cmu1_path), "--out", str(tmp_path / "m.ome.tif"), "--model", str(tiny_checkpoint),
               "--region", str(geo)])
    line = _error_line(capsys)
    assert rc == 2 and "points.geojson" in line and "Polygon" in line
    rc = main(["segment", str(cmu1_path), "--out", str(tmp_path / "m.ome.tif"), "--model", str(tiny_checkpoint),
               "--region", str(tmp_path / "missing.geojson")])
    assert rc == 2 and "does not exist" in _error_line(capsys)
