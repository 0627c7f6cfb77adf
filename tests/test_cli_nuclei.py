"""`napari-feddp segment` writes one label per nucleus, its measurements and a summary, from slides and pictures."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_feddp.cli import main
from napari_feddp.measure import COLUMNS
from napari_feddp.slides import SlideError, open_plain_image, open_slide

from .conftest import require_data
from .test_cli_segment import _error_line

#: MoNuSeg tiles are 40x scans: 0.25 µm per pixel (the bundled model reads them at 0.5).
MONUSEG_MPP = "0.25"


@pytest.fixture
def monuseg_tile() -> np.ndarray:
    """The top-left 256 x 256 px of a real MoNuSeg test tile (H&E, 40x)."""
    folder = require_data("monuseg/test/images")
    path = min(folder.glob("*.tif"))
    return np.asarray(Image.open(path).convert("RGB"))[:256, :256]


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_png_or_jpeg_tile_with_mpp_gives_nuclei_measurements_and_polygons(tmp_path, monuseg_tile, suffix, capsys):
    picture = tmp_path / f"tile{suffix}"
    Image.fromarray(monuseg_tile).save(picture, quality=95)
    out, geo, classes = tmp_path / "tile-nuclei.ome.tif", tmp_path / "tile.geojson", tmp_path / "classes.ome.tif"
    rc = main(["segment", str(picture), "--out", str(out), "--mpp", MONUSEG_MPP, "--geojson", str(geo),
               "--classes-out", str(classes), "--quiet"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    # One id per nucleus, at the model's 0.5 µm/px: half the picture's pixels a side.
    labels = open_slide(out)
    assert labels.kind == "labels" and labels.shape == (128, 128) and labels.mpp == pytest.approx((0.5, 0.5))
    ids_image = tifffile.imread(out)
    assert ids_image.dtype == np.uint32
    ids = np.unique(ids_image[ids_image > 0])
    assert len(ids) > 5 and np.array_equal(ids, np.arange(1, len(ids) + 1))
    # The class map, when asked for: nuclei only where the model saw nucleus.
    class_map = tifffile.imread(classes)
    assert set(np.unique(class_map)) <= {0, 1} and not np.any((ids_image > 0) & (class_map == 0))
    # The measurement table next to --out, one row per nucleus.
    with open(tmp_path / "tile-nuclei.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(COLUMNS) and [int(r[0]) for r in rows[1:]] == ids.tolist()
    areas = np.asarray([float(r[COLUMNS.index("area_um2")]) for r in rows[1:]])
    np.testing.assert_allclose(areas, np.bincount(ids_image.ravel())[1:] * 0.25, rtol=1e-4)
    # One QuPath detection per nucleus, with its measurements, in the picture's pixels.
    features = json.loads(geo.read_text())["features"]
    assert len(features) == len(ids)
    assert all("area_um2" in f["properties"]["measurements"] for f in features)
    ring = np.asarray(features[0]["geometry"]["coordinates"][0])
    assert ring.min() >= 0 and ring.max() <= 256
    # The summary: every pixel of a picture is tissue (64 x 64 µm).
    summary = next(line for line in printed.out.splitlines() if line.startswith("nuclei:"))
    assert f"{len(ids):,} nuclei in 0.0041 mm² of tissue" in summary
    assert "per mm²" in summary and "median area" in summary


def test_tta_segments_with_the_eight_views(tmp_path, monuseg_tile, capsys):
    """--tta: the class map is the engine's augmented one (the bundled model is not rotation-equivariant)."""
    from napari_feddp.inference import run_to_completion
    from napari_feddp.segmentation import load_model, run_segmentation

    picture = tmp_path / "tile.png"
    Image.fromarray(monuseg_tile).save(picture)
    maps = {}
    for flags in ([], ["--tta"]):
        classes = tmp_path / f"classes{len(flags)}.ome.tif"
        rc = main(["segment", str(picture), "--out", str(tmp_path / f"nuclei{len(flags)}.ome.tif"), "--mpp",
                   MONUSEG_MPP, "--classes-out", str(classes), "--no-csv", "--quiet", *flags])
        assert rc == 0, capsys.readouterr().err
        maps[bool(flags)] = tifffile.imread(classes)
    core = run_to_completion(run_segmentation(open_plain_image(picture), load_model(None), mpp=float(MONUSEG_MPP),
                                              tissue=False, device="cpu", augment=True))
    np.testing.assert_array_equal(maps[True], np.asarray(core.labels[:]))
    assert (maps[True] != maps[False]).any()


def test_pictures_need_a_pixel_size_and_must_be_pictures_of_tissue(tmp_path, monuseg_tile, capsys):
    picture = tmp_path / "tile.png"
    Image.fromarray(monuseg_tile).save(picture)
    rc = main(["segment", str(picture), "--out", str(tmp_path / "m.ome.tif")])
    line = _error_line(capsys)
    assert rc == 2 and "tile.png has no pixel size" in line and "--mpp" in line
    grey = tmp_path / "mask.png"
    Image.fromarray((monuseg_tile[..., 0] > 128).astype(np.uint8) * 255).save(grey)
    rc = main(["segment", str(grey), "--out", str(tmp_path / "m.ome.tif"), "--mpp", MONUSEG_MPP])
    assert rc == 2 and "mask.png is a label image, not a slide" in _error_line(capsys)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rc = main(["segment", str(broken), "--out", str(tmp_path / "m.ome.tif"), "--mpp", MONUSEG_MPP])
    assert rc == 2 and "broken.jpg" in _error_line(capsys)
    assert not list(tmp_path.glob("m.*"))


def test_open_plain_image(tmp_path, monuseg_tile):
    path = tmp_path / "tile.jpeg"
    Image.fromarray(monuseg_tile).convert("RGBA").save(tmp_path / "tile-rgba.png")
    Image.fromarray(monuseg_tile).save(path)
    slide = open_plain_image(path)
    assert slide.kind == "rgb" and slide.vendor == "jpeg" and slide.mpp is None and slide.shape == (256, 256)
    rgba = open_plain_image(tmp_path / "tile-rgba.png")
    assert rgba.levels[0].shape == (256, 256, 3)  # alpha dropped
    np.testing.assert_array_equal(np.asarray(rgba.levels[0]), monuseg_tile)
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(SlideError, match=r"notes\.png: not a readable PNG or JPEG"):
        open_plain_image(tmp_path / "notes.png")


def test_csv_where_asked_or_none(tmp_path, monuseg_tile, capsys):
    picture = tmp_path / "tile.png"
    Image.fromarray(monuseg_tile).save(picture)
    table = tmp_path / "table.csv"
    assert main(["segment", str(picture), "--out", str(tmp_path / "a.ome.tif"), "--mpp", MONUSEG_MPP,
                 "--csv", str(table), "--quiet"]) == 0
    assert table.is_file() and not (tmp_path / "a.csv").exists()
    assert main(["segment", str(picture), "--out", str(tmp_path / "b.ome.tif"), "--mpp", MONUSEG_MPP,
                 "--no-csv", "--quiet"]) == 0
    assert not (tmp_path / "b.csv").exists()
    capsys.readouterr()
    rc = main(["segment", str(picture), "--out", str(tmp_path / "c.ome.tif"), "--csv", str(table), "--no-csv"])
    assert rc == 2 and "--no-csv" in _error_line(capsys)
    # A table that cannot be written is found before any work: no output at all.
    rc = main(["segment", str(picture), "--out", str(tmp_path / "d.ome.tif"), "--mpp", MONUSEG_MPP,
               "--csv", str(tmp_path / "missing" / "t.csv")])
    assert rc == 2 and "--csv: folder" in _error_line(capsys)
    assert not (tmp_path / "d.ome.tif").exists()
