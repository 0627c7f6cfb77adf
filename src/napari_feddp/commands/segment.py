"""``napari-feddp segment SLIDE --out NUCLEI.ome.tif``: headless whole-slide nucleus segmentation.

Writes one label per nucleus (pyramidal OME-TIFF), the measurement table (CSV,
next to ``--out`` unless told otherwise), optionally one QuPath detection per
nucleus (GeoJSON, with measurements) and the model's class map, and prints the
slide's summary: nucleus count, density per mm² of tissue, median area.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    from . import add_tta_option

    parser = subparsers.add_parser(
        "segment",
        help="segment a slide's nuclei: one label per nucleus (OME-TIFF), measurements (CSV), QuPath GeoJSON",
        description="Run the model over the slide's tissue tiles, split the result into nuclei and measure "
                    "each; write labels aligned with the slide and print a summary.",
    )
    parser.add_argument("slide", help="slide file (.svs, .ndpi, .scn, .bif, (OME-)TIFF) or a PNG / JPEG picture")
    parser.add_argument("--out", required=True, help="output nucleus label map (one id per nucleus), "
                        "e.g. NUCLEI.ome.tif")
    parser.add_argument("--model", help="checkpoint (.safetensors next to its .json card); "
                        "default: the federation's latest model, else the bundled one")
    parser.add_argument("--mpp", type=float, metavar="MICRONS_PER_PIXEL",
                        help="pixel size of the slide's full-resolution image in µm, for files that lack one "
                        "(PNG, JPEG, many TIFFs) or to override the file's")
    parser.add_argument("--csv", metavar="PATH", help="measurement table, one row per nucleus "
                        "(default: next to --out, NAME.csv for NAME.ome.tif)")
    parser.add_argument("--no-csv", action="store_true", help="write no measurement table")
    parser.add_argument("--geojson", help="also write one QuPath detection per nucleus, with its measurements")
    parser.add_argument("--classes-out", metavar="PATH", help="also write the model's class map "
                        "(0 background, 1 nucleus, ...) as an OME-TIFF")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overlap", type=float, default=0.25, help="fraction of a tile shared with neighbours")
    add_tta_option(parser)
    parser.add_argument("--region", help="X,Y,W,H in level-0 pixels, or a GeoJSON file of polygons in "
                        "level-0 pixels (e.g. QuPath annotations): labels only inside them (default: all tissue)")
    parser.add_argument("--all-tiles", action="store_true", help="predict background tiles too "
                        "(always so for pictures of at most 2048 px a side: they are all tissue)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from .._atomic import OutputBusyError, exclusive
    from ..cohort import slide_stem
    from ..segmentation import check_output_paths, open_image, region_from_argument
    from . import CommandError

    # Bad input raises CommandError, or a ValueError / FileNotFoundError that names it: one line, exit 2 either way.
    out = Path(args.out)
    for what, path in (("--out", out), ("--classes-out", args.classes_out)):
        if path is not None and not Path(path).name.lower().endswith((".ome.tif", ".ome.tiff")):
            raise CommandError(f"{what}: expected a file name ending in .ome.tif or .ome.tiff, "
                               f"received {Path(path).name!r}")
    if args.mpp is not None and not args.mpp > 0:
        raise CommandError(f"--mpp: expected a positive number of µm per pixel, received {args.mpp}")
    if args.no_csv and args.csv:
        raise CommandError("--csv and --no-csv: expected one of them, received both")
    csv_path = None if args.no_csv else (args.csv or out.with_name(slide_stem(out) + ".csv"))
    # Every output is checked before the model or the slide is read: a run must
    # not take minutes and then fail to save its result.
    outputs = check_output_paths({"--out": out, "--csv": csv_path, "--geojson": args.geojson,
                                  "--classes-out": args.classes_out}, inputs=[args.slide])
    existing = [f"{what} {path}" for what, path in outputs.items() if path.exists()]
    if existing and not args.overwrite:
        raise CommandError(f"{', '.join(existing)}: already exists; give --overwrite to replace it")
    region = region_from_argument(args.region) if args.region else None
    if Path(args.slide).is_dir():
        raise CommandError(f"{args.slide} is a folder, not a slide file")
    slide = open_image(args.slide)
    try:
        # Held from the first tile to the last file: a second run on the same outputs is refused at once.
        with exclusive(outputs.values()):
            return _segment(args, slide, outputs, region)
    except OutputBusyError as exc:
        raise CommandError(str(exc)) from None
    finally:
        slide.close()  # its tile-decoding threads end now, not whenever the garbage collector runs


def _segment(args, slide, outputs: dict, region) -> int:
    """Segment an opened slide, write ``outputs`` and print what was written; returns the exit status."""
    from ..inference import InferenceError, run_to_completion
    from ..models.store import describe_model
    from ..nuclei import describe_summary, segment_nuclei, write_nuclei
    from ..segmentation import CLI_CONTROLS, check_pixel_size, is_field_of_view, load_model, user_message
    from . import CommandError

    if slide.kind != "rgb":
        raise CommandError(f"{Path(args.slide).name} is a label image, not a slide")
    loaded = load_model(args.model)
    print(f"model: {describe_model(loaded.path).description}\n       {loaded.path}", flush=True)
    mpp = check_pixel_size(slide, loaded, args.mpp, CLI_CONTROLS)
    bar = _ProgressBar(enabled=not args.quiet)
    try:
        run = segment_nuclei(slide, loaded, region=region, tissue=not (args.all_tiles or is_field_of_view(slide)),
                             batch_size=args.batch_size, overlap=args.overlap, device=args.device, mpp=mpp,
                             augment=args.tta)
        nuclei = run_to_completion(run, allow_partial=True, callback=bar.update)  # nothing cancels it
    except (InferenceError, ValueError) as exc:
        raise CommandError(user_message(exc, CLI_CONTROLS)) from None
    finally:
        bar.close()
    options = {"labels": "--out", "csv": "--csv", "geojson": "--geojson", "classes": "--classes-out"}
    try:  # all or none
        written = write_nuclei(nuclei, loaded, Path(args.slide).name,
                               **{kind: outputs.get(option) for kind, option in options.items()})
    except OSError as exc:
        raise CommandError(f"cannot write the outputs, none was kept: {exc}") from None
    result, mpp = nuclei.segmentation, nuclei.segmentation.mpp
    print(f"nuclei: {describe_summary(nuclei.summary)}")
    print(f"labels: {outputs['--out']} (one id per nucleus; {result.labels.shape[1]} x {result.labels.shape[0]} px "
          f"at {f'{mpp[1]:.3f} µm/px' if mpp else 'slide pixels'}, downsample {result.downsample[1]:g}; "
          f"{result.tiles_done} tiles predicted, {result.tiles_skipped} skipped, "
          f"{result.elapsed_seconds + nuclei.elapsed_seconds:.1f} s)")
    if "--csv" in outputs:
        print(f"measurements: {outputs['--csv']} ({nuclei.count} rows)")
    if "--geojson" in outputs:
        print(f"objects: {outputs['--geojson']} ({written['geojson']} nucleus polygons with measurements, "
              "level-0 pixel coordinates)")
    if "--classes-out" in outputs:
        print(f"classes: {outputs['--classes-out']} (the model's class map)")
    return 0


class _ProgressBar:
    """A one-line terminal progress bar on stderr."""

    def __init__(self, enabled: bool, width: int = 30):
        self.enabled = enabled
        self.width = width
        self._last = 0.0
        self._stage = None

    def update(self, progress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        same_stage = progress.stage == self._stage
        if same_stage and now - self._last < 0.2 and progress.done != progress.total:
            return
        if not same_stage and self._stage is not None and progress.unit == "windows" and progress.stage != "cancelled":
            sys.stderr.write("\n")  # each step after the model's run keeps its own line
        self._last, self._stage = now, progress.stage
        filled = int(self.width * progress.fraction)
        eta = f"ETA {progress.eta_seconds:5.0f}s" if progress.eta_seconds is not None else "ETA    ?"
        sys.stderr.write(f"\r{progress.stage:>16} [{'#' * filled}{'.' * (self.width - filled)}] "
                         f"{progress.done}/{progress.total} {progress.unit} {eta}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")

