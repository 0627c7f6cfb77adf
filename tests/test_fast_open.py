"""The fast open path (own TIFF directory reader) against tifffile's path, file by file.

Every file the fast path accepts must give exactly what the tifffile path gives
(levels, pixels, metadata, associated images); every file it is not sure of
must be left to tifffile.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_feddp.slides import SlideError, _open, open_slide

from ._slide_factory import tissue_like_rgb, write_pyramid
from .conftest import require_data


def _both(path, monkeypatch):
    fast = open_slide(path)
    with monkeypatch.context() as m:
        m.setattr(_open, "FAST_OPEN", False)
        slow = open_slide(path)
    return fast, slow


def _assert_same(fast, slow):
    assert [lv.shape for lv in fast.levels] == [lv.shape for lv in slow.levels]
    assert fast.downsamples == slow.downsamples
    assert (fast.mpp, fast.vendor, fast.objective_power, fast.kind) == (
        slow.mpp, slow.vendor, slow.objective_power, slow.kind)
    assert fast.associated == slow.associated
    assert fast.pyramid_in_file == slow.pyramid_in_file
    assert fast.metadata() == slow.metadata()
    for mine, theirs in zip(fast.levels, slow.levels):
        np.testing.assert_array_equal(mine.compute(), theirs.compute())
    for i, array in enumerate(fast.region_arrays):
        np.testing.assert_array_equal(np.asarray(array[:]), slow.levels[i].compute())


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "openslide-python_small.svs"])
def test_aperio_slides_take_fast_path_and_match_tifffile(name, monkeypatch):
    fast, slow = _both(require_data(f"slides/{name}"), monkeypatch)
    assert fast._fast is not None and slow._fast is None
    _assert_same(fast, slow)


VARIANTS = {
    "zlib": dict(compression="zlib"),
    "lzw": dict(compression="lzw"),
    "none": dict(compression=None),
    "jpeg-ycbcr": dict(compression="jpeg"),
    "jpeg2000": dict(compression="jpeg2000"),
    "bigtiff-big-endian": dict(compression="zlib", bigtiff=True, byteorder=">"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_subifd_pyramids_match_tifffile(tmp_path, monkeypatch, variant):
    options = dict(VARIANTS[variant])
    bigtiff, byteorder = options.pop("bigtiff", False), options.pop("byteorder", None)
    image = tissue_like_rgb(1100, 900, seed=5)  # edge tiles are partial
    pyramid = [image, image[::2, ::2], image[::4, ::4]]
    path = tmp_path / f"{variant}.tif"
    with tifffile.TiffWriter(path, bigtiff=bigtiff, byteorder=byteorder) as writer:
        common = dict(tile=(256, 256), photometric="rgb", metadata=None, **options)
        writer.write(pyramid[0], subifds=2, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **common)
        for level in pyramid[1:]:
            writer.write(level, subfiletype=1, **common)
    fast, slow = _both(path, monkeypatch)
    assert fast._fast is not None
    _assert_same(fast, slow)
    assert fast.mpp == pytest.approx((0.5, 0.5))


def test_files_it_is_not_sure_of_go_to_tifffile(tmp_path, cmu1_path):
    image = tissue_like_rgb(600, 500)
    ome = write_pyramid(tmp_path / "a.ome.tif", image, ome=True, metadata={"axes": "YXS"})
    described = write_pyramid(tmp_path / "described.tif", image, description="made by a scanner")
    ndpi_like = write_pyramid(tmp_path / "ndpi.tif", image, extratags=[(65420, 3, 1, 1, True)])
    strips = tmp_path / "strips.tif"
    tifffile.imwrite(strips, image, photometric="rgb", metadata=None)
    for path in (ome, described, ndpi_like, strips, require_data("slides/boxes.tiff")):
        slide = open_slide(path)
        assert slide._fast is None, path.name
        assert slide.levels[0].shape[:2] == tifffile.TiffFile(path).series[0].levels[0].shape[:2]


def test_environment_switch_turns_fast_path_off(tmp_path):
    import subprocess
    import sys

    path = write_pyramid(tmp_path / "p.tif", tissue_like_rgb(300, 300))
    code = ("import sys; from napari_feddp.slides import open_slide; "
            "print(open_slide(sys.argv[1])._fast is not None)")
    results = {}
    for value in ("0", "1"):
        env = {**__import__("os").environ, "NAPARI_FEDDP_FAST_OPEN": value}
        out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                             check=True)
        results[value] = out.stdout.strip()
    assert results == {"0": "False", "1": "True"}


def test_tile_tables_are_read_only_for_levels_that_are_read(tmp_path):
    image = tissue_like_rgb(2048, 2048)
    slide = open_slide(write_pyramid(tmp_path / "lazy.tif", image, levels=4))
    levels = slide._fast.levels
    assert all(level._tables is None for level in levels)  # open read no tile table
    np.asarray(slide.layer_levels[-1][:100, :100])
    assert [level._tables is not None for level in levels] == [False, False, False, True]
    assert slide._levels is None  # napari's arrays need no dask graph


def test_tile_past_end_of_file_clear_error_on_read(tmp_path):
    """A tile table pointing past the end (not the last tile, so open cannot see it)."""
    path = write_pyramid(tmp_path / "broken.tif", tissue_like_rgb(1024, 1024), levels=2)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets = list(page.dataoffsets)
        offsets[3] = tif.filehandle.size + 10_000
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["TileOffsets"].overwrite(offsets)
    slide = open_slide(path)
    assert slide._fast is not None
    np.asarray(slide.layer_levels[1][:64, :64])  # the other level still reads
    with pytest.raises(SlideError, match=r"broken\.tif.*truncated or corrupt"):
        np.asarray(slide.layer_levels[0][:64, :64])


def test_close_releases_file(tmp_path):
    import os

    def open_paths():
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                found.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return found

    path = write_pyramid(tmp_path / "c.tif", tissue_like_rgb(300, 300))
    slide = open_slide(path)
    assert str(path) in open_paths()
    slide.close()
    assert str(path) not in open_paths()


def test_file_released_when_slide_is_garbage_collected(tmp_path):
    import gc
    import os

    path = write_pyramid(tmp_path / "g.tif", tissue_like_rgb(300, 300))

    def count_open():
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}") == str(path)
            except OSError:
                pass
        return n

    slide = open_slide(path)
    np.asarray(slide.layer_levels[0][:10, :10])
    assert count_open() == 1
    del slide
    gc.collect()
    assert count_open() == 0
