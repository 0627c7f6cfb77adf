"""``napari-feddp segment-cohort SLIDES... --out-dir DIR``: segment many slides on a Dask cluster,
resumably (see :mod:`napari_feddp.cohort`).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment-cohort",
        help="segment many slides on a Dask cluster, resumable; one folder per slide and a cohort.csv",
        description="Segment every slide's nuclei as `segment` does, one Dask task per slide, into "
                    "DIR/<slide stem>/ (labels OME-TIFF, measurements CSV, QuPath GeoJSON), and list the "
                    "slides in DIR/cohort.csv. Slides already done with the same model and settings are skipped. "
                    "Exit status 1 when a slide failed.",
    )
    parser.add_argument("slides", nargs="*", metavar="SLIDE", help="slide files (.svs, .ndpi, (OME-)TIFF, ...)")
    parser.add_argument("--manifest", metavar="CSV", help="CSV with a 'slide' column (paths relative to the CSV) "
                        "and, optionally, an 'mpp' column; instead of SLIDE arguments")
    parser.add_argument("--out-dir", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler "
                        "(tcp://host:8786); its workers must see the slides, the model and DIR at the same paths. "
                        "Default: a local cluster on this machine")
    parser.add_argument("--workers", type=int, metavar="N", help="worker processes of the local cluster, "
                        "each segmenting one slide at a time (default: one per GPU, else one per core, "
                        "one per two cores from 4 cores on; at most one per slide)")
    parser.add_argument("--model", help="checkpoint (.safetensors next to its .json card); "
                        "default: the federation's latest model, else the bundled one")
    parser.add_argument("--mpp", type=float, metavar="MICRONS_PER_PIXEL",
                        help="pixel size of the slides' full-resolution images in µm, for files that lack one "
                        "(a manifest's mpp column overrides it per slide)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overlap", type=float, default=0.25, help="fraction of a tile shared with neighbours")
    parser.add_argument("--all-tiles", action="store_true", help="predict background tiles too")
    parser.add_argument("--redo", action="store_true", help="segment every slide again, even those already done")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from .. import cohort
    from .._atomic import OutputBusyError, exclusive
    from ..segmentation import check_output_path
    from . import CommandError

    if bool(args.slides) == bool(args.manifest):
        raise CommandError("expected SLIDE arguments or --manifest CSV, received "
                           + ("both" if args.slides else "neither"))
    if args.workers is not None and args.scheduler:
        raise CommandError("--workers sizes the local cluster; a cluster at --scheduler keeps its own workers")
    if args.workers is not None and args.workers < 1:
        raise CommandError(f"--workers: expected a positive number, received {args.workers}")
    if args.mpp is not None and not args.mpp > 0:
        raise CommandError(f"--mpp: expected a positive number of µm per pixel, received {args.mpp}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size: expected a positive number, received {args.batch_size}")
    # A bad manifest, output folder or model raises a ValueError that names it: one line, exit 2.
    slides = cohort.read_manifest(args.manifest) if args.manifest else [(s, None) for s in args.slides]
    jobs = cohort.plan_jobs(slides, args.out_dir, mpp=args.mpp)
    out_dir = Path(args.out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise CommandError(f"--out-dir: {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = check_output_path(out_dir / cohort.COHORT_CSV, "--out-dir")
    model = cohort.model_ref(args.model)
    settings = cohort.Settings(all_tiles=args.all_tiles, overlap=args.overlap, batch_size=args.batch_size,
                               device=args.device)
    print(f"model: {model.name} (sha256 {model.sha256[:12]}…)\n       {model.path}", flush=True)
    try:
        with exclusive([table]):  # one run at a time per output folder
            return _run(args, jobs, out_dir, model, settings)
    except OutputBusyError:
        raise CommandError(f"--out-dir: another segment-cohort run is writing to {out_dir}; wait for it to "
                           "finish or choose another folder") from None


def _run(args, jobs, out_dir: Path, model, settings) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from .. import cohort

    to_do = sum(args.redo or cohort.finished_row(job, model, settings) is None for job in jobs)
    progress = Progress(
        TextColumn("[bold]slides"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=Console(stderr=True), disable=args.quiet,
    )
    bar = progress.add_task("slides", total=len(jobs), failed=0)
    failed = 0

    def report(row: dict) -> None:
        nonlocal failed
        name = Path(row["slide"]).name
        if row["status"] == cohort.FAILED:
            failed += 1
            progress.console.print(f"failed  {name}: {row['error']}", markup=False, highlight=False, soft_wrap=True)
        else:
            density = row.get("density_per_mm2")
            density = f", {float(density):,.0f} per mm²" if density not in (None, "") else ""
            took = f" ({float(row['seconds']):.1f} s)" if row["status"] == cohort.DONE else ""
            print(f"{row['status']:<7} {name}: {int(row['nuclei']):,} nuclei{density}{took}", flush=True)
        progress.update(bar, advance=1, failed=failed)

    # Every slide done: no cluster to start.
    workers = None if args.scheduler else args.workers or cohort.default_workers(max(to_do, 1))
    with (cohort.cohort_client(args.scheduler, workers) if to_do else contextlib.nullcontext()) as client:
        if client is not None:
            info = client.scheduler_info()
            threads = sum(w.get("nthreads", 1) for w in info["workers"].values())
            print(f"cluster: {client.scheduler.address}, {len(info['workers'])} workers, {threads} Dask threads",
                  flush=True)
            print(f"dashboard: {cohort.dashboard_link(client)}", flush=True)
        with progress:
            result = cohort.run_cohort(client, jobs, out_dir, model, settings, redo=args.redo, on_row=report)
    done, skipped, failed = (result.count(status) for status in (cohort.DONE, cohort.SKIPPED, cohort.FAILED))
    print(f"{len(jobs)} slides: {done} done, {skipped} skipped, {failed} failed; table: {result.table}")
    if failed:
        print(f"napari-feddp segment-cohort: {failed} of {len(jobs)} slides failed (see {result.table})",
              file=sys.stderr)
        return 1  # the other slides are complete
    return 0
