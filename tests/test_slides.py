"""Slide opening (Qt-free core): metadata, pixels, laziness, clear errors."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_feddp.slides import NotASlideError, Slide, SlideError, open_slide
from napari_feddp.slides._metadata import aperio_description_fields, ome_physical_size

from ._slide_factory import tissue_like_rgb, write_pyramid
from .conftest import require_data

SHARED_SLIDES = ["CMU-1-Small-Region.svs", "openslide-python_small.svs", "boxes.tiff"]


@pytest.mark.parametrize("name", SHARED_SLIDES)
def test_shared_slides_match_tifffile(name):
    path = require_data(f"slides/{name}")
    slide = open_slide(path)
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        expected_shapes = [lv.shape[:2] for lv in series.levels]
        assert [lv.shape[:2] for lv in slide.levels[: len(expected_shapes)]] == expected_shapes
        level0 = series.levels[0].asarray()
        # A region read through the lazy arrays equals tifffile's full decode.
        h, w = level0.shape[:2]
        y0, x0 = h // 3, w // 4
        region = np.asarray(slide.levels[0][y0 : y0 + 300, x0 : x0 + 200])
        np.testing.assert_array_equal(region, level0[y0 : y0 + 300, x0 : x0 + 200])
        if len(series.levels) > 1:
            np.testing.assert_array_equal(np.asarray(slide.levels[-1]), series.levels[-1].asarray())
        if "svs" in tif.flags:
            mpp = float(aperio_description_fields(tif.pages[0].description)["MPP"])
            assert slide.mpp == (mpp, mpp)
            assert slide.vendor == "aperio"
            assert slide.objective_power == 20.0
    assert all(lv.dtype == np.uint8 and lv.shape[-1] == 3 for lv in slide.levels)


def test_boxes_has_no_physical_size():
    # boxes.tiff carries the 72 dpi default of generic tools: not a pixel size.
    slide = open_slide(require_data("slides/boxes.tiff"))
    assert slide.mpp is None
    assert slide.metadata()["units"] == "pixel"
    assert len(slide.levels) == 4 and slide.pyramid_in_file


def test_aperio_associated_images_listed_not_opened(cmu1_path):
    slide = open_slide(cmu1_path)
    assert set(slide.associated) == {"label", "macro", "thumbnail"}
    assert slide.shape == (2967, 2220)  # main image chosen, not the macro
    label = slide.read_associated("label")
    assert label.shape == (463, 387, 3)
    with pytest.raises(KeyError, match="no associated image 'barcode'"):
        slide.read_associated("barcode")


def test_single_level_large_tiff_gets_lazy_pyramid(cmu1_path):
    slide = open_slide(cmu1_path)  # CMU-1 small region is stored at one level
    assert not slide.pyramid_in_file
    assert [lv.shape[:2] for lv in slide.levels] == [(2967, 2220), (1483, 1110), (741, 555)]
    full = np.asarray(slide.levels[0][:1482, :1110]).astype(np.float64)
    expected = full.reshape(741, 2, 555, 2, 3).mean(axis=(1, 3))
    coarse = slide.levels[1][:741, :555].compute()
    assert np.abs(coarse - expected).max() <= 0.5 + 1e-9
    # The stored level is sliced directly (zarr: no task graph per view); only the
    # computed levels are dask. napari gets exactly these arrays.
    assert isinstance(slide.levels[0], zarr.Array)
    assert all(isinstance(level, da.Array) for level in slide.levels[1:])
    from napari_feddp._reader import slide_layer_data

    assert slide_layer_data(slide)[0] is slide.levels


def test_ome_tiff_physical_size_and_objective(tmp_path):
    image = tissue_like_rgb(1200, 900)
    meta = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.26, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeYUnit": "µm"}
    path = write_pyramid(tmp_path / "slide.ome.tif", image, ome=True, metadata=meta)
    slide = open_slide(path)
    assert slide.vendor == "ome-tiff"
    assert slide.mpp == pytest.approx((0.26, 0.25))
    np.testing.assert_array_equal(np.asarray(slide.levels[0]), image)
    assert len(slide.levels) == 3


def test_ome_units_are_converted():
    xml = ('<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Instrument>'
           '<Objective ID="o" NominalMagnification="40"/></Instrument><Image><Pixels '
           'PhysicalSizeX="250" PhysicalSizeXUnit="nm" PhysicalSizeY="0.00025" '
           'PhysicalSizeYUnit="mm"/></Image></OME>')
    mpp, power = ome_physical_size(xml)
    assert mpp == pytest.approx((0.25, 0.25))
    assert power == 40


def test_generic_tiff_resolution_tags_in_cm(tmp_path):
    path = write_pyramid(tmp_path / "scan.tif", tissue_like_rgb(600, 500), resolution=(1e4 / 0.5, 1e4 / 0.5))
    slide = open_slide(path)
    assert slide.vendor == "generic-tiff"
    assert slide.mpp == pytest.approx((0.5, 0.5))
    assert slide.level_mpp(1) == pytest.approx((1.0, 1.0))


def test_aperio_jpeg2000_slide(tmp_path):
    image = tissue_like_rgb(700, 600, seed=3)
    description = "Aperio Image Library v12.0.0\r\n600x700 (256x256) J2K/KDU Q=70|AppMag = 40|MPP = 0.2525"
    path = tmp_path / "jp2k.svs"
    with tifffile.TiffWriter(path) as writer:
        writer.write(image, tile=(256, 256), compression="jpeg2000",
                     compressionargs={"reversible": True},
                     photometric="rgb", description=description)
    # Mark the tiles as Aperio JPEG 2000 (RGB), as TCGA slides are.
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["Compression"].overwrite(33005)
    slide = open_slide(path)
    assert slide.vendor == "aperio" and slide.mpp == (0.2525, 0.2525) and slide.objective_power == 40
    pixels = np.asarray(slide.levels[0])
    np.testing.assert_array_equal(pixels, tifffile.imread(path))
    assert np.abs(pixels.astype(int) - image).max() <= 2  # reversible coding: (near) lossless


def test_open_is_lazy_level0_never_decoded(tmp_path):
    """Corrupt every level-0 tile: opening and viewing the coarse level still work."""
    image = tissue_like_rgb(2048, 2048)
    path = write_pyramid(tmp_path / "lazy.tif", image, levels=4)
    with tifffile.TiffFile(path) as tif:
        page0 = tif.pages[0]
        offsets, counts = page0.dataoffsets, page0.databytecounts
    with open(path, "r+b") as handle:
        for offset, count in zip(offsets, counts):
            handle.seek(offset)
            handle.write(b"\x00" * count)
    slide = open_slide(path)
    coarse = np.asarray(slide.levels[-1])
    np.testing.assert_array_equal(coarse, image[::8, ::8])
    with pytest.raises(SlideError, match=r"Cannot read lazy\.tif: the tile in row 0, column 0 of level 0 is damaged"):
        np.asarray(slide.levels[0][:256, :256])  # level 0 is decoded only on demand


def test_truncated_slide_clear_error(tmp_path, cmu1_path):
    data = cmu1_path.read_bytes()
    truncated = tmp_path / "CMU-1-truncated.svs"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SlideError, match=r"CMU-1-truncated\.svs.*(truncated|corrupt)"):
        open_slide(truncated)


def test_garbage_file_clear_error(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide")
    with pytest.raises(SlideError, match=r"notes\.svs.*not a readable TIFF"):
        open_slide(path)


def test_unsupported_codec_clear_error(tmp_path):
    path = write_pyramid(tmp_path / "odd.tif", tissue_like_rgb(512, 512), levels=1)
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["Compression"].overwrite(32809)  # ThunderScan: no decoder
    with pytest.raises(SlideError, match=r"odd\.tif.*THUNDERSCAN.*cannot decode"):
        open_slide(path)


def test_non_slide_tiffs_rejected(tmp_path):
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, np.zeros((64, 64), np.uint8))
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 64, 64), np.float32))
    for path in (gray, stack):
        with pytest.raises(NotASlideError, match="is not a slide"):
            open_slide(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such slide file"):
        open_slide(tmp_path / "absent.svs")


def test_copy_keeps_working_after_original_moves(tmp_path, cmu1_path):
    copy = tmp_path / "copy.svs"
    shutil.copy(cmu1_path, copy)
    slide = open_slide(copy)
    first = np.asarray(slide.levels[0][:64, :64])
    slide.close()
    assert first.shape == (64, 64, 3)


@pytest.mark.parametrize("cache_bytes", [0, 300_000, 32 * 2**20])
def test_tile_cache_never_changes_pixels(monkeypatch, cmu1_path, cache_bytes):
    """Reads with the decoded-tile cache off, tiny (tiles evicted) or default equal tifffile."""
    from concurrent.futures import ThreadPoolExecutor

    from napari_feddp.slides import _open

    monkeypatch.setattr(_open, "TILE_CACHE_BYTES", cache_bytes)
    slide = open_slide(cmu1_path)
    full = tifffile.imread(cmu1_path)
    rng = np.random.default_rng(cache_bytes)
    boxes = [(int(rng.integers(0, 2400)), int(rng.integers(0, 1700)), int(rng.integers(1, 520)),
              int(rng.integers(1, 520))) for _ in range(24)]

    def read(box):
        y, x, h, w = box
        return box, np.asarray(slide.levels[0][y : y + h, x : x + w])

    with ThreadPoolExecutor(4) as pool:  # concurrent readers share the cache
        for (y, x, h, w), region in pool.map(read, boxes + boxes):
            np.testing.assert_array_equal(region, full[y : y + h, x : x + w])


def test_tile_past_end_of_file_clear_error(tmp_path):
    """A tile table pointing past the end (not the last tile, so the file size looks right)."""
    path = write_pyramid(tmp_path / "broken.tif", tissue_like_rgb(1024, 1024), levels=2)
    with tifffile.TiffFile(path) as tif:
        offsets = list(tif.pages[0].dataoffsets)
        offsets[3] = tif.filehandle.size + 10_000
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["TileOffsets"].overwrite(offsets)
    with pytest.raises(SlideError, match=r"broken\.tif.*truncated or corrupt"):
        open_slide(path)


VARIANTS = {
    "zlib": {"compression": "zlib"},
    "lzw": {"compression": "lzw"},
    "none": {"compression": None},
    "jpeg-ycbcr": {"compression": "jpeg"},
    "jpeg2000": {"compression": "jpeg2000"},
    "bigtiff-big-endian": {"compression": "zlib", "bigtiff": True, "byteorder": ">"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_subifd_pyramids_match_tifffile(tmp_path, variant):
    options = dict(VARIANTS[variant])
    bigtiff, byteorder = options.pop("bigtiff", False), options.pop("byteorder", None)
    image = tissue_like_rgb(1100, 900, seed=5)  # edge tiles are partial
    pyramid = [image, image[::2, ::2], image[::4, ::4]]
    path = tmp_path / f"{variant}.tif"
    with tifffile.TiffWriter(path, bigtiff=bigtiff, byteorder=byteorder) as writer:
        common = {"tile": (256, 256), "photometric": "rgb", "metadata": None, **options}
        writer.write(pyramid[0], subifds=2, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **common)
        for level in pyramid[1:]:
            writer.write(level, subfiletype=1, **common)
    slide = open_slide(path)
    assert slide.mpp == pytest.approx((0.5, 0.5)) and slide.pyramid_in_file
    with tifffile.TiffFile(path) as tif:
        for mine, theirs in zip(slide.levels, tif.series[0].levels, strict=True):
            np.testing.assert_array_equal(np.asarray(mine), theirs.asarray())


def _open_descriptors(path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # a descriptor closed meanwhile
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


def test_close_releases_file(tmp_path):
    path = write_pyramid(tmp_path / "c.tif", tissue_like_rgb(300, 300))
    slide = open_slide(path)
    np.asarray(slide.levels[0][:10, :10])
    assert _open_descriptors(path) == 1
    slide.close()
    assert _open_descriptors(path) == 0


def test_file_released_when_slide_is_garbage_collected(tmp_path):
    path = write_pyramid(tmp_path / "g.tif", tissue_like_rgb(300, 300))
    slide = open_slide(path)
    np.asarray(slide.levels[0][:10, :10])
    assert _open_descriptors(path) == 1
    del slide
    gc.collect()
    assert _open_descriptors(path) == 0


def test_slide_from_array():
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    for image in (rgba, zarr.array(rgba)):
        slide = Slide.from_array(image, mpp=0.5)
        assert slide.shape == (20, 30) and slide.kind == "rgb" and slide.mpp == (0.5, 0.5)
        np.testing.assert_array_equal(np.asarray(slide.levels[0]), rgba[..., :3])  # alpha dropped
    assert slide.with_mpp((0.25, 0.3)).level_mpp(0) == (0.25, 0.3) and slide.mpp == (0.5, 0.5)
    assert Slide.from_array(rgba).metadata()["units"] == "pixel"
    bad = [(np.zeros((5, 5), np.uint8), r"expected shape \(Y, X, 3\)"),
           (np.zeros((5, 5, 3), np.float32), "expected dtype uint8"), ([[1, 2, 3]], "expected a Slide or an RGB array")]
    for image, message in bad:
        with pytest.raises(SlideError, match=message):
            Slide.from_array(image)
    with pytest.raises(SlideError, match="mpp: expected a positive number"):
        Slide.from_array(rgba, mpp=0)
