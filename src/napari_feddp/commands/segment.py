"""``napari-feddp segment SLIDE --out MASK.ome.tif``: headless whole-slide segmentation."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment a slide and write a pyramidal OME-TIFF label map (and QuPath GeoJSON)",
        description="Run the model over the slide's tissue tiles; write labels aligned with the slide.",
    )
    parser.add_argument("slide", help="slide file (.svs, .ndpi, .scn, .bif, (OME-)TIFF)")
    parser.add_argument("--out", required=True, help="output label map, e.g. MASK.ome.tif")
    parser.add_argument("--model", help="checkpoint (.safetensors next to its .json card); "
                        "default: the federation's latest model, else the bundled one")
    parser.add_argument("--mpp", type=float, metavar="MICRONS_PER_PIXEL",
                        help="pixel size of the slide's full-resolution image in µm, for files that lack one "
                        "or to override the file's")
    parser.add_argument("--geojson", help="also write objects as a QuPath GeoJSON FeatureCollection")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overlap", type=float, default=0.25, help="fraction of a tile shared with neighbours")
    parser.add_argument("--region", help="X,Y,W,H in level-0 pixels, or a GeoJSON file of polygons in "
                        "level-0 pixels (e.g. QuPath annotations): labels only inside them (default: all tissue)")
    parser.add_argument("--all-tiles", action="store_true", help="predict background tiles too")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from . import CommandError
    from ..export import write_geojson, write_ome_labels
    from ..inference import InferenceError
    from ..models import CheckpointError
    from ..models.store import describe_model
    from ..segmentation import (
        CLI_CONTROLS,
        OutputPathError,
        SegmentationInputError,
        check_output_paths,
        check_pixel_size,
        load_model,
        region_from_argument,
        run_segmentation,
        user_message,
        write_together,
    )
    from ..slides import SlideError, open_slide

    out = Path(args.out)
    if not out.name.lower().endswith((".ome.tif", ".ome.tiff")):
        raise CommandError(f"--out: expected a file name ending in .ome.tif or .ome.tiff, received {out.name!r}")
    if args.mpp is not None and not args.mpp > 0:
        raise CommandError(f"--mpp: expected a positive number of µm per pixel, received {args.mpp}")
    # Every output is checked before the model or the slide is read: a run must
    # not take minutes and then fail to save its result.
    try:
        outputs = check_output_paths({"--out": out, "--geojson": args.geojson}, inputs=[args.slide])
    except OutputPathError as exc:
        raise CommandError(str(exc)) from None
    out = outputs["--out"]
    try:
        region = region_from_argument(args.region) if args.region else None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if Path(args.slide).is_dir():
        raise CommandError(f"{args.slide} is a folder, not a slide file")
    try:
        slide = open_slide(args.slide)
    except SlideError as exc:
        raise CommandError(str(exc)) from None
    if slide.kind != "rgb":
        raise CommandError(f"{Path(args.slide).name} is a label image, not a slide")
    try:
        loaded = load_model(args.model)
    except CheckpointError as exc:
        raise CommandError(user_message(exc, CLI_CONTROLS)) from None
    print(f"model: {describe_model(loaded.path).description}\n       {loaded.path}", flush=True)
    try:
        mpp = check_pixel_size(slide, loaded, args.mpp, CLI_CONTROLS)
    except SegmentationInputError as exc:
        raise CommandError(str(exc)) from None
    bar = _ProgressBar(enabled=not args.quiet)
    try:
        generator = run_segmentation(
            slide, loaded, region=region, tissue=not args.all_tiles, batch_size=args.batch_size,
            overlap=args.overlap, device=args.device, cancel=threading.Event(), mpp=mpp,
        )
        while True:
            try:
                bar.update(next(generator))
            except StopIteration as stop:
                result = stop.value
                break
    except InferenceError as exc:
        raise CommandError(user_message(exc, CLI_CONTROLS)) from None
    finally:
        bar.close()
    mpp = result.mpp
    writes = [(out, lambda path: write_ome_labels(path, result.labels, mpp=mpp,
                                                  name=f"{Path(args.slide).name} segmentation"))]
    geojson = outputs.get("--geojson")
    if geojson is not None:
        writes.append((geojson, lambda path: write_geojson(
            path, result.labels, class_names=loaded.card.class_names,
            class_colors=loaded.class_colors, downsample=result.downsample,
        )[1]))
    try:
        # Both files or neither: a label map without its objects (or the reverse) looks complete but is not.
        written = write_together(writes)
    except OSError as exc:
        raise CommandError(f"cannot write the outputs, none was kept: {exc}") from None
    print(f"labels: {out} ({result.labels.shape[1]} x {result.labels.shape[0]} px at "
          f"{'%.3f µm/px' % mpp[1] if mpp else 'slide pixels'}, downsample {result.downsample[1]:g}; "
          f"{result.tiles_done} tiles predicted, {result.tiles_skipped} skipped, {result.elapsed_seconds:.1f} s)")
    if geojson is not None:
        print(f"objects: {geojson} ({written[1]} polygons, level-0 pixel coordinates)")
    return 0


class _ProgressBar:
    """A one-line terminal progress bar on stderr."""

    def __init__(self, enabled: bool, width: int = 30):
        self.enabled = enabled
        self.width = width
        self._last = 0.0

    def update(self, progress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if progress.stage == "predicting" and now - self._last < 0.2 and progress.done != progress.total:
            return
        self._last = now
        filled = int(self.width * progress.fraction)
        eta = f"ETA {progress.eta_seconds:5.0f}s" if progress.eta_seconds is not None else "ETA    ?"
        sys.stderr.write(f"\r{progress.stage:>10} [{'#' * filled}{'.' * (self.width - filled)}] "
                         f"{progress.done}/{progress.total} tiles {eta}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")

