"""Fuzz the slide opener with structured mutations of real slides.

Each case copies one seed slide, damages it in one to three places and opens
it the way napari and the segmentation engine do: ``open_slide``, read a
256 x 256 region in the middle of level 0, read the coarsest level whole,
build the layer metadata. A case passes when this ends in a valid result or
in a ``SlideError`` that names the file. It fails on any other exception, a
``SlideError`` caused by running out of memory, a case that runs past its time
bound (a hang), or a worker process that dies (a crash in a decoder).

Mutations hit the file's structure, located with tifffile: bit flips in IFD
entries and tag values, new values for dimension, tile-size, offset, count,
compression and other tags, edits of tag headers (type, count, value offset),
next-IFD pointers redirected (to themselves, another IFD, past the end),
truncations, bit flips in tile data and blocks of bytes copied over others.

Seeds: the bundled CMU-1-Small-Region.svs, the slides in ``../shared/data/slides``
when present, and two SubIFD pyramids (classic TIFF with JPEG tiles, big-endian
BigTIFF OME-TIFF with Deflate tiles) written from CMU-1's tissue, so that
SubIFDs and BigTIFF headers are mutated too.

Cases run in worker processes (each under a 3 GB address-space limit) with a
per-case time bound; case ``i`` of seed ``s`` is always the same mutation, so a
failure is reproduced with ``--first i --cases 1 --keep DIR``::

    .venv/bin/python scripts/fuzz_slides.py --cases 2000 --seed 0
    make fuzz FUZZ_CASES=2000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED_SLIDE = REPO / "src" / "napari_feddp" / "data" / "CMU-1-Small-Region.svs"
SHARED_SLIDES = ("CMU-1-Small-Region.svs", "openslide-python_small.svs", "boxes.tiff")
MEMORY_LIMIT_BYTES = 3 * 2**30

# Tags whose values steer how a file is parsed and decoded.
STRUCTURE_TAGS = (254, 256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 322, 323, 324, 325, 330, 338, 339, 347, 530)
COMPRESSIONS = (0, 1, 2, 5, 6, 7, 8, 32773, 32946, 33003, 33005, 34712, 34887, 50000, 50001, 65535)
# struct format and size of the TIFF data types a mutation writes
TYPE_FORMATS = {1: "B", 2: "B", 3: "H", 4: "I", 6: "b", 7: "B", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}


def shared_data() -> Path:
    return Path(os.environ.get("FEDDP_SHARED_DATA", REPO.parent / "shared" / "data"))


# ---------------------------------------------------------------- structure


@dataclass
class Tag:
    code: int
    dtype: int
    count: int
    entry: int  # byte offset of the 12 (20 in BigTIFF) byte entry
    value: int  # byte offset of the value (inside the entry when it fits)


@dataclass
class Layout:
    """Where a file's structure lies, as found by tifffile."""

    byteorder: str
    countsize: int  # bytes of an entry's count field (4, or 8 in BigTIFF)
    offsetformat: str
    ifds: list[tuple[int, int]] = field(default_factory=list)  # (offset, byte size incl. next pointer)
    next_pointers: list[int] = field(default_factory=list)
    tags: list[Tag] = field(default_factory=list)
    data: list[tuple[int, int]] = field(default_factory=list)  # tile/strip (offset, bytecount)


def read_layout(path: Path) -> Layout:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        fmt = tif.tiff
        layout = Layout(fmt.byteorder, fmt.offsetsize if fmt.version == 43 else 4, fmt.offsetformat)
        pages = {}
        for page in tif.pages:
            pages[page.offset] = page
        for series in tif.series:
            for level in series.levels:
                page = level.keyframe
                pages.setdefault(page.offset, page)
        handle = tif.filehandle
        for offset, page in sorted(pages.items()):
            handle.seek(offset)
            (tagno,) = struct.unpack(fmt.tagnoformat, handle.read(fmt.tagnosize))
            size = fmt.tagnosize + tagno * fmt.tagsize + fmt.offsetsize
            layout.ifds.append((offset, size))
            layout.next_pointers.append(offset + size - fmt.offsetsize)
            for tag in page.tags.values():
                layout.tags.append(Tag(tag.code, tag.dtype, tag.count, tag.offset, tag.valueoffset))
            layout.data.extend((int(o), int(c)) for o, c in zip(page.dataoffsets, page.databytecounts) if c)
    return layout


# ---------------------------------------------------------------- mutations


def _pack(data: bytearray, fmt: str, position: int, value: int) -> None:
    """``struct.pack_into`` where the bytes still exist (an earlier mutation may have cut the file)."""
    if position >= 0 and position + struct.calcsize(fmt) <= len(data):
        struct.pack_into(fmt, data, position, value)


def _flip_bits(data: bytearray, rng: random.Random, start: int, stop: int, flips: int) -> str:
    positions = []
    for _ in range(flips):
        position = rng.randrange(start, max(stop, start + 1))
        if position < len(data):
            data[position] ^= 1 << rng.randrange(8)
            positions.append(position)
    return ",".join(map(str, positions))


def _interesting(rng: random.Random, old: int, bits: int, file_size: int) -> int:
    top = 2**bits - 1
    choices = [0, 1, 2, 3, 7, 16, 255, 256, 4095, 4096, 4097, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**63,
               old + 1, old - 1, old * 2, old // 2, old * 16, old * 4096, file_size, file_size - 1, file_size + 1,
               rng.randrange(2**bits)]
    return min(max(rng.choice(choices), 0), top)


def _write_value(data: bytearray, layout: Layout, tag: Tag, index: int, value: int) -> None:
    fmt = TYPE_FORMATS.get(tag.dtype)
    if fmt is None:
        return
    size = struct.calcsize(fmt)
    position = tag.value + index * size
    value %= 2 ** (8 * size)
    if fmt.islower() and value >= 2 ** (8 * size - 1):  # signed types: the same bits
        value -= 2 ** (8 * size)
    _pack(data, layout.byteorder + fmt, position, value)


def mutate(original: bytes, layout: Layout, rng: random.Random) -> tuple[bytes, str]:
    """One to three structured mutations of ``original``; returns the bytes and what was done."""
    data = bytearray(original)
    done = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.choice(("flip-structure", "flip-structure", "tag-value", "tag-value", "tag-value", "tag-header",
                           "next-ifd", "truncate", "flip-data", "splice"))
        done.append(_MUTATIONS[kind](data, layout, rng))
    return bytes(data), "; ".join(done)


def _flip_structure(data: bytearray, layout: Layout, rng: random.Random) -> str:
    if rng.random() < 0.6 or not layout.tags:
        offset, size = rng.choice(layout.ifds)
    else:
        tag = rng.choice(layout.tags)
        fmt = TYPE_FORMATS.get(tag.dtype, "B")
        offset, size = tag.value, max(struct.calcsize(fmt) * min(tag.count, 4096), 1)
    return f"flip-structure@{_flip_bits(data, rng, offset, offset + size, rng.choice((1, 1, 2, 4, 8)))}"


def _tag_value(data: bytearray, layout: Layout, rng: random.Random) -> str:
    tags = [t for t in layout.tags if t.code in STRUCTURE_TAGS and t.dtype in TYPE_FORMATS] or layout.tags
    tag = rng.choice(tags)
    fmt = TYPE_FORMATS.get(tag.dtype, "B")
    size = struct.calcsize(fmt)
    count = max(min(tag.count, (len(data) - tag.value) // size), 0)
    if count == 0:
        return f"tag-value {tag.code}: value no longer in the file"
    index = 0 if count == 1 or rng.random() < 0.3 else rng.randrange(count)
    old = struct.unpack_from(layout.byteorder + fmt, data, tag.value + index * size)[0]
    if tag.code == 259:
        new = rng.choice(COMPRESSIONS)
    else:
        new = _interesting(rng, int(old), 8 * size, len(data))
    _write_value(data, layout, tag, index, new)
    return f"tag-value {tag.code}[{index}] {old}->{new}"


def _tag_header(data: bytearray, layout: Layout, rng: random.Random) -> str:
    tag = rng.choice(layout.tags)
    part = rng.choice(("dtype", "count", "count", "offset"))
    if part == "dtype":
        new = rng.choice((0, 1, 2, 3, 4, 5, 7, 11, 12, 13, 16, 17, 19, 255, 65535))
        _pack(data, layout.byteorder + "H", tag.entry + 2, new)
    elif part == "count":
        new = _interesting(rng, tag.count, 8 * layout.countsize, len(data))
        _pack(data, layout.byteorder + ("I" if layout.countsize == 4 else "Q"), tag.entry + 4, new)
    else:
        new = _interesting(rng, tag.value, 8 * layout.countsize, len(data))
        field_format = "I" if layout.countsize == 4 else "Q"
        _pack(data, layout.byteorder + field_format, tag.entry + 4 + layout.countsize, new)
    return f"tag-header {tag.code}.{part}={new}"


def _next_ifd(data: bytearray, layout: Layout, rng: random.Random) -> str:
    index = rng.randrange(len(layout.next_pointers))
    pointer = layout.next_pointers[index]
    target = rng.choice((0, layout.ifds[index][0], rng.choice(layout.ifds)[0], len(data), len(data) + 12,
                         rng.randrange(len(data)), 2**31))
    _pack(data, layout.offsetformat, pointer, target)
    return f"next-ifd {index}->{target}"


def _truncate(data: bytearray, layout: Layout, rng: random.Random) -> str:
    anchors = [o for o, _ in layout.ifds] + [o + c for o, c in layout.data[-50:]]
    cut = rng.choice((rng.randrange(len(data)), rng.choice(anchors) + rng.randrange(-16, 16)))
    cut = min(max(cut, 0), len(data))
    del data[cut:]
    return f"truncate@{cut}"


def _flip_data(data: bytearray, layout: Layout, rng: random.Random) -> str:
    if not layout.data:
        return _flip_structure(data, layout, rng)
    offset, count = rng.choice(layout.data)
    return f"flip-data@{_flip_bits(data, rng, offset, offset + count, rng.choice((1, 4, 16)))}"


def _splice(data: bytearray, layout: Layout, rng: random.Random) -> str:
    size = rng.choice((4, 12, 64, 512))
    if len(data) <= size:
        return "splice skipped"
    source = rng.choice([o for o, _ in layout.ifds] + [rng.randrange(len(data) - size)])
    target = rng.choice([o for o, _ in layout.ifds] + [t.value for t in layout.tags[:50]] + [rng.randrange(len(data))])
    block = bytes(data[source : source + size])
    data[target : target + len(block)] = block
    return f"splice {source}->{target} ({size} B)"


_MUTATIONS = {"flip-structure": _flip_structure, "tag-value": _tag_value, "tag-header": _tag_header,
              "next-ifd": _next_ifd, "truncate": _truncate, "flip-data": _flip_data, "splice": _splice}


# ---------------------------------------------------------------- seeds


def derived_seeds(folder: Path) -> list[Path]:
    """SubIFD pyramids of CMU-1's tissue: a classic JPEG-tiled TIFF and a big-endian BigTIFF OME-TIFF."""
    import numpy as np
    import tifffile

    tissue = tifffile.imread(BUNDLED_SLIDE)[1000:1512, 800:1312]
    written = []
    for name, options in (("cmu-subifds.tif", {"compression": "jpeg", "bigtiff": False, "byteorder": "<", "ome": False}),
                          ("cmu-bigtiff-be.ome.tif", {"compression": "zlib", "bigtiff": True, "byteorder": ">", "ome": True})):
        path = folder / name
        levels = [tissue, np.ascontiguousarray(tissue[::2, ::2]), np.ascontiguousarray(tissue[::4, ::4])]
        with tifffile.TiffWriter(path, bigtiff=options["bigtiff"], byteorder=options["byteorder"],
                                 ome=options["ome"]) as writer:
            common = {"tile": (128, 128), "photometric": "rgb", "compression": options["compression"]}
            writer.write(levels[0], subifds=2, resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
                         metadata={"axes": "YXS"} if options["ome"] else None, **common)
            for level in levels[1:]:
                writer.write(level, subfiletype=1, metadata=None, **common)
        written.append(path)
    return written


def default_seeds(folder: Path) -> list[Path]:
    seeds = [BUNDLED_SLIDE]
    seeds += [p for p in (shared_data() / "slides" / name for name in SHARED_SLIDES) if p.is_file()]
    distinct = {path.read_bytes(): path for path in reversed(seeds)}  # the bundled copy of CMU-1 once
    return sorted(distinct.values(), key=seeds.index) + derived_seeds(folder)


# ---------------------------------------------------------------- one case, in a worker


def check_file(path: str) -> tuple[str, str]:
    """Open ``path`` as the product does; ``("ok"|"slide-error"|"error", detail)``."""
    import numpy as np

    from napari_feddp.slides import SlideError, open_slide

    name = Path(path).name
    try:
        slide = open_slide(path)
        try:
            level0 = slide.levels[0]
            height, width = int(level0.shape[0]), int(level0.shape[1])
            y, x = max(height // 2 - 128, 0), max(width // 2 - 128, 0)
            region = np.asarray(level0[y : y + 256, x : x + 256])
            coarsest = np.asarray(slide.levels[-1])
            slide.metadata()
        finally:
            slide.close()
        return "ok", f"{region.shape} {coarsest.shape}"
    except SlideError as exc:
        message = str(exc)
        if name not in message:
            return "error", f"SlideError without the file name: {message}"
        if "MemoryError" in message:
            return "error", f"ran out of memory: {message}"
        return "slide-error", message
    except BaseException as exc:  # what the fuzzer is looking for
        return "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-6)}"


def _serve(connection, memory_bytes: int) -> None:
    import resource

    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    import napari_feddp.slides  # noqa: F401 - import before the first case is timed

    connection.send("ready")
    while True:
        path = connection.recv()
        if path is None:
            return
        started = time.perf_counter()
        outcome, detail = check_file(path)
        connection.send((outcome, detail[:2000], time.perf_counter() - started))


class _Worker:
    def __init__(self, context, memory_bytes: int) -> None:
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, memory_bytes), daemon=True)
        self.process.start()
        child.close()
        self.connection.recv()  # "ready"
        self.case: tuple | None = None
        self.started = 0.0

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            with contextlib.suppress(OSError):
                self.connection.send(None)
        self.process.join(5)
        self.connection.close()


# ---------------------------------------------------------------- the run


def run_fuzz(seeds: list[Path] | None = None, *, cases: int = 200, seconds: float | None = None, seed: int = 0,
             first: int = 0, workers: int = 2, case_seconds: float = 20.0, memory_bytes: int = MEMORY_LIMIT_BYTES,
             keep: Path | None = None, progress=None) -> dict:
    """Run cases ``first .. first + cases - 1`` (fewer if ``seconds`` runs out) and return a summary.

    The summary holds ``cases`` (tried), ``failures`` (a list of dicts: case,
    seed file, mutation, outcome, detail), ``outcomes`` (counts per outcome),
    ``seconds`` and ``slowest_case_seconds``.
    """
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fuzz-slides-"))
    try:
        seeds = list(seeds) if seeds else default_seeds(work)
        originals = {path: path.read_bytes() for path in seeds}
        layouts = {path: read_layout(path) for path in seeds}
        context = multiprocessing.get_context("spawn")
        pool = [_Worker(context, memory_bytes) for _ in range(max(1, workers))]
        summary = {"cases": 0, "failures": [], "outcomes": {}, "seeds": [p.name for p in seeds], "seed": seed,
                   "slowest_case_seconds": 0.0}
        pending = iter(range(first, first + cases))
        out_of_time = False

        def record(case: tuple, outcome: str, detail: str, elapsed: float) -> None:
            number, seed_path, description, path = case
            summary["cases"] += 1
            summary["outcomes"][outcome] = summary["outcomes"].get(outcome, 0) + 1
            summary["slowest_case_seconds"] = max(summary["slowest_case_seconds"], elapsed)
            if outcome not in ("ok", "slide-error"):
                summary["failures"].append({"case": number, "seed_file": seed_path.name, "mutation": description,
                                            "outcome": outcome, "detail": detail, "seconds": round(elapsed, 2)})
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, keep / Path(path).name)
            Path(path).unlink(missing_ok=True)
            if progress is not None:
                progress(summary, number, outcome, description)

        def assign(worker: _Worker) -> bool:
            nonlocal out_of_time
            if seconds is not None and time.perf_counter() - started > seconds:
                out_of_time = True
                return False
            number = next(pending, None)
            if number is None:
                return False
            rng = random.Random(f"{seed}/{number}")
            seed_path = rng.choice(seeds)
            mutated, description = mutate(originals[seed_path], layouts[seed_path], rng)
            path = work / f"case{number}-{seed_path.name}"
            path.write_bytes(mutated)
            worker.case = (number, seed_path, description, str(path))
            worker.started = time.perf_counter()
            worker.connection.send(str(path))
            return True

        for worker in pool:
            assign(worker)
        while any(w.case for w in pool):
            busy = [w for w in pool if w.case]
            deadline = min(w.started for w in busy) + case_seconds
            ready = wait([w.connection for w in busy], timeout=max(deadline - time.perf_counter(), 0.01))
            for index, worker in enumerate(pool):
                if not worker.case:
                    continue
                elapsed = time.perf_counter() - worker.started
                if elapsed > case_seconds:
                    record(worker.case, "timeout", f"no answer within {case_seconds:g} s", elapsed)
                    worker.stop(kill=True)
                    pool[index] = worker = _Worker(context, memory_bytes)
                    assign(worker)
                elif worker.connection in ready:
                    try:
                        outcome, detail, took = worker.connection.recv()
                    except (EOFError, OSError):
                        worker.process.join(5)
                        code = worker.process.exitcode
                        record(worker.case, "crash", f"worker died (exit code {code})", elapsed)
                        worker.stop(kill=True)
                        pool[index] = worker = _Worker(context, memory_bytes)
                    else:
                        record(worker.case, outcome, detail, took)
                    worker.case = None
                    assign(worker)
        for worker in pool:
            worker.stop()
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary["stopped_by_time_budget"] = out_of_time
        summary["slowest_case_seconds"] = round(summary["slowest_case_seconds"], 2)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=int(os.environ.get("FUZZ_CASES", 500)))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", 0)))
    parser.add_argument("--first", type=int, default=0, help="number of the first case (to rerun one)")
    parser.add_argument("--seconds", type=float, default=None, help="stop starting cases after this long")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4))
    parser.add_argument("--case-seconds", type=float, default=20.0, help="a case running longer is a hang")
    parser.add_argument("--keep", type=Path, default=None, help="copy the files of failing cases here")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    def progress(summary, number, outcome, description):
        if outcome not in ("ok", "slide-error") or (not args.quiet and summary["cases"] % 100 == 0):
            print(f"[{summary['cases']}] case {number}: {outcome} ({description})", flush=True)

    summary = run_fuzz(cases=args.cases, seconds=args.seconds, seed=args.seed, first=args.first,
                       workers=args.workers, case_seconds=args.case_seconds, keep=args.keep, progress=progress)
    for failure in summary["failures"]:
        print(json.dumps(failure, indent=1))
    if summary["failures"]:
        print(f"rerun one: {Path(sys.argv[0]).name} --seed {args.seed} --first CASE --cases 1 --keep DIR")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"cases tried: {summary['cases']}, failures: {len(summary['failures'])}, "
          f"outcomes: {summary['outcomes']}, seconds: {summary['seconds']}, "
          f"slowest case: {summary['slowest_case_seconds']} s, seeds: {', '.join(summary['seeds'])}")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
