"""One label per nucleus over a whole segmentation, with measurements and a slide summary (no Qt).

:func:`nuclei_of` turns a finished run's class map (:func:`napari_feddp.inference.segment_slide`)
into a uint32 map with one id per nucleus, unique over the slide
(:func:`~napari_feddp.inference.instances.label_nuclei_tiled`), a table of measurements
(:data:`napari_feddp.measure.COLUMNS`) and a slide summary (:func:`napari_feddp.measure.summarise`),
window by window so that memory stays bounded whatever the slide's size.
:func:`segment_nuclei` runs the engine and these steps as one generator of
:class:`~napari_feddp.inference.Progress` (the form the Segment widget and the command line
consume); the engine's ``cancel`` also stops the nucleus steps between two windows.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from .inference import Progress, SegmentationResult
from .inference._output import create_output
from .inference._reader import as_slide, read_scaled
from .inference.engine import _cancel_check
from .inference.instances import contour_class_of, label_nuclei_tiled
from .measure import measure_nuclei_tiled, summarise
from .regions import PolygonRegion
from .slides._pyramid import lazy_pyramid

#: Window edge in label pixels for labelling and measuring nuclei (a window and its margin
#: are in memory at a time: about 15 MB at 1024). Smaller windows skip more glass; below
#: 1024 the margins cost more than that saves.
WINDOW = 1024
#: Seconds between two progress reports of a nucleus step.
PROGRESS_INTERVAL = 0.25
#: Largest side of the grid the tissue area is counted on (cells per side).
AREA_GRID_SIDE = 2048
#: Stages the nucleus steps report in :class:`~napari_feddp.inference.Progress`.
LABELLING, MEASURING = "labelling nuclei", "measuring nuclei"


@dataclass(eq=False)
class Nuclei:
    """Nucleus labels, measurements and summary of a segmentation result.

    Attributes
    ----------
    segmentation : SegmentationResult
        The run the nuclei come from (its ``labels`` are the class map).
    complete : bool
        False when the run or a nucleus step was cancelled: then nothing below is set.
    labels : zarr.Array or None
        ``(H, W)`` uint32 nucleus ids (0 background) on the class map's grid; on disk next to
        the class map's store when that is on disk.
    pyramid : list of dask.array.Array or None
        ``labels`` and lazily downsampled copies for display (nearest neighbour).
    table : dict of str to numpy.ndarray or None
        One row per nucleus, columns :data:`napari_feddp.measure.COLUMNS`, sorted by label;
        centroids in micrometres from the slide's top-left corner.
    summary : dict or None
        :func:`napari_feddp.measure.summarise` of ``table`` over :func:`tissue_area_um2`.
    path : Path or None
        Directory of the ``labels`` store when on disk.
    elapsed_seconds : float
        Time the nucleus steps took (the run's own is ``segmentation.elapsed_seconds``).
    """

    segmentation: SegmentationResult
    complete: bool
    labels: zarr.Array | None = None
    pyramid: list[da.Array] | None = None
    table: dict[str, np.ndarray] | None = None
    summary: dict | None = None
    path: Path | None = None
    elapsed_seconds: float = 0.0
    _tempdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        """Number of nuclei (0 for an incomplete result)."""
        return 0 if self.table is None else len(self.table["label"])

    def features(self):
        """The measurements as a napari ``Labels.features`` ``pandas.DataFrame``: column
        ``index`` holds the nucleus id (napari maps rows to labels through it)."""
        import pandas as pd

        if self.table is None:
            raise ValueError("features: expected a complete result, received a cancelled one")
        return pd.DataFrame({"index": self.table["label"], **{k: v for k, v in self.table.items() if k != "label"}})

    def layer_kwargs(self, units: str | None = None) -> dict:
        """Keyword arguments for ``viewer.add_labels(nuclei.pyramid, **kwargs)``: placement as
        :meth:`SegmentationResult.layer_kwargs`, the measurements as ``features``, the summary in ``metadata``."""
        kwargs = self.segmentation.layer_kwargs(units)
        kwargs["name"] = "nuclei"
        kwargs["features"] = self.features()
        kwargs["metadata"]["summary"] = dict(self.summary or {})
        return kwargs


def segment_nuclei(
    image: Any,
    loaded,
    *,
    region: tuple[int, int, int, int] | PolygonRegion | None = None,
    **engine_options,
) -> Generator[Progress, None, Nuclei]:
    """Segment ``image``, then label and measure its nuclei: one generator of progress.

    Parameters
    ----------
    image : Slide or array-like
        What the engine segments (and the nuclei are measured on).
    loaded : napari_feddp.segmentation.LoadedModel
    region : (y0, x0, y1, x1), PolygonRegion or None
        As :func:`napari_feddp.segmentation.run_segmentation`; a polygon also bounds the
        tissue area of the summary.
    **engine_options
        Passed to :func:`~napari_feddp.inference.segment_slide`; its ``cancel`` also stops
        the nucleus steps.

    Returns
    -------
    Nuclei
        ``complete=False`` when cancelled (the engine's partial class map is ``segmentation``).
    """
    from .segmentation import run_segmentation

    run = run_segmentation(image, loaded, region=region, **engine_options)  # checks the options now
    polygon = region if isinstance(region, PolygonRegion) else None
    return _run_then_nuclei(run, loaded.card.class_names, image, polygon, engine_options.get("cancel"))


def _run_then_nuclei(run, class_names, image, polygon, cancel) -> Generator[Progress, None, Nuclei]:
    result = yield from run
    if not result.complete:
        return Nuclei(segmentation=result, complete=False)
    return (yield from nuclei_of(result, class_names, image=image, region=polygon, cancel=cancel))


def nuclei_of(
    result: SegmentationResult,
    class_names=None,
    *,
    image: Any = None,
    region: PolygonRegion | None = None,
    window: int = WINDOW,
    cancel: Any = None,
) -> Generator[Progress, None, Nuclei]:
    """Label every nucleus of a finished run, measure each, and summarise the slide.

    Parameters
    ----------
    result : SegmentationResult
        A complete run with a pixel size (``result.mpp``).
    class_names : sequence of str, optional
        The model's class names (default ``result.class_names``): a ``"contour"`` class makes
        contours separate touching nuclei, else a distance watershed does.
    image : Slide or array-like, optional
        The image the run segmented, for the staining column (NaN without it).
    region : PolygonRegion, optional
        Polygons the run was limited to: the tissue area counts only their inside.
    window : int
        Window edge in label pixels.
    cancel : threading.Event or callable, optional
        Checked before every window; when set the steps stop with ``complete=False``.

    Yields
    ------
    Progress
        Stages :data:`LABELLING` then :data:`MEASURING`, counting windows.

    Raises
    ------
    ValueError
        If ``result`` is incomplete or has no pixel size, or ``window`` is not a positive integer.
    """
    if not result.complete:
        raise ValueError("nuclei: expected a complete segmentation, received a cancelled run's partial class map")
    if result.mpp is None:
        raise ValueError(
            "nuclei: expected a segmentation with a pixel size (µm per pixel), received one without: "
            "nucleus splitting and measurements are set in micrometres; give the slide's pixel size"
        )
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive integer number of label pixels, received {window!r}")
    names = class_names if class_names is not None else result.class_names
    return _nuclei_steps(result, names, image, region, window, _cancel_check(cancel))


def _nuclei_steps(result, names, image, region, window, is_cancelled) -> Generator[Progress, None, Nuclei]:
    from .segmentation import label_box

    start = time.perf_counter()
    mpp = math.sqrt(result.mpp[0] * result.mpp[1])  # the steps assume square pixels
    out = None  # next to the class map's store when that is on disk
    if result.path is not None:
        name = Path(result.path).name
        stem, suffix = (name[:-5], ".zarr") if name.endswith(".zarr") else (name, "")
        out = Path(result.path).with_name(f"{stem}-nuclei{suffix}")
    attributes = {
        "complete": False, "kind": "nuclei", "level": result.level, "downsample": list(result.downsample),
        "mpp": list(result.mpp), "region": list(result.region) if result.region else None,
    }
    labels, path, tempdir = create_output(
        out, result.labels.shape, result.labels.chunks, np.dtype(np.uint32), attributes, overwrite=True
    )
    # Only the run's rectangle can hold nuclei: the engine leaves the rest 0.
    height, width = result.labels.shape
    box = label_box(result, result.region) if result.region is not None else (0, 0, height, width)
    n_windows = math.ceil((box[2] - box[0]) / window) * math.ceil((box[3] - box[1]) / window)

    classes = _Box(result.labels, box, is_cancelled)
    written = yield from _step(lambda: label_nuclei_tiled(
        classes, mpp, out=_Box(labels, box), window=window, contour_class=contour_class_of(names),
    ), classes, n_windows, LABELLING)
    if written is None:
        return Nuclei(segmentation=result, complete=False, elapsed_seconds=time.perf_counter() - start)
    read_rgb = None
    if image is not None:  # the slide's RGB on the label grid, resampled as the engine read it
        level = as_slide(image).levels[result.level]
        scale = (int(level.shape[0]) / height, int(level.shape[1]) / width)

        def read_rgb(top: int, left: int, bottom: int, right: int) -> np.ndarray:
            return read_scaled(level, scale, top + box[0], left + box[1], bottom + box[0], right + box[1])

    # Centroids from the slide's top-left corner, a pixel's centre half a pixel in (as QuPath places them).
    origin = ((box[0] + 0.5) * mpp, (box[1] + 0.5) * mpp)
    nuclei = _Box(labels, box, is_cancelled)
    table = yield from _step(lambda: measure_nuclei_tiled(
        nuclei, mpp, read_rgb=read_rgb, origin_um=origin, window=window,
    ), nuclei, n_windows, MEASURING)
    if table is None:
        return Nuclei(segmentation=result, complete=False, elapsed_seconds=time.perf_counter() - start)
    labels.attrs["complete"] = True
    return Nuclei(
        segmentation=result,
        complete=True,
        labels=labels,
        pyramid=lazy_pyramid(da.from_zarr(labels), labels=True),
        table=table,
        summary=summarise(table, tissue_area_um2(result, region)),
        path=path,
        elapsed_seconds=time.perf_counter() - start,
        _tempdir=tempdir,
    )


def tissue_area_um2(result: SegmentationResult, region: PolygonRegion | None = None) -> float | None:
    """Area (µm²) the run looked for nuclei in: tissue, inside its region and polygons.

    The run's tissue mask (as detected, with its small safety margin; everything when it
    predicted every tile), inside ``result.region`` and, when given, ``region``'s polygons,
    counted on a grid of at most :data:`AREA_GRID_SIDE` cells a side over that rectangle and
    at most one label pixel a cell. None when the result has no pixel size.
    """
    if result.mpp is None:
        return None
    (dy, dx), (height, width) = result.downsample, result.labels.shape
    y0, x0, y1, x1 = result.region if result.region is not None else (0, 0, height * dy, width * dx)
    step = max((y1 - y0) / AREA_GRID_SIDE, (x1 - x0) / AREA_GRID_SIDE, min(dy, dx))  # level-0 px a cell
    rows, cols = max(math.ceil((y1 - y0) / step), 1), max(math.ceil((x1 - x0) / step), 1)
    cell = ((y1 - y0) / rows, (x1 - x0) / cols)
    inside = np.ones((rows, cols), bool)
    if result.tissue is not None:
        inside &= result.tissue.sample((rows, cols), cell, (y0, x0))
    if region is not None:
        inside &= region.mask((rows, cols), downsample=cell, origin=(y0 / cell[0], x0 / cell[1]))
    level0_mpp = (result.mpp[0] / dy, result.mpp[1] / dx)
    return float(inside.sum()) * cell[0] * cell[1] * level0_mpp[0] * level0_mpp[1]


def write_nuclei(nuclei: Nuclei, loaded, slide_name: str, *, labels=None, csv=None, geojson=None,
                 classes=None) -> dict[str, Any]:
    """Write the given outputs of a finished run, all or none.

    Parameters
    ----------
    nuclei : Nuclei
        The run's nuclei.
    loaded : LoadedModel
        The model that made them (class name and colour for the GeoJSON).
    slide_name : str
        Names the label images inside their OME metadata.
    labels, csv, geojson, classes : path, optional
        Nucleus ids (OME-TIFF), measurement table, one QuPath detection per nucleus,
        the model's class map (OME-TIFF); None skips one.

    Returns
    -------
    dict
        For each written output, what its writer returned (GeoJSON: the number of nuclei).
    """
    from .export import write_nuclei_geojson, write_ome_labels
    from .measure import write_csv
    from .segmentation import write_together

    result, mpp = nuclei.segmentation, nuclei.segmentation.mpp
    names, colors = loaded.card.class_names, loaded.class_colors
    writers = {
        "labels": lambda path: write_ome_labels(path, nuclei.labels, mpp=mpp, name=f"{slide_name} nuclei"),
        "csv": lambda path: write_csv(nuclei.table, path),
        "geojson": lambda path: write_nuclei_geojson(
            path, nuclei.labels, table=nuclei.table,
            class_name=str(names[1]) if len(names) > 1 else "nucleus",
            class_color=colors[1] if len(colors) > 1 else None, downsample=result.downsample,
        )[1],
        "classes": lambda path: write_ome_labels(path, result.labels, mpp=mpp, name=f"{slide_name} classes"),
    }
    paths = {"labels": labels, "csv": csv, "geojson": geojson, "classes": classes}
    chosen = [kind for kind in writers if paths[kind] is not None]
    # All files or none: a label map without its table (or the reverse) looks complete but is not.
    values = write_together([(Path(paths[kind]), writers[kind]) for kind in chosen])
    return dict(zip(chosen, values))


def describe_summary(summary: dict) -> str:
    """One line for people: count, density per mm² of tissue and median area.

    Examples
    --------
    ``"7,830 nuclei in 1.62 mm² of tissue (4,833 per mm²); median area 24.6 µm² (10-90 %: 9.2-48.1 µm²)"``
    """
    count, tissue = summary["nuclei"], summary.get("tissue_area_mm2")
    where = f" in {tissue:.3g} mm² of tissue" if tissue else ""
    if not count:
        return f"no nuclei found{where}"
    text = f"{count:,} nuclei{where}"
    if summary.get("density_per_mm2") is not None:
        text += f" ({summary['density_per_mm2']:,.0f} per mm²)"
    return (f"{text}; median area {summary['area_um2_median']:.1f} µm² "
            f"(10-90 %: {summary['area_um2_p10']:.1f}-{summary['area_um2_p90']:.1f} µm²)")


class _Cancelled(Exception):
    """Raised inside a step's window loop when the run is cancelled."""


class _Box:
    """The ``(y0, x0, y1, x1)`` part of a 2-D array, read and written with slices relative to it.

    With ``is_cancelled``, every read is one window of a tiled step: it is counted (for
    progress) and first checks whether the run was cancelled or the step stopped, so a step
    ends between two windows.
    """

    def __init__(self, array, box: tuple[int, int, int, int], is_cancelled: Callable[[], bool] | None = None):
        self.array = array
        self.origin = (int(box[0]), int(box[1]))
        self.shape = (int(box[2]) - int(box[0]), int(box[3]) - int(box[1]))
        self.dtype = array.dtype
        self.count = 0
        self.stopped = False
        self._is_cancelled = is_cancelled

    def _outer(self, key) -> tuple[slice, slice]:
        rows, cols = key
        (y, x), (height, width) = self.origin, self.shape
        return (slice(y + (rows.start or 0), y + (height if rows.stop is None else rows.stop)),
                slice(x + (cols.start or 0), x + (width if cols.stop is None else cols.stop)))

    def __getitem__(self, key):
        if self._is_cancelled is not None:
            if self.stopped or self._is_cancelled():
                raise _Cancelled
            self.count += 1
        return self.array[self._outer(key)]

    def __setitem__(self, key, value) -> None:
        self.array[self._outer(key)] = value


def _step(function: Callable[[], Any], reads: _Box, total: int, stage: str) -> Generator[Progress, None, Any]:
    """Run ``function`` on a worker thread, reporting ``reads.count`` of ``total`` windows.

    Returns what ``function`` returned, or None when it was cancelled. When the generator is
    closed early (its consumer went away) the step stops at the next window, so no thread
    outlives it.
    """
    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feddp-nuclei")
    try:
        future = pool.submit(function)
        yield Progress(0, total, 0.0, None, stage, unit="windows")
        while not wait([future], timeout=PROGRESS_INTERVAL).done:
            done = min(reads.count, total)
            elapsed = time.perf_counter() - start
            yield Progress(done, total, elapsed, elapsed / done * (total - done) if done else None, stage,
                           unit="windows")
        try:
            value = future.result()
        except _Cancelled:
            yield Progress(min(reads.count, total), total, time.perf_counter() - start, None, "cancelled",
                           unit="windows")
            return None
        yield Progress(total, total, time.perf_counter() - start, 0.0, stage, unit="windows")
        return value
    finally:
        reads.stopped = True
        pool.shutdown(wait=True)
