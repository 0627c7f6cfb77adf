"""Segment a cohort of slides on a Dask cluster: one task per slide, resumable (no Qt).

Each slide is one :mod:`dask.distributed` task that runs the same steps as
``napari-feddp segment`` (:func:`~napari_feddp.segmentation.open_image`,
:func:`~napari_feddp.nuclei.segment_nuclei`, the label, table and GeoJSON
writers) and writes into its own folder ``OUT/<slide stem>/``:

* ``<stem>.ome.tif`` — one label per nucleus (pyramidal OME-TIFF);
* ``<stem>.csv`` — one row per nucleus (:data:`napari_feddp.measure.COLUMNS`);
* ``<stem>.geojson`` — one QuPath detection per nucleus, with its measurements;
* ``done.json`` — the done-marker: model sha256, settings, the slide's size and
  modification time, the outputs' sizes and the slide's summary. It is written
  last and atomically, so its presence means the outputs are complete.

A slide whose marker matches the run (same model file, same settings, same
slide file, outputs present with the recorded sizes) is skipped; anything else
in its folder is replaced. The outputs appear all together or not at all, so
a run that is killed leaves each slide either complete or without a marker, and
the next run continues from there. A slide that fails (unreadable, corrupt,
no tissue) fails alone: its error goes into ``OUT/cohort.csv``, one row per
slide (:data:`COLUMNS`), rewritten atomically after every slide.

Workers load the model once per process (a cache keyed by the weights'
sha256) and share the machine's cores between them: each worker's PyTorch
uses ``cores / workers on its host`` threads, and on a host with several GPUs
the workers are spread over them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._atomic import write_atomic

#: Name of the per-slide done-marker.
MARKER = "done.json"
#: Name of the cohort table in the output folder.
COHORT_CSV = "cohort.csv"
#: Folder inside a slide's folder for the run's intermediate label stores.
WORK = ".work"
#: Columns of ``cohort.csv``.
COLUMNS = ("slide", "status", "nuclei", "density_per_mm2", "tissue_area_mm2", "model", "model_sha256",
           "seconds", "error")
#: Statuses in ``cohort.csv``.
DONE, SKIPPED, FAILED = "done", "skipped", "failed"
#: Memory one worker is given room for when the worker count is chosen (a
#: worker holds the model, a batch of tiles and a window of labels; the sample
#: slide peaks at about 0.6 GiB, large slides stay on disk).
WORKER_MEMORY = 2 * 2**30
#: File endings a slide's stem is taken without (longest first).
_DOUBLE_SUFFIXES = (".ome.tiff", ".ome.tif")

logger = logging.getLogger(__name__)


class CohortError(ValueError):
    """The cohort cannot be run as given (no slides, a bad manifest, two slides with one stem)."""


# --------------------------------------------------------------------------- what to run


@dataclass(frozen=True)
class SlideJob:
    """One slide of a cohort.

    Attributes
    ----------
    slide : str
        Absolute path of the slide file.
    out_dir : str
        Its output folder, ``OUT/<stem>``.
    mpp : float or None
        µm per level-0 pixel overriding the file's (``--mpp``, or the manifest's ``mpp`` column).
    """

    slide: str
    out_dir: str
    mpp: float | None = None

    @property
    def stem(self) -> str:
        return Path(self.out_dir).name

    def outputs(self) -> dict[str, Path]:
        """Output kind -> path: ``labels``, ``csv``, ``geojson``."""
        folder = Path(self.out_dir)
        return {"labels": folder / f"{self.stem}.ome.tif", "csv": folder / f"{self.stem}.csv",
                "geojson": folder / f"{self.stem}.geojson"}


@dataclass(frozen=True)
class Settings:
    """Run settings shared by every slide; those in :attr:`RESULT_FIELDS` change the outputs."""

    all_tiles: bool = False
    overlap: float = 0.25
    batch_size: int = 8
    device: str = "auto"

    #: Settings a finished slide must have been made with to be skipped.
    RESULT_FIELDS = ("all_tiles", "overlap")

    def result_settings(self, mpp: float | None) -> dict:
        values = {name: getattr(self, name) for name in self.RESULT_FIELDS}
        values["mpp"] = mpp
        return values


@dataclass(frozen=True)
class ModelRef:
    """The checkpoint every worker loads: its path (reachable from the workers), card name and sha256."""

    path: str
    name: str
    sha256: str


def slide_stem(path: str | os.PathLike) -> str:
    """The slide's file name without its ending (``a.ome.tif`` -> ``a``, ``b.svs`` -> ``b``)."""
    name = Path(path).name
    for ending in _DOUBLE_SUFFIXES:
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return Path(name).stem


def read_manifest(path: str | os.PathLike) -> list[tuple[str, float | None]]:
    """Slides listed in a CSV manifest, with their pixel size when it gives one.

    The manifest has a header row with a ``slide`` (or ``path``) column and,
    optionally, an ``mpp`` column (µm per level-0 pixel, empty to use the
    file's). Relative paths are relative to the manifest's folder; other
    columns are ignored.

    Returns
    -------
    list of (str, float or None)

    Raises
    ------
    CohortError
        If the file has no such column, or an ``mpp`` is not a positive number.
    FileNotFoundError
        If the manifest does not exist.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = {name.strip().lower(): name for name in (reader.fieldnames or [])}
        column = fields.get("slide") or fields.get("path")
        if column is None:
            raise CohortError(f"{path}: expected a header row with a 'slide' column, received "
                              f"{list(reader.fieldnames or [])}")
        slides = []
        for line, row in enumerate(reader, start=2):
            value = (row.get(column) or "").strip()
            if not value:
                continue
            mpp_text = (row.get(fields["mpp"]) or "").strip() if "mpp" in fields else ""
            mpp = None
            if mpp_text:
                try:
                    mpp = float(mpp_text)
                except ValueError:
                    mpp = -1.0
                if not (math.isfinite(mpp) and mpp > 0):
                    raise CohortError(f"{path}, line {line}: mpp: expected a positive number of µm per pixel, "
                                      f"received {mpp_text!r}")
            slide = Path(value).expanduser()
            slides.append((str(slide if slide.is_absolute() else path.parent / slide), mpp))
    return slides


def plan_jobs(slides: Iterable[tuple[str | os.PathLike, float | None]], out_dir: str | os.PathLike,
              mpp: float | None = None) -> list[SlideJob]:
    """One :class:`SlideJob` per slide, in order; ``mpp`` applies where a slide has none of its own.

    Raises
    ------
    CohortError
        If there is no slide, or two slides would share an output folder.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    jobs, by_stem = [], {}
    for slide, own_mpp in slides:
        slide = Path(slide).expanduser().absolute()
        stem = slide_stem(slide)
        if stem in by_stem:
            what = "is listed twice" if by_stem[stem] == slide else f"and {by_stem[stem]} share the name {stem!r}"
            raise CohortError(f"{slide} {what}: each slide needs its own output folder {out_dir / stem}")
        by_stem[stem] = slide
        jobs.append(SlideJob(slide=str(slide), out_dir=str(out_dir / stem), mpp=own_mpp if own_mpp else mpp))
    if not jobs:
        raise CohortError("expected at least one slide, received none")
    return jobs


def model_ref(choice: str | os.PathLike | None = None) -> ModelRef:
    """Resolve ``choice`` (see :func:`~napari_feddp.models.store.resolve_checkpoint`) and hash its weights."""
    from .models.checkpoint import file_sha256, read_card
    from .models.store import resolve_checkpoint

    path = resolve_checkpoint(choice).absolute()
    card = read_card(path.with_suffix(".json"))
    return ModelRef(path=str(path), name=card.name, sha256=file_sha256(path).hex())


# --------------------------------------------------------------------------- done-markers


def _slide_fingerprint(path: str | os.PathLike) -> dict:
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def finished_row(job: SlideJob, model: ModelRef, settings: Settings) -> dict | None:
    """The slide's ``cohort.csv`` row (status ``skipped``) when its outputs are complete for this run.

    Complete means: the done-marker exists and names the same model sha256,
    the same result settings and the same slide file (size and modification
    time), and every output it lists has the size it recorded.
    """
    row = _marker_row(job, model, settings)
    if row is not None:
        row.update(status=SKIPPED)
    return row


def _marker_row(job: SlideJob, model: ModelRef, settings: Settings) -> dict | None:
    """The row the done-marker recorded (status ``done``), when it is complete for this run."""
    try:
        marker = json.loads((Path(job.out_dir) / MARKER).read_text(encoding="utf-8"))
        if (marker["model_sha256"] != model.sha256
                or marker["settings"] != json.loads(json.dumps(settings.result_settings(job.mpp)))
                or marker["slide_file"] != _slide_fingerprint(job.slide)):
            return None
        for name, size in marker["outputs"].items():
            if (Path(job.out_dir) / name).stat().st_size != size:
                return None
        row = dict(marker["row"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    row.update(slide=job.slide, error="")
    return row


def _clear_slide_folder(job: SlideJob) -> Path:
    """Remove the marker, outputs, temporaries and intermediate stores a previous run may have left."""
    folder = Path(job.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)  # first: from here on the outputs are not complete
    for output in job.outputs().values():
        output.unlink(missing_ok=True)
    for leftover in folder.iterdir():
        if leftover.name.startswith(".") and leftover.name.endswith((".tmp", ".partial")):
            leftover.unlink(missing_ok=True)
    shutil.rmtree(folder / WORK, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- one slide (runs on a worker)

_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def cached_model(model: ModelRef):
    """The worker process's :class:`~napari_feddp.segmentation.LoadedModel` for ``model``, loaded once.

    Raises
    ------
    napari_feddp.models.CheckpointError
        If the file cannot be loaded, or its weights no longer have ``model.sha256``.
    """
    from .models import CheckpointError
    from .models.checkpoint import file_sha256
    from .segmentation import load_model

    with _MODELS_LOCK:
        loaded = _MODELS.get(model.sha256)
        if loaded is None:
            found = file_sha256(model.path).hex()
            if found != model.sha256:
                raise CheckpointError(f"{model.path} changed since the run started (sha256 {found}, "
                                      f"expected {model.sha256})")
            loaded = _MODELS[model.sha256] = load_model(model.path)
        return loaded


@dataclass(frozen=True)
class Placement:
    """Where each worker runs: ``address -> (index among its host's workers, workers on the host)``."""

    workers: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, client) -> Placement:
        hosts: dict[str, list[str]] = {}
        for address, info in client.scheduler_info(n_workers=-1)["workers"].items():
            hosts.setdefault(info.get("host", address), []).append(address)
        return cls({address: (index, len(peers)) for peers in hosts.values()
                    for index, address in enumerate(sorted(peers))})


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _use_worker_share(placement: Placement | None, device: str) -> str:
    """Set this process's PyTorch threads to its share of the host; return the device to run on."""
    import torch

    index, peers, nthreads = 0, 1, 1
    try:
        from distributed import get_worker

        worker = get_worker()
        index, peers = (placement.workers if placement else {}).get(worker.address, (0, 1))
        nthreads = max(1, int(worker.state.nthreads))
    except ValueError:  # not on a worker: the whole machine is ours
        pass
    torch.set_num_threads(max(1, _usable_cores() // (peers * nthreads)))
    if device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{index % torch.cuda.device_count()}"
    return device


def segment_slide_job(job: SlideJob, model: ModelRef, settings: Settings,
                      placement: Placement | None = None) -> dict:
    """Segment one slide into its folder and write its done-marker; the task each worker runs.

    Never raises for a problem with the slide: the returned row says
    ``failed`` with the error instead, so that one slide fails alone.

    Parameters
    ----------
    job : SlideJob
    model : ModelRef
    settings : Settings
    placement : Placement, optional
        The cluster's workers, to share cores and GPUs between those on a host.

    Returns
    -------
    dict
        The slide's ``cohort.csv`` row (:data:`COLUMNS`).
    """
    from .segmentation import CLI_CONTROLS, user_message

    start = time.perf_counter()
    row = {"slide": job.slide, "model": model.name, "model_sha256": model.sha256}
    folder = Path(job.out_dir)
    try:
        _clear_slide_folder(job)
        device = _use_worker_share(placement, settings.device)
        loaded = cached_model(model)
        # On a thread of its own: dask computes the slide's arrays (tile reads, thumbnails,
        # label pyramids) with its threaded scheduler in this process, whereas from a Dask
        # task's thread it would send them back to the cluster as tasks.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="feddp-slide") as pool:
            summary, outputs = pool.submit(_segment_into, job, loaded, settings, device).result()
        row.update(status=DONE, nuclei=summary["nuclei"], density_per_mm2=summary["density_per_mm2"],
                   tissue_area_mm2=summary["tissue_area_mm2"], seconds=round(time.perf_counter() - start, 2),
                   error="")
        marker = {
            "slide": job.slide,
            "slide_file": _slide_fingerprint(job.slide),
            "model": model.name,
            "model_path": model.path,
            "model_sha256": model.sha256,
            "settings": settings.result_settings(job.mpp),
            "outputs": {path.name: path.stat().st_size for path in outputs.values()},
            "summary": summary,
            "row": row,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_atomic(folder / MARKER, json.dumps(marker, indent=2))  # last: the outputs are complete
        return row
    except Exception as exc:  # any error of one slide is that slide's result
        logger.debug("slide %s failed", job.slide, exc_info=True)
        row.update(status=FAILED, seconds=round(time.perf_counter() - start, 2),
                   error=user_message(exc, CLI_CONTROLS) or type(exc).__name__)
        return row
    finally:
        shutil.rmtree(folder / WORK, ignore_errors=True)


def _segment_into(job: SlideJob, loaded, settings: Settings, device: str) -> tuple[dict, dict[str, Path]]:
    """Segment ``job``'s slide and write its outputs together; returns the summary and the outputs."""
    from .nuclei import segment_nuclei, write_nuclei
    from .segmentation import (
        CLI_CONTROLS,
        check_pixel_size,
        is_field_of_view,
        open_image,
    )

    if Path(job.slide).is_dir():
        raise ValueError(f"{job.slide} is a folder, not a slide file")
    slide = open_image(job.slide)
    try:
        if slide.kind != "rgb":
            raise ValueError(f"{Path(job.slide).name} is a label image, not a slide")
        mpp = check_pixel_size(slide, loaded, job.mpp, CLI_CONTROLS)
        generator = segment_nuclei(
            slide, loaded, tissue=not (settings.all_tiles or is_field_of_view(slide)),
            batch_size=settings.batch_size, overlap=settings.overlap, device=device, mpp=mpp,
            out=Path(job.out_dir) / WORK / "classes.zarr", overwrite=True,
        )
        while True:
            try:
                next(generator)
            except StopIteration as stop:
                nuclei = stop.value
                break
        if not nuclei.complete:
            raise RuntimeError("the segmentation stopped before the end")
        outputs = job.outputs()
        write_nuclei(nuclei, loaded, Path(job.slide).name, **outputs)
        return dict(nuclei.summary), outputs
    finally:
        slide.close()


# --------------------------------------------------------------------------- the cohort (runs on the client)


def default_workers(slides: int | None = None) -> int:
    """Workers for a local cluster: one per GPU, else one per core (two per worker from 4 cores on).

    Capped by the available memory (:data:`WORKER_MEMORY` each) and by the
    number of slides. Small slides spend much of their time outside the
    model (opening, tissue detection, nucleus labelling, writing), which one
    thread does; several processes overlap that, and PyTorch's threads split
    the cores between them.
    """
    import psutil
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
    else:
        cores = _usable_cores()
        count = cores if cores < 4 else cores // 2
        count = min(count, max(1, psutil.virtual_memory().available // WORKER_MEMORY))
    if slides:
        count = min(count, slides)
    return max(1, int(count))


@contextlib.contextmanager
def cohort_client(scheduler: str | None = None, workers: int | None = None,
                  dashboard_address: str = ":8787") -> Iterator[Any]:
    """A :class:`distributed.Client`: to a running scheduler, or to a new local cluster closed on exit.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``); its cluster is left running.
    workers : int, optional
        Worker processes of the local cluster (default :func:`default_workers`).
        Each runs one slide at a time (one Dask thread; PyTorch gets its own).
    dashboard_address : str
        Where the local cluster serves its dashboard (needs ``bokeh``).
    """
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    # Worker processes inherit an ignored SIGINT: a terminal's Ctrl-C reaches the whole process
    # group, and only this process should act on it (cancel, then close the cluster in order).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _in_main_thread() else None
    try:
        cluster = LocalCluster(n_workers=workers or default_workers(), threads_per_worker=1, processes=True,
                               dashboard_address=dashboard_address, silence_logs=logging.ERROR)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def dashboard_link(client) -> str:
    """The cluster's dashboard address, with what to install when this machine's cluster cannot draw it."""
    import importlib.util

    from distributed import LocalCluster

    link = client.dashboard_link
    if isinstance(client.cluster, LocalCluster) and importlib.util.find_spec("bokeh") is None:
        link += " (install bokeh>=3.1 to see it)"
    return link


def write_cohort_csv(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write ``rows`` as ``cohort.csv`` (:data:`COLUMNS`), atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in COLUMNS})
    return write_atomic(path, text.getvalue())


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass
class CohortResult:
    """What a cohort run did, one row per slide in the order given."""

    rows: list[dict]
    table: Path

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == FAILED]


def run_cohort(
    client,
    jobs: Sequence[SlideJob],
    out_dir: str | os.PathLike,
    model: ModelRef,
    settings: Settings = Settings(),
    *,
    redo: bool = False,
    on_row: Callable[[dict], Any] | None = None,
) -> CohortResult:
    """Segment every slide not yet done for this model and settings, one task per slide on ``client``.

    ``OUT/cohort.csv`` is rewritten after every slide, so it always lists the
    slides finished so far. When interrupted (``KeyboardInterrupt``) the
    tasks are cancelled and the exception propagates; slides already finished
    keep their outputs and markers. A slide already running on a worker that
    lives on (a cluster of one's own) finishes and is kept; closing a local
    cluster ends its workers, and such a slide has no marker.

    Parameters
    ----------
    client : distributed.Client or None
        None only when every slide is already done (nothing is submitted).
    jobs : sequence of SlideJob
    out_dir : path
        Where ``cohort.csv`` goes (the jobs' folders are inside it).
    model : ModelRef
    settings : Settings
    redo : bool
        Segment every slide again, even those whose outputs are complete.
    on_row : callable, optional
        Called with each slide's row once it is known (skipped ones first).

    Returns
    -------
    CohortResult
    """
    from distributed import as_completed

    table = Path(out_dir) / COHORT_CSV
    rows: dict[int, dict] = {}

    def record(index: int, row: dict) -> None:
        rows[index] = row
        write_cohort_csv(table, [rows[i] for i in sorted(rows)])
        if on_row is not None:
            on_row(row)

    pending = []
    for index, job in enumerate(jobs):
        row = None if redo else finished_row(job, model, settings)
        if row is None:
            pending.append(index)
        else:
            record(index, row)
    write_cohort_csv(table, [rows[i] for i in sorted(rows)])
    if not pending:
        return CohortResult([rows[i] for i in sorted(rows)], table)
    if client is None:
        raise ValueError(f"client: expected a distributed.Client to segment {len(pending)} slides, received None")
    run_id = uuid.uuid4().hex[:8]
    placement = Placement.of(client)
    futures = {
        client.submit(segment_slide_job, jobs[i], model, settings, placement,
                      key=f"segment-{jobs[i].stem}-{run_id}", pure=False, priority=len(jobs) - i): i
        for i in pending
    }
    try:
        for future in as_completed(futures):
            index = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # the worker died on this slide (KilledWorker, ...)
                row = {"slide": jobs[index].slide, "status": FAILED, "model": model.name,
                       "model_sha256": model.sha256, "error": f"{type(exc).__name__}: {exc}"}
            future.release()
            record(index, row)
    except BaseException:
        with contextlib.suppress(Exception):
            client.cancel(list(futures), force=True)
        # Slides whose marker was written before their result reached us are done all the same.
        with contextlib.suppress(OSError):
            for index in sorted(set(futures.values()) - set(rows)):
                row = _marker_row(jobs[index], model, settings)
                if row is not None:
                    record(index, row)
        raise
    return CohortResult([rows[i] for i in sorted(rows)], table)

