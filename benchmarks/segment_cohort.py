"""Benchmark: slides per hour, ``napari-feddp segment-cohort`` against a shell loop of ``segment``.

Run from the repository root (the defaults take about an hour on 2 cores)::

    .venv/bin/python benchmarks/segment_cohort.py
    .venv/bin/python benchmarks/segment_cohort.py --small 4 --large 0 --out /tmp/segment_cohort.json

Writes ``benchmarks/results/segment_cohort.json`` (``--out`` to change).

Two sets of slides, each segmented three ways with the same model (the bundled
one unless ``--model``) and the same outputs (nucleus labels OME-TIFF,
measurement CSV, GeoJSON):

* **loop** — one ``napari-feddp segment SLIDE --out ... --geojson ...`` process
  per slide, one after the other, as a shell ``for`` loop runs them;
* **cohort, 1 worker** and **cohort, 2 workers** —
  ``napari-feddp segment-cohort SLIDES... --workers N`` on a fresh local
  Dask cluster (its start-up is part of the time).

Slides:

* **small** (``--small``, default 20): copies of the bundled CMU-1-Small-Region
  sample (2,220 x 2,967 px, about 0.64 mm² of tissue): per-slide costs outside
  the model (process start, imports, model loading, opening, writing) matter;
* **large** (``--large``, default 4; ``--large-side``, default 6,000 px): square
  pyramidal JPEG TIFFs tiled with real CMU-1 tissue everywhere
  (``_synthetic.pyramidal_jpeg_tiff``), so the model's compute dominates. An
  even number keeps both workers busy to the end.

Reported per set: wall seconds and slides per hour of each way, and
``speedup`` = slides per hour of the cohort with 2 workers over the loop's
(``speedup_small_slides``, ``speedup_large_slides`` at the top level), plus
whether every slide got the same nucleus count each way. Each run writes into
a fresh folder; the slide files are cached under ``$FEDDP_BENCH_CACHE`` (or
``~/.cache/napari-feddp/benchmarks``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))

import _synthetic  # noqa: E402

TARGETS = {"speedup_small_slides": ">= 1.7", "speedup_large_slides": ">= 0.95 (no slower than the loop)"}


def _cli() -> list[str]:
    """The ``napari-feddp`` command of this environment."""
    script = Path(sys.executable).with_name("napari-feddp")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "napari_feddp.cli"]


def small_slides(folder: Path, count: int) -> list[Path]:
    """``count`` copies of the bundled sample, each its own file."""
    sample = ROOT / "src" / "napari_feddp" / "data" / "CMU-1-Small-Region.svs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"small-{index:03d}.svs"
        if not path.is_file():
            shutil.copyfile(sample, path)
        paths.append(path)
    return paths


def large_slides(folder: Path, count: int, side: int) -> list[Path]:
    """``count`` names for one cached ``side`` x ``side`` slide of real tissue (symbolic links)."""
    source = _synthetic.pyramidal_jpeg_tiff(side)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"large-{side}-{index:03d}.tif"
        if not path.exists():
            path.symlink_to(source)
        paths.append(path)
    return paths


def _run(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds


def run_loop(slides: list[Path], out: Path, model: str) -> tuple[float, dict[str, int]]:
    """One ``segment`` process per slide, in turn; returns the wall seconds and nuclei per slide."""
    start = time.perf_counter()
    for slide in slides:
        folder = out / slide.stem
        folder.mkdir(parents=True)
        _run([*_cli(), "segment", str(slide), "--out", str(folder / f"{slide.stem}.ome.tif"),
              "--geojson", str(folder / f"{slide.stem}.geojson"), "--model", model, "--quiet"])
    seconds = time.perf_counter() - start
    counts = {}
    for slide in slides:
        with open(out / slide.stem / f"{slide.stem}.csv", newline="") as handle:
            counts[slide.name] = sum(1 for _ in csv.DictReader(handle))
    return seconds, counts


def run_cohort(slides: list[Path], out: Path, model: str, workers: int) -> tuple[float, dict[str, int]]:
    """``segment-cohort`` with ``workers`` local workers; returns the wall seconds and nuclei per slide."""
    seconds = _run([*_cli(), "segment-cohort", *map(str, slides), "--out-dir", str(out), "--workers", str(workers),
                    "--model", model, "--quiet"])
    with open(out / "cohort.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if any(row["status"] != "done" for row in rows):
        raise RuntimeError(f"segment-cohort did not segment every slide: {rows}")
    return seconds, {Path(row["slide"]).name: int(row["nuclei"]) for row in rows}


def measure(name: str, slides: list[Path], work: Path, model: str) -> dict:
    """The three ways over ``slides``."""
    def per_hour(seconds: float) -> float:
        return len(slides) * 3600 / seconds

    print(f"{name}: {len(slides)} slides", file=sys.stderr, flush=True)
    ways, counts = {}, {}
    for way, run in (("loop", lambda out: run_loop(slides, out, model)),
                     ("cohort_1_worker", lambda out: run_cohort(slides, out, model, 1)),
                     ("cohort_2_workers", lambda out: run_cohort(slides, out, model, 2))):
        out = work / f"{name}-{way}"
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        seconds, counts[way] = run(out)
        ways[way] = {"seconds": round(seconds, 2), "slides_per_hour": round(per_hour(seconds), 1),
                     "load_average_before": load}
        print(f"  {way}: {seconds:.1f} s, {per_hour(seconds):.1f} slides/h", file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return {
        "slides": len(slides),
        "slide_shape": _shape(slides[0]),
        **ways,
        "speedup": round(ways["cohort_2_workers"]["slides_per_hour"] / ways["loop"]["slides_per_hour"], 3),
        "speedup_1_worker": round(ways["cohort_1_worker"]["slides_per_hour"] / ways["loop"]["slides_per_hour"], 3),
        "same_nuclei_counts": counts["loop"] == counts["cohort_1_worker"] == counts["cohort_2_workers"],
        "nuclei_per_slide": counts["loop"],
    }


def _shape(path: Path) -> list[int]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return list(tif.series[0].levels[0].shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20, help="number of slides of the sample's size (0: none)")
    parser.add_argument("--large", type=int, default=4, help="number of large slides (0: none)")
    parser.add_argument("--large-side", type=int, default=6000, help="side of the large slides in pixels")
    parser.add_argument("--model", default="bundled", help="checkpoint both ways use (default: the bundled model)")
    parser.add_argument("--work", type=Path, help="folder for slides and outputs (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "segment_cohort.json")
    args = parser.parse_args()
    if args.small < 1 and args.large < 1:
        parser.error("expected --small or --large to be at least 1")

    import torch

    from napari_feddp.cohort import model_ref

    model = model_ref(args.model)
    work = args.work or Path(tempfile.mkdtemp(prefix="segment-cohort-bench-"))
    slides_dir = _synthetic.cache_dir() / "segment-cohort"
    report: dict = {
        "benchmark": "segment_cohort",
        "command": " ".join(["python benchmarks/segment_cohort.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available()},
        "model": {"name": model.name, "sha256": model.sha256},
        "outputs": "nucleus labels OME-TIFF, measurement CSV, GeoJSON per slide",
        "speedup_small_slides": None,
        "speedup_large_slides": None,
    }
    try:
        if args.small:
            slides = small_slides(slides_dir / "small", args.small)
            _run([*_cli(), "segment", str(slides[0]), "--out", str(work / "warm-up.ome.tif"),
                  "--model", model.path, "--quiet"])  # files and imports in the page cache for every way
            report["small_slides"] = measure("small", slides, work, model.path)
            report["speedup_small_slides"] = report["small_slides"]["speedup"]
        if args.large:
            slides = large_slides(slides_dir / "large", args.large, args.large_side)
            report["large_slides"] = measure("large", slides, work, model.path)
            report["speedup_large_slides"] = report["large_slides"]["speedup"]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["targets"] = TARGETS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("speedup_small_slides", "speedup_large_slides")}, indent=2))


if __name__ == "__main__":
    main()
