"""Damaged and hostile slide files: a clear SlideError, quickly, in little memory, never a hang.

The files are written here, byte by byte (``struct``) or with tifffile and then
edited, so each one declares exactly the problem under test. The opens run in a
child process under a 3 GB address-space limit, so a huge allocation would show
as a failure instead of swapping the machine.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from napari_feddp._reader import napari_get_reader
from napari_feddp.slides import SlideError, open_slide
from napari_feddp.slides._limits import MAX_IFDS, MAX_LEVELS, MAX_SIDE, MAX_SUBIFDS, MAX_TILE_SIDE

from ._slide_factory import tissue_like_rgb, write_pyramid

PLUGIN = "napari-feddp"
#: seconds one open may take (measured inside the child, after imports)
OPEN_SECONDS = 1.0
ADDRESS_SPACE_BYTES = 3 * 2**30

BYTE, ASCII, SHORT, LONG = 1, 2, 3, 4
_FORMATS = {BYTE: "B", SHORT: "H", LONG: "I"}


def _ifd_block(entries: dict, at: int, next_ifd: int = 0) -> bytes:
    """A little-endian classic TIFF IFD placed at byte ``at``, its long values right after it."""
    body = bytearray(struct.pack("<H", len(entries)))
    values = bytearray()
    values_at = at + 2 + 12 * len(entries) + 4
    for code in sorted(entries):
        kind, items = entries[code]
        data = struct.pack(f"<{len(items)}{_FORMATS[kind]}", *items)
        if len(data) <= 4:
            body += struct.pack("<HHI", code, kind, len(items)) + data.ljust(4, b"\0")
        else:
            body += struct.pack("<HHII", code, kind, len(items), values_at + len(values))
            values += data + b"\0" * (len(data) % 2)
    return bytes(body + struct.pack("<I", next_ifd) + values)


def tiff_bytes(ifds: list[dict], pixels: bytes = b"", tail=lambda at: b"") -> bytes:
    """Header, ``pixels`` (at byte 8), the chained IFDs, then ``tail(at)`` at byte ``at``.

    A tag value may be a callable of the tail's offset (to point into the tail).
    """
    def layout(tail_at: int) -> bytes:
        out = bytearray(b"II*\0" + struct.pack("<I", 8 + len(pixels) + len(pixels) % 2))
        out += pixels + b"\0" * (len(pixels) % 2)
        resolved = [{c: (k, v(tail_at) if callable(v) else v) for c, (k, v) in e.items()} for e in ifds]
        sizes = [len(_ifd_block(e, 0)) for e in resolved]
        for number, entries in enumerate(resolved):
            at = len(out)
            next_ifd = at + sizes[number] if number + 1 < len(resolved) else 0
            out += _ifd_block(entries, at, next_ifd)
        return bytes(out)

    head = layout(0)
    return layout(len(head)) + tail(len(head))


def rgb_entries(width: int = 16, height: int = 16, *, tile: tuple[int, int] | None = None, data_at: int = 8) -> dict:
    """An uncompressed RGB image with its data at ``data_at`` (one strip, or ``tile`` = (width, height))."""
    size = 16 * 16 * 3
    entries = {256: (LONG, (width,)), 257: (LONG, (height,)), 258: (SHORT, (8, 8, 8)), 259: (SHORT, (1,)),
               262: (SHORT, (2,)), 277: (SHORT, (3,)), 284: (SHORT, (1,))}
    if tile is None:
        entries.update({273: (LONG, (data_at,)), 278: (LONG, (height,)), 279: (LONG, (size,))})
    else:
        entries.update({322: (LONG, (tile[0],)), 323: (LONG, (tile[1],)), 324: (LONG, (data_at,)),
                        325: (LONG, (size,))})
    return entries


PIXELS = bytes(16 * 16 * 3)


def _huge_one_tile(tmp_path):
    """A 1,000,000,000 x 1,000,000,000 image in one tile, 3 KB on disk (tifffile's file, tags edited)."""
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, tissue_like_rgb(256, 256), tile=(256, 256), photometric="rgb", compression="zlib",
                     metadata=None)
    with tifffile.TiffFile(path, mode="r+") as tif:
        for name in ("ImageWidth", "ImageLength", "TileWidth", "TileLength"):
            tif.pages[0].tags[name].overwrite(10**9)
    return path


def _many_subifds(tmp_path, count=100_000):
    """One valid image listing ``count`` distinct 1 x 1 SubIFDs (tifffile's series is quadratic in them)."""
    sub = _ifd_block({256: (LONG, (1,)), 257: (LONG, (1,))}, 0)
    entries = rgb_entries()
    entries[330] = (LONG, lambda at: tuple(range(at, at + len(sub) * count, len(sub))))
    path = tmp_path / "subifds.tif"
    path.write_bytes(tiff_bytes([entries], PIXELS, tail=lambda at: sub * count))
    return path


def _raw(tmp_path, name, entries_list, tail=lambda at: b""):
    path = tmp_path / name
    path.write_bytes(tiff_bytes(entries_list, PIXELS, tail))
    return path


def _self_referencing(tmp_path):
    """IFD 0's next-IFD pointer points at IFD 0."""
    path = _raw(tmp_path, "loop.tif", [rgb_entries()])
    data = bytearray(path.read_bytes())
    (first,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, first)
    struct.pack_into("<I", data, first + 2 + 12 * count, first)
    path.write_bytes(bytes(data))
    return path


def _long_chain(tmp_path):
    return _raw(tmp_path, "chain.tif", [rgb_entries() for _ in range(MAX_IFDS + 1)])


def _absurd_tile_table(tmp_path):
    """TileOffsets/TileByteCounts declaring 2**31 entries (8 GB of table) in a 3 KB file."""
    path = _raw(tmp_path, "table.tif", [rgb_entries(tile=(16, 16))])
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        for name in ("TileOffsets", "TileByteCounts"):
            struct.pack_into("<I", data, tags[name].offset + 4, 2**31)
    path.write_bytes(bytes(data))
    return path


def _table_shorter_than_image(tmp_path):
    """A 4,000 x 4,000 image whose tile table has one 16 x 16 tile."""
    return _raw(tmp_path, "short-table.tif", [rgb_entries(4000, 4000, tile=(16, 16))])


CRAFTED = {
    # name: (builder, words the message must contain)
    "huge.tif": (_huge_one_tile, f"{MAX_SIDE:,}"),
    "subifds.tif": (_many_subifds, f"at most {MAX_SUBIFDS:,}"),
    "zero-tile-width.tif": (lambda p: _raw(p, "zero-tile-width.tif", [rgb_entries(tile=(0, 16))]), "tiles"),
    "zero-tile-length.tif": (lambda p: _raw(p, "zero-tile-length.tif", [rgb_entries(tile=(16, 0))]), "tiles"),
    "zero-width.tif": (lambda p: _raw(p, "zero-width.tif", [rgb_entries(0, 16)]), "pixels"),
    "zero-height.svs": (lambda p: _raw(p, "zero-height.svs", [rgb_entries(16, 0, tile=(16, 16))]), "pixels"),
    "zero-rows-per-strip.tif": (
        lambda p: _raw(p, "zero-rows-per-strip.tif", [{**rgb_entries(), 278: (LONG, (0,))}]), "strips"),
    "big-tile.tif": (lambda p: _raw(p, "big-tile.tif", [rgb_entries(tile=(8192, 8192))]), f"{MAX_TILE_SIDE:,}"),
    "loop.tif": (_self_referencing, "loops"),
    "chain.tif": (_long_chain, f"is not a slide: it holds more than {MAX_IFDS:,} images"),
    "table.tif": (_absurd_tile_table, "corrupt"),
    "short-table.tif": (_table_shorter_than_image, "need 62,500 tiles"),
}

_CHILD = r"""
import json, resource, sys, time
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from napari_feddp.slides import SlideError, open_slide
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = {}
for path in sys.argv[2:]:
    start = time.perf_counter()
    try:
        open_slide(path).close()
        outcome = ("opened", "")
    except SlideError as exc:
        outcome = ("SlideError", str(exc))
    except BaseException as exc:
        outcome = (type(exc).__name__, str(exc))
    results[path] = [*outcome, time.perf_counter() - start]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"results": results, "peak_growth_kb": peak - base}))
"""


@pytest.fixture(scope="module")
def crafted_outcomes(tmp_path_factory):
    """Build every crafted file and open them all in one memory-limited child process."""
    folder = tmp_path_factory.mktemp("crafted")
    started = time.perf_counter()
    paths = {name: build(folder) for name, (build, _words) in CRAFTED.items()}
    build_seconds = time.perf_counter() - started
    done = subprocess.run([sys.executable, "-c", _CHILD, str(ADDRESS_SPACE_BYTES), *map(str, paths.values())],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: report["results"][str(path)] for name, path in paths.items()}, report, build_seconds, paths


def test_crafted_files_are_small_and_quick_to_write(crafted_outcomes):
    _outcomes, _report, build_seconds, paths = crafted_outcomes
    assert build_seconds < 10
    assert max(path.stat().st_size for path in paths.values()) < 4 * 2**20


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_file_gives_slide_error_quickly(crafted_outcomes, name):
    outcomes, _report, _build, _paths = crafted_outcomes
    kind, message, seconds = outcomes[name]
    assert kind == "SlideError", f"{name}: {kind}: {message}"
    assert message.startswith((f"Cannot open {name}: ", f"{name} is not a slide: "))
    assert CRAFTED[name][1] in message
    assert "\n" not in message and "MemoryError" not in message
    assert seconds < OPEN_SECONDS, f"{name} took {seconds:.2f} s"


def test_crafted_files_need_little_memory(crafted_outcomes):
    _outcomes, report, _build, _paths = crafted_outcomes
    assert report["peak_growth_kb"] < 200 * 1024  # all files together, under a 3 GB address-space limit


def test_too_many_levels(tmp_path):
    """An OME-TIFF whose SubIFDs (each one a level to tifffile) outnumber the level limit."""
    path = tmp_path / "levels.ome.tif"
    image = tissue_like_rgb(32, 32)
    with tifffile.TiffWriter(path, ome=True) as writer:
        writer.write(image, subifds=MAX_LEVELS + 1, photometric="rgb", tile=(16, 16))
        for _ in range(MAX_LEVELS + 1):
            writer.write(image[::2, ::2], subfiletype=1, photometric="rgb", tile=(16, 16))
    start = time.perf_counter()
    with pytest.raises(SlideError, match=rf"levels\.ome\.tif: the image has {MAX_LEVELS + 2} resolution levels; at most"):
        open_slide(path)
    assert time.perf_counter() - start < OPEN_SECONDS


def test_limits_leave_real_slides_alone(cmu1_path):
    slide = open_slide(cmu1_path)
    assert slide.shape == (2967, 2220) and len(slide.levels) == 3


@pytest.mark.parametrize("compression", ["zlib", None, "jpeg"])
def test_damaged_after_opening_names_the_file(tmp_path, compression):
    """Truncated while open: every read (stored level, product reader) raises SlideError naming the file."""
    from napari_feddp.inference._reader import read_region, read_scaled

    path = write_pyramid(tmp_path / "shrinking.tif", tissue_like_rgb(1024, 1024), levels=2, compression=compression)
    slide = open_slide(path)
    os.truncate(path, path.stat().st_size // 3)
    with pytest.raises(SlideError, match=r"Cannot read shrinking\.tif: the tile in row \d+, column \d+ of level 0"):
        np.asarray(slide.levels[0][700:900, 700:900])
    with pytest.raises(SlideError, match=r"shrinking\.tif.*damaged"):
        read_region(slide.levels[1], 0, 256, 0, 256)
    with pytest.raises(SlideError, match=r"shrinking\.tif.*damaged"):
        read_scaled(slide.levels[1], (2.0, 2.0), 0, 0, 128, 128)


def test_computed_levels_of_a_damaged_file_name_it(tmp_path, cmu1_path):
    """The lazy pyramid of a one-level slide (dask over zarr) reports the file too."""
    path = tmp_path / "cut.svs"
    path.write_bytes(cmu1_path.read_bytes())
    slide = open_slide(path)
    assert not slide.pyramid_in_file
    os.truncate(path, 200_000)
    with pytest.raises(SlideError, match=r"Cannot read cut\.svs: .* damaged"):
        np.asarray(slide.levels[-1])


def test_damaged_associated_image_names_the_file(tmp_path, cmu1_path):
    path = tmp_path / "label.svs"
    path.write_bytes(cmu1_path.read_bytes())
    slide = open_slide(path)
    with tifffile.TiffFile(path) as tif:
        page = tif.series[slide.associated["label"]].keyframe
        offsets = page.dataoffsets
    with open(path, "r+b") as handle:
        for offset in offsets:
            handle.seek(offset)
            handle.write(b"\xff" * 64)
    with pytest.raises(SlideError, match=r"Cannot read the label image of label\.svs"):
        slide.read_associated("label")


def test_reader_claims_and_reports_hostile_tiffs_quickly(tmp_path):
    for build in (_huge_one_tile, _many_subifds):
        path = build(tmp_path)
        start = time.perf_counter()
        reader = napari_get_reader(str(path))
        assert time.perf_counter() - start < OPEN_SECONDS
        assert reader is not None  # a TIFF it cannot read is explained, not passed on
        with pytest.raises(SlideError, match=rf"Cannot open {path.name}"):
            reader(str(path))


def test_reader_declines_tiff_stacks_but_explains_vendor_files(tmp_path):
    """A TIFF with more images than any slide is a stack: left to other readers, unless named like a slide."""
    stack = _long_chain(tmp_path)
    assert napari_get_reader(str(stack)) is None
    named_like_a_slide = tmp_path / "stack.svs"
    named_like_a_slide.write_bytes(stack.read_bytes())
    with pytest.raises(SlideError, match=rf"stack\.svs is not a slide: it holds more than {MAX_IFDS:,} images"):
        napari_get_reader(str(named_like_a_slide))(str(named_like_a_slide))


def _cli_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_cli_reports_hostile_and_damaged_slides(tmp_path, cmu1_path, tiny_checkpoint, capsys):
    from napari_feddp.cli import main

    damaged = tmp_path / "damaged.svs"
    data = bytearray(cmu1_path.read_bytes())
    with tifffile.TiffFile(cmu1_path) as tif:
        page = tif.pages[0]
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            data[offset : offset + count] = bytes(count)  # opens fine; no tile decodes
    damaged.write_bytes(bytes(data))
    for path, words in ((_huge_one_tile(tmp_path), "500,000 pixels per side"), (damaged, "is damaged")):
        rc = main(["segment", str(path), "--out", str(tmp_path / "m.ome.tif"), "--model", str(tiny_checkpoint)])
        line = _cli_error(capsys)
        assert rc == 2 and path.name in line and words in line, line


@pytest.mark.gui
def test_viewer_survives_hostile_files(make_napari_viewer, tmp_path, cmu1_path):
    viewer = make_napari_viewer()
    viewer.open(str(cmu1_path), plugin=PLUGIN)
    hostile = [_huge_one_tile(tmp_path), _many_subifds(tmp_path), _self_referencing(tmp_path),
               CRAFTED["zero-height.svs"][0](tmp_path)]
    for path in hostile:
        start = time.perf_counter()
        with pytest.raises(Exception, match=rf"{path.name}") as info:
            viewer.open(str(path), plugin=PLUGIN)
        assert time.perf_counter() - start < 5 * OPEN_SECONDS
        assert "Traceback" not in str(info.value)
    assert len(viewer.layers) == 1  # the slide that was open is untouched
    assert np.asarray(viewer.layers[0].data[-1]).shape[-1] == 3
