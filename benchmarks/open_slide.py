"""Benchmark: opening whole-slide images lazily, and region reads vs OpenSlide.

Run from the repository root (``--quick`` for a smoke run: no 100k slide,
fewer reads and repeats)::

    .venv/bin/python benchmarks/open_slide.py
    .venv/bin/python benchmarks/open_slide.py --quick

Writes ``benchmarks/results/open_slide.json`` (``--out`` to change; a
``--quick`` run writes into the cache folder instead) and prints a summary. Synthetic slides are built once and cached outside the repository
(``$FEDDP_BENCH_CACHE`` or ``~/.cache/napari-feddp/benchmarks``, about 4.2 GB
with the 100k slide); see ``benchmarks/_synthetic.py``.

What is measured (see ``docs/benchmarks.md`` for the method in full):

* ``open_seconds_20k`` / ``open_seconds_100k``: from calling
  ``open_slide(path)`` until its ``levels`` (the napari layer data) are ready
  **and** one 1024 x 1024 view of the coarsest level has been read. Median of
  ``--repeats`` fresh subprocesses, the slide's pages evicted from the OS page
  cache first (``posix_fadvise(DONTNEED)`` on that file only), so the TIFF
  directory is read from disk as on a first open. Reported too: the same with
  the file in the page cache (``_warm``), and the whole napari plugin path
  (``napari_get_reader(path)`` then the reader it returns, what napari runs on
  File > Open; for a generic ``.tif`` it opens the file twice).
* ``rss_mb_100k``: peak resident memory of that subprocess during the open +
  view read, minus its resident memory just before (MB = 10**6 bytes). The
  peak is the kernel's VmHWM, reset just before the measurement.
* ``tifffile.imread`` of level 0 of the 20k slide (what napari-tiff style
  readers do): time, peak RSS increase, and their ratios to ours.
* ``region_read_ratio_vs_openslide``: mean time of ``--reads`` random
  512 x 512 level-0 reads through our layer's arrays divided by the same reads
  through OpenSlide, on CMU-1-Small-Region.svs (JPEG) and on a lossless JPEG
  2000 Aperio-style copy of it. Both readers are opened fresh for every round
  with their default caches (OpenSlide: 32 MiB; ours: ``TILE_CACHE_BYTES``),
  read the same seeded coordinates, in alternating order; the file is in the
  OS page cache for both. The pixels of every read are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MB = 1e6
VIEW = 1024
REGION = 512


# --------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak resident set size of this process from ``start()`` on.

    Uses the kernel's high-water mark (VmHWM), reset by writing 5 to
    /proc/self/clear_refs; where that is unavailable, a thread samples RSS
    every millisecond.
    """

    def start(self) -> None:
        self._thread = None
        self.kernel = False
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.kernel = self._vmhwm() is not None
        except OSError:
            self.kernel = False
        if not self.kernel:
            import threading

            self._peak = _rss_bytes()
            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.wait(0.001):
                    self._peak = max(self._peak, _rss_bytes())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()

    @staticmethod
    def _vmhwm() -> int | None:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def stop(self) -> int:
        if self.kernel:
            return max(self._vmhwm() or 0, _rss_bytes())
        self._stop.set()
        self._thread.join()
        return max(self._peak, _rss_bytes())


def evict_from_page_cache(path: Path) -> None:
    """Drop ``path``'s pages from the OS cache (that file only, no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def load_into_page_cache(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


# --------------------------------------------------------------------------- workers (subprocesses)


def worker_open(path: str, cold: bool, via: str = "open_slide") -> dict:
    """Open, get the layer data, read one 1024x1024 view of the coarsest level.

    ``via="open_slide"``: ``open_slide(path).levels`` (the napari layer data).
    ``via="napari"``: the plugin's ``napari_get_reader(path)`` then the reader it
    returns, i.e. everything napari runs on File > Open.
    """
    import numpy as np

    from napari_feddp._reader import napari_get_reader
    from napari_feddp.slides import open_slide

    if cold:
        evict_from_page_cache(Path(path))
    peak = PeakRSS()
    before = _rss_bytes()
    peak.start()
    t0 = time.perf_counter()
    if via == "napari":
        layers = napari_get_reader(path)(path)
        data = layers[0][0]
        levels = data if isinstance(data, list) else [data]
    else:
        levels = open_slide(path).levels
    t1 = time.perf_counter()
    coarsest = levels[-1]
    h, w = coarsest.shape[:2]
    y, x = max(0, (h - VIEW) // 2), max(0, (w - VIEW) // 2)
    view = np.asarray(coarsest[y : y + VIEW, x : x + VIEW])
    t2 = time.perf_counter()
    high = peak.stop()
    assert view.shape[:2] == (min(VIEW, h), min(VIEW, w)) and view.dtype == np.uint8
    return {
        "seconds": t2 - t0,
        "layer_data_seconds": t1 - t0,
        "view_seconds": t2 - t1,
        "rss_mb": (high - before) / MB,
        "levels": [list(lv.shape) for lv in levels],
        "peak_method": "VmHWM" if peak.kernel else "sampling",
    }


def worker_imread(path: str, cold: bool) -> dict:
    """The generic alternative: decode all of level 0 with tifffile.imread."""
    import tifffile

    if cold:
        evict_from_page_cache(Path(path))
    peak = PeakRSS()
    before = _rss_bytes()
    peak.start()
    t0 = time.perf_counter()
    image = tifffile.imread(path)
    t1 = time.perf_counter()
    high = peak.stop()
    return {"seconds": t1 - t0, "rss_mb": (high - before) / MB, "shape": list(image.shape)}


def worker_regions(path: str, reads: int, rounds: int, seed: int) -> dict:
    """Mean time of random 512x512 level-0 reads: our layer's arrays vs OpenSlide."""
    import numpy as np
    import openslide

    from napari_feddp._reader import slide_layer_data
    from napari_feddp.slides import _open, open_slide

    load_into_page_cache(Path(path))
    with openslide.OpenSlide(path) as probe:
        width, height = probe.dimensions
    default_cache = _open.TILE_CACHE_BYTES

    def coords(round_index: int):
        rng = np.random.default_rng(seed + round_index)
        ys = rng.integers(0, height - REGION + 1, reads)
        xs = rng.integers(0, width - REGION + 1, reads)
        return list(zip(ys.tolist(), xs.tolist()))

    def ours(points, cached: bool):
        _open.TILE_CACHE_BYTES = default_cache if cached else 0
        try:
            slide = open_slide(path)
        finally:
            _open.TILE_CACHE_BYTES = default_cache
        data = slide_layer_data(slide)[0]  # exactly what napari gets
        level0 = data[0] if isinstance(data, list) else data
        times, out = [], []
        for y, x in points:
            t = time.perf_counter()
            a = np.asarray(level0[y : y + REGION, x : x + REGION])
            times.append(time.perf_counter() - t)
            out.append(a)
        slide.close()
        return times, out

    def theirs(points, cached: bool):
        slide = openslide.OpenSlide(path)
        if not cached:
            slide.set_cache(openslide.OpenSlideCache(0))
        times, out = [], []
        for y, x in points:
            t = time.perf_counter()
            a = np.asarray(slide.read_region((x, y), 0, (REGION, REGION)))[..., :3]
            times.append(time.perf_counter() - t)
            out.append(a)
        slide.close()
        return times, out

    result: dict = {"path": path, "shape": [height, width], "reads": reads, "rounds": rounds}
    max_diff = 0
    for label, cached in (("default_cache", True), ("no_cache", False)):
        per_round = []
        for r in range(rounds):
            points = coords(r)
            order = [("ours", ours), ("openslide", theirs)]
            if r % 2:
                order.reverse()
            means, outs = {}, {}
            for name, fn in order:
                times, outs[name] = fn(points, cached)
                means[name] = statistics.fmean(times)
            for a, b in zip(outs["ours"], outs["openslide"]):
                max_diff = max(max_diff, int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()))
            del outs
            per_round.append(means)
        ours_ms = statistics.median(m["ours"] for m in per_round) * 1e3
        theirs_ms = statistics.median(m["openslide"] for m in per_round) * 1e3
        ratios = [m["ours"] / m["openslide"] for m in per_round]
        result[label] = {
            "ours_ms": ours_ms,
            "openslide_ms": theirs_ms,
            # Each round is one complete measurement (same coordinates, readers
            # run back to back): the median of the rounds' ratios is robust to
            # the machine's load changing between rounds.
            "ratio": statistics.median(ratios),
            "per_round_ratio": ratios,
        }
    result["max_abs_pixel_diff"] = max_diff
    result["pixels_identical"] = max_diff == 0
    return result


def run_worker(args: list[str], timeout: float = 1800) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- driver


def machine_info() -> dict:
    import dask
    import imagecodecs
    import numpy
    import openslide
    import psutil
    import tifffile
    import zarr

    import napari_feddp

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "napari_feddp": getattr(napari_feddp, "__version__", "?"),
            "tifffile": tifffile.__version__,
            "zarr": zarr.__version__,
            "dask": dask.__version__,
            "numpy": numpy.__version__,
            "imagecodecs": imagecodecs.__version__,
            "openslide-python": openslide.__version__,
            "openslide (library)": openslide.__library_version__,
        },
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def measure_opens(paths: dict[str, Path], repeats: int) -> dict[str, dict]:
    """Cold, warm and napari-reader opens of every slide, each in a fresh subprocess.

    Runs are interleaved (20k, 100k, 20k, 100k, ...) so that a change in the
    machine's load during the benchmark hits both sizes alike. Medians.
    """
    modes = (("cold", "cold", "open_slide"), ("warm", "warm", "open_slide"), ("napari_cold", "cold", "napari"))
    runs = {name: {mode: [] for mode, _, _ in modes} for name in paths}
    for _ in range(repeats):
        for mode, cache, via in modes:
            for name, path in paths.items():
                runs[name][mode].append(run_worker(["open", str(path), cache, via]))

    summaries = {}
    for name, path in paths.items():
        r = runs[name]

        def med(mode: str, key: str) -> float:
            return statistics.median(x[key] for x in r[mode])  # noqa: B023

        summaries[name] = {
            "path": str(path),
            "levels": r["cold"][0]["levels"],
            "cold_seconds": med("cold", "seconds"),
            "cold_layer_data_seconds": med("cold", "layer_data_seconds"),
            "cold_view_seconds": med("cold", "view_seconds"),
            "warm_seconds": med("warm", "seconds"),
            "warm_layer_data_seconds": med("warm", "layer_data_seconds"),
            "warm_view_seconds": med("warm", "view_seconds"),
            "napari_reader_cold_seconds": med("napari_cold", "seconds"),
            "rss_mb": med("cold", "rss_mb"),
            "rss_mb_max": max(x["rss_mb"] for x in r["cold"] + r["warm"]),
            "napari_reader_rss_mb": med("napari_cold", "rss_mb"),
            "all_seconds": {m: [round(x["seconds"], 4) for x in v] for m, v in r.items()},
            "peak_method": r["cold"][0]["peak_method"],
        }
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: skip 100k, fewer reads/repeats")
    parser.add_argument("--repeats", type=int, help="subprocess runs per open measurement (default 7, quick 2)")
    parser.add_argument("--reads", type=int, help="random region reads per round (default 100, quick 20)")
    parser.add_argument("--rounds", type=int, help="rounds of region reads, order alternating (default 7, quick 2)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument(
        "--out", type=Path, help="JSON output (default benchmarks/results/open_slide.json; --quick: in the cache folder)"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, *rest = args.worker
        if kind == "open":
            result = worker_open(rest[0], rest[1] == "cold", rest[2])
        elif kind == "imread":
            result = worker_imread(rest[0], rest[1] == "cold")
        elif kind == "regions":
            result = worker_regions(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        else:
            raise SystemExit(f"unknown worker {kind}")
        print(json.dumps(result))
        return 0

    import _synthetic

    repeats = args.repeats or (2 if args.quick else 7)
    reads = args.reads or (20 if args.quick else 100)
    rounds = args.rounds or (2 if args.quick else 7)
    # A smoke run must not overwrite the committed results.
    if args.out:
        out = args.out
    elif args.quick:
        out = _synthetic.cache_dir() / "open_slide.quick.json"
    else:
        out = HERE / "results" / "open_slide.json"
    started = time.time()
    load_before = os.getloadavg()

    print("preparing slides (cached after the first run) ...", flush=True)
    cmu1 = _synthetic.cmu1_path()
    jp2k = _synthetic.jpeg2000_svs()
    slide20 = _synthetic.pyramidal_jpeg_tiff(20_000)
    slide100 = None if args.quick else _synthetic.pyramidal_jpeg_tiff(100_000)

    print(f"open + 1024x1024 coarsest view, {repeats} subprocesses each, cold and warm ...", flush=True)
    opens = measure_opens({"20k": slide20, **({"100k": slide100} if slide100 else {})}, repeats)
    open20, open100 = opens["20k"], opens.get("100k")

    print("tifffile.imread of level 0 (20k) ...", flush=True)
    imread = run_worker(["imread", str(slide20), "cold"])

    print(f"region reads: {rounds} rounds x {reads} reads of {REGION}x{REGION}, ours vs OpenSlide ...", flush=True)
    regions = {
        "jpeg": run_worker(["regions", str(cmu1), str(reads), str(rounds), str(args.seed)]),
        "jpeg2000": run_worker(["regions", str(jp2k), str(reads), str(rounds), str(args.seed)]),
    }

    result: dict = {
        "benchmark": "open_slide",
        "command": "python benchmarks/open_slide.py" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "open_seconds_20k": open20["cold_seconds"],
        "open_seconds_100k": open100["cold_seconds"] if open100 else None,
        "open_ratio_100k_vs_20k": (open100["cold_seconds"] / open20["cold_seconds"]) if open100 else None,
        "rss_mb_20k": open20["rss_mb"],
        "rss_mb_100k": open100["rss_mb"] if open100 else None,
        "open_seconds_20k_warm": open20["warm_seconds"],
        "open_seconds_100k_warm": open100["warm_seconds"] if open100 else None,
        "open_ratio_100k_vs_20k_warm": (open100["warm_seconds"] / open20["warm_seconds"]) if open100 else None,
        "napari_reader_seconds_20k": open20["napari_reader_cold_seconds"],
        "napari_reader_seconds_100k": open100["napari_reader_cold_seconds"] if open100 else None,
        "imread_seconds_20k": imread["seconds"],
        "imread_rss_mb_20k": imread["rss_mb"],
        "imread_time_ratio_20k": imread["seconds"] / open20["cold_seconds"],
        "imread_rss_ratio_20k": imread["rss_mb"] / open20["rss_mb"],
        "region_read_ratio_vs_openslide": {k: v["default_cache"]["ratio"] for k, v in regions.items()},
        "region_read_ratio_vs_openslide_no_cache": {k: v["no_cache"]["ratio"] for k, v in regions.items()},
        "region_read_pixels_identical": {k: v["pixels_identical"] for k, v in regions.items()},
        "region_read_max_abs_pixel_diff": {k: v["max_abs_pixel_diff"] for k, v in regions.items()},
        "details": {"open_20k": open20, "open_100k": open100, "imread_20k": imread, "regions": regions},
        "machine": machine_info(),
        "wall_seconds": None,
    }
    targets = {
        "open_seconds_100k < 1.0": None if not open100 else result["open_seconds_100k"] < 1.0,
        "rss_mb_100k < 300": None if not open100 else result["rss_mb_100k"] < 300,
        "open_seconds_100k / open_seconds_20k < 1.5": None if not open100 else result["open_ratio_100k_vs_20k"] < 1.5,
        "region_read_ratio_vs_openslide (jpeg) <= 1.0": result["region_read_ratio_vs_openslide"]["jpeg"] <= 1.0,
        "region_read_ratio_vs_openslide (jpeg2000) <= 1.0": result["region_read_ratio_vs_openslide"]["jpeg2000"] <= 1.0,
        "pixels identical (jpeg, jpeg2000)": all(result["region_read_pixels_identical"].values()),
    }
    result["targets_met"] = targets
    result["wall_seconds"] = round(time.time() - started, 1)
    # Other work on the machine skews timings: record how busy it was.
    result["machine"]["load_average_1_5_15_before"] = [round(v, 2) for v in load_before]
    result["machine"]["load_average_1_5_15_after"] = [round(v, 2) for v in os.getloadavg()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print_summary(result, open20, open100, imread, regions)
    print(f"\nwrote {out}")
    return 0


def print_summary(result, open20, open100, imread, regions) -> None:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    print("\nopen_slide -> levels ready + 1024x1024 coarsest view (median; cold = file evicted from page cache)")
    print(f"{'slide':<8}{'cold s':>10}{'warm s':>10}{'peak RSS +MB':>14}{'napari reader s':>17}")
    for name, o in (("20k", open20), ("100k", open100)):
        if o:
            print(f"{name:<8}{o['cold_seconds']:>10.3f}{o['warm_seconds']:>10.3f}{o['rss_mb']:>14.1f}"
                  f"{o['napari_reader_cold_seconds']:>17.3f}")
    print(f"ratio 100k/20k: cold {f(result['open_ratio_100k_vs_20k'], '{:.2f}')}, "
          f"warm {f(result['open_ratio_100k_vs_20k_warm'], '{:.2f}')}")
    print("\n20k slide, side by side")
    print(f"{'reader':<34}{'seconds':>10}{'peak RSS +MB':>14}")
    print(f"{'napari-feddp (lazy pyramid)':<34}{open20['cold_seconds']:>10.3f}{open20['rss_mb']:>14.1f}")
    print(f"{'tifffile.imread (level 0)':<34}{imread['seconds']:>10.3f}{imread['rss_mb']:>14.1f}")
    print(f"{'ratio imread / ours':<34}{result['imread_time_ratio_20k']:>10.1f}{result['imread_rss_ratio_20k']:>14.1f}")
    print(f"\nrandom {REGION}x{REGION} level-0 reads, mean ms per read and ratio ours/OpenSlide (medians of rounds)")
    print(f"{'slide':<10}{'caches':<15}{'ours':>8}{'OpenSlide':>11}{'ratio':>8}{'identical':>11}")
    for name, r in regions.items():
        for label in ("default_cache", "no_cache"):
            m = r[label]
            print(f"{name:<10}{label:<15}{m['ours_ms']:>8.2f}{m['openslide_ms']:>11.2f}{m['ratio']:>8.2f}"
                  f"{r['pixels_identical']!s:>11}")
    print("\ntargets")
    for k, v in result["targets_met"].items():
        print(f"  {'-' if v is None else ('PASS' if v else 'MISS')}  {k}")


if __name__ == "__main__":
    sys.exit(main())
