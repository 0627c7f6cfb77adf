"""Segment a cohort of slides on a Dask cluster: one task per slide, resumable (no Qt).

Each slide's task runs the steps of ``napari-feddp segment`` and writes
``OUT/<stem>/<stem>.ome.tif``, ``.csv`` and ``.geojson`` together, then the
done-marker ``done.json`` (model sha256, result settings, the slide file's size
and modification time, the outputs' sizes, the slide's row), atomically and
last. A slide whose marker matches the run is skipped; anything else in its
folder is replaced, so a killed run leaves each slide complete or without a
marker. A slide that fails does so alone; ``OUT/cohort.csv`` (:data:`COLUMNS`)
is rewritten after every slide. Workers load the model once per process and
share their host's cores (and GPUs).
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
#: Memory one worker is given room for when the worker count is chosen (the
#: sample slide peaks at about 0.6 GiB; large slides stay on disk).
WORKER_MEMORY = 2 * 2**30

logger = logging.getLogger(__name__)


class CohortError(ValueError):
    """The cohort cannot be run as given (no slides, a bad manifest, two slides with one stem)."""


@dataclass(frozen=True)
class SlideJob:
    """One slide (absolute path), its output folder ``OUT/<stem>`` and the µm per pixel overriding the file's."""

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
    """Run settings shared by every slide; ``all_tiles`` and ``overlap`` change the outputs."""

    all_tiles: bool = False
    overlap: float = 0.25
    batch_size: int = 8
    device: str = "auto"

    def result_settings(self, mpp: float | None) -> dict:
        """What a finished slide must have been made with to be skipped."""
        return {"all_tiles": self.all_tiles, "overlap": self.overlap, "mpp": mpp}


@dataclass(frozen=True)
class ModelRef:
    """The checkpoint every worker loads: its path (reachable from the workers), card name and sha256."""

    path: str
    name: str
    sha256: str


def slide_stem(path: str | os.PathLike) -> str:
    """The file name without its ending (``a.ome.tif`` -> ``a``, ``b.svs`` -> ``b``)."""
    name = Path(path).name
    for ending in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return Path(name).stem


def read_manifest(path: str | os.PathLike) -> list[tuple[str, float | None]]:
    """Slides listed in a CSV manifest, with their pixel size when it gives one.

    The header names a ``slide`` (or ``path``) column, relative to the
    manifest's folder, and optionally an ``mpp`` column (empty: the file's).

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
            try:
                mpp = float(mpp_text) if mpp_text else None
            except ValueError:
                mpp = math.nan
            if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
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
        jobs.append(SlideJob(slide=str(slide), out_dir=str(out_dir / stem), mpp=own_mpp or mpp))
    if not jobs:
        raise CohortError("expected at least one slide, received none")
    return jobs


def model_ref(choice: str | os.PathLike | None = None) -> ModelRef:
    """Resolve ``choice`` (see :func:`~napari_feddp.models.store.resolve_checkpoint`) and hash its weights."""
    from .models.checkpoint import file_sha256, read_card
    from .models.store import resolve_checkpoint

    path = resolve_checkpoint(choice).absolute()
    return ModelRef(path=str(path), name=read_card(path).name, sha256=file_sha256(path).hex())


def _slide_fingerprint(path: str | os.PathLike) -> dict:
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def finished_row(job: SlideJob, model: ModelRef, settings: Settings) -> dict | None:
    """The slide's ``cohort.csv`` row (status ``skipped``) when its outputs are complete for this run.

    Complete means: the done-marker names the same model sha256, result
    settings and slide file (size and modification time), and every output it
    lists has the size it recorded.
    """
    try:
        marker = json.loads((Path(job.out_dir) / MARKER).read_text(encoding="utf-8"))
        if (marker["model_sha256"] != model.sha256 or marker["settings"] != settings.result_settings(job.mpp)
                or marker["slide_file"] != _slide_fingerprint(job.slide)):
            return None
        if any((Path(job.out_dir) / name).stat().st_size != size for name, size in marker["outputs"].items()):
            return None
        return {**marker["row"], "slide": job.slide, "status": SKIPPED, "error": ""}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


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
        if model.sha256 not in _MODELS:
            found = file_sha256(model.path).hex()
            if found != model.sha256:
                raise CheckpointError(f"{model.path} changed since the run started (sha256 {found}, "
                                      f"expected {model.sha256})")
            _MODELS[model.sha256] = load_model(model.path)
        return _MODELS[model.sha256]


def _placement(client) -> dict[str, tuple[int, int]]:
    """Worker address -> (its index among its host's workers, workers on that host)."""
    hosts: dict[str, list[str]] = {}
    for address, info in client.scheduler_info(n_workers=-1)["workers"].items():
        hosts.setdefault(info.get("host", address), []).append(address)
    return {address: (index, len(peers)) for peers in hosts.values() for index, address in enumerate(sorted(peers))}


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _use_worker_share(placement: dict | None, device: str) -> str:
    """Set this process's PyTorch threads to its share of the host; return the device to run on."""
    import torch

    index, peers, nthreads = 0, 1, 1
    try:
        from distributed import get_worker

        worker = get_worker()
        index, peers = (placement or {}).get(worker.address, (0, 1))
        nthreads = max(1, int(worker.state.nthreads))
    except ValueError:  # not on a worker: the whole machine is ours
        pass
    torch.set_num_threads(max(1, _usable_cores() // (peers * nthreads)))
    if device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{index % torch.cuda.device_count()}"
    return device


def segment_slide_job(job: SlideJob, model: ModelRef, settings: Settings, placement: dict | None = None) -> dict:
    """Segment one slide into its folder and write its done-marker; the task each worker runs.

    Returns the slide's ``cohort.csv`` row (:data:`COLUMNS`). Never raises for
    a problem with the slide: the row says ``failed`` with the error instead.
    ``placement`` (worker address -> index on its host, workers on the host)
    shares cores and GPUs between the workers of a host.
    """
    from .segmentation import CLI_CONTROLS, user_message

    start = time.perf_counter()
    row = {"slide": job.slide, "model": model.name, "model_sha256": model.sha256}
    folder = Path(job.out_dir)
    try:
        # What a previous run left: the marker first, from here on the outputs are not complete.
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).unlink(missing_ok=True)
        for stale in [*job.outputs().values(), *folder.glob(".*.tmp"), *folder.glob(".*.partial")]:
            stale.unlink(missing_ok=True)
        shutil.rmtree(folder / WORK, ignore_errors=True)
        device = _use_worker_share(placement, settings.device)
        loaded = cached_model(model)
        # On a thread of its own: dask computes the slide's arrays with its threaded scheduler
        # in this process, whereas from a Dask task's thread it would send them to the cluster.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="feddp-slide") as pool:
            summary, outputs = pool.submit(_segment_into, job, loaded, settings, device).result()
        row.update(status=DONE, nuclei=summary["nuclei"], density_per_mm2=summary["density_per_mm2"],
                   tissue_area_mm2=summary["tissue_area_mm2"], seconds=round(time.perf_counter() - start, 2),
                   error="")
        marker = {
            "slide": job.slide, "slide_file": _slide_fingerprint(job.slide),
            "model": model.name, "model_path": model.path, "model_sha256": model.sha256,
            "settings": settings.result_settings(job.mpp),
            "outputs": {path.name: path.stat().st_size for path in outputs.values()},
            "summary": summary, "row": row, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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
    from .inference import run_to_completion
    from .nuclei import segment_nuclei, write_nuclei
    from .segmentation import CLI_CONTROLS, check_pixel_size, is_field_of_view, open_image

    if Path(job.slide).is_dir():
        raise ValueError(f"{job.slide} is a folder, not a slide file")
    slide = open_image(job.slide)
    try:
        if slide.kind != "rgb":
            raise ValueError(f"{Path(job.slide).name} is a label image, not a slide")
        run = segment_nuclei(
            slide, loaded, tissue=not (settings.all_tiles or is_field_of_view(slide)),
            batch_size=settings.batch_size, overlap=settings.overlap, device=device,
            mpp=check_pixel_size(slide, loaded, job.mpp, CLI_CONTROLS),
            out=Path(job.out_dir) / WORK / "classes.zarr", overwrite=True,
        )
        nuclei = run_to_completion(run, allow_partial=True)  # nothing cancels it
        outputs = job.outputs()
        write_nuclei(nuclei, loaded, Path(job.slide).name, **outputs)
        return dict(nuclei.summary), outputs
    finally:
        slide.close()


# --------------------------------------------------------------------------- the cohort (runs on the client)


def default_workers(slides: int | None = None) -> int:
    """Workers for a local cluster: one per GPU, else one per core (two per worker from 4 cores on).

    Capped by the available memory (:data:`WORKER_MEMORY` each) and by the
    number of slides. Several processes overlap what a slide spends outside the
    model (opening, tissue detection, labelling, writing, all on one thread).
    """
    import psutil
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
    else:
        cores = _usable_cores()
        count = min(cores if cores < 4 else cores // 2,
                    max(1, psutil.virtual_memory().available // WORKER_MEMORY))
    return max(1, int(min(count, slides or count)))


@contextlib.contextmanager
def cohort_client(scheduler: str | None = None, workers: int | None = None,
                  dashboard_address: str = ":8787") -> Iterator[Any]:
    """A :class:`distributed.Client`: to a running scheduler, or to a new local cluster closed on exit.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``); its cluster is left running.
    workers : int, optional
        Worker processes of the local cluster (default :func:`default_workers`), one Dask thread each.
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
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
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
    return f"{value:.6g}" if isinstance(value, float) else str(value)


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

    ``OUT/cohort.csv`` is rewritten after every slide. When interrupted
    (``KeyboardInterrupt``) the tasks are cancelled and the exception
    propagates; finished slides keep their outputs and markers. A slide
    already running on a worker that lives on (a cluster of one's own)
    finishes and is kept.

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

    def result() -> CohortResult:
        return CohortResult([rows[i] for i in sorted(rows)], table)

    def record(index: int, row: dict) -> None:
        rows[index] = row
        write_cohort_csv(table, result().rows)
        if on_row is not None:
            on_row(row)

    pending = []
    for index, job in enumerate(jobs):
        row = None if redo else finished_row(job, model, settings)
        if row is None:
            pending.append(index)
        else:
            record(index, row)
    write_cohort_csv(table, result().rows)
    if not pending:
        return result()
    if client is None:
        raise ValueError(f"client: expected a distributed.Client to segment {len(pending)} slides, received None")
    run_id, placement = uuid.uuid4().hex[:8], _placement(client)
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
                row = finished_row(jobs[index], model, settings)
                if row is not None:
                    record(index, {**row, "status": DONE})
        raise
    return result()
