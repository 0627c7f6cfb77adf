"""Score ways of turning a contour model's classes into nuclei, on training data only.

A contour model predicts background, nucleus interior and contour (a one-pixel outline, or a
thicker rim with ``experiments run --rim-fraction``). The product multiplies the contour class's
probability by a weight before the arg max and grows one nucleus from each connected interior
(:func:`napari_feddp.inference.instances.nuclei_from_contours`). This script re-decodes each
model's prediction of the held-out hospital's tiles (never the test split) with several contour
weights and three decoders:

* ``contours``: the product's decoder;
* ``cores-split``: the interiors first split by the distance watershed of foreground-only models
  (:func:`~napari_feddp.inference.instances.split_nuclei`), then grown over the foreground;
* ``foreground-split``: the contour class ignored, the foreground split as a foreground-only
  model's is.

Each model predicts each tile once per weight. Run from the repository root::

    .venv/bin/python scripts/score_contour_decoding.py --data runs/val-h5/contour/holdout-h5-mixed \\
        --model outline-centralized=runs/val-h5/contour/runs/centralized-s0/centralized.safetensors ...

Writes ``benchmarks/results/contour_decoding.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

WEIGHTS = (1.0, 1.5, 2.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with images/, masks/ and instances/")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT",
                        help="a contour checkpoint trained without the data's hospital (repeatable)")
    parser.add_argument("--mpp", type=float, default=0.25, help="the tiles' µm per pixel (MoNuSeg: 0.25)")
    parser.add_argument("--weights", type=float, nargs="+", default=WEIGHTS, metavar="W",
                        help=f"contour-class weights to decode with (default {WEIGHTS})")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/contour_decoding.json"))
    args = parser.parse_args()

    import numpy as np

    from napari_feddp.evaluation import predict_image
    from napari_feddp.inference.instances import contour_class_of, grow_markers, nuclei_from_classes, split_nuclei
    from napari_feddp.segmentation import load_model
    from napari_feddp.training._io import find_instance_map, read_image, read_instances
    from napari_feddp.training.dataset import find_pairs
    from napari_feddp.training.instance_metrics import instance_scores

    def cores_split(classes, mpp):
        """Interiors split by the distance watershed, then grown over the foreground."""
        foreground = nuclei_from_classes(classes, mpp, contour_class=2) > 0  # the product's speck filter
        return grow_markers(split_nuclei((classes == 1) & foreground, mpp), foreground)

    decoders = {
        "contours": lambda c, mpp: nuclei_from_classes(c, mpp, contour_class=2),
        "cores-split": cores_split,
        "foreground-split": lambda c, mpp: nuclei_from_classes((c > 0).astype(np.uint8), mpp),
    }
    pairs = find_pairs(args.data, source_mpp=args.mpp)
    truths = {p.name: read_instances(find_instance_map(args.data, p.name)) for p in pairs}
    images = {p.name: read_image(p.image_path) for p in pairs}
    rows, started = [], time.perf_counter()
    for spec in args.model:
        name, _, checkpoint = spec.partition("=")
        loaded = load_model(checkpoint)
        contour = contour_class_of(loaded.card.class_names)
        if contour != 2:
            raise SystemExit(f"{checkpoint}: not a contour model (classes {loaded.card.class_names})")
        for weight in args.weights:
            weighted = dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec, class_weights=(1.0, 1.0, weight)))
            predicted = {t: predict_image(images[t], weighted, mpp=args.mpp) for t in images}
            overlap = sum(int(((c > 0) & (truths[t] > 0)).sum()) for t, c in predicted.items())
            total = sum(int((c > 0).sum() + (truths[t] > 0).sum()) for t, c in predicted.items())
            for decoder, decode in decoders.items():
                scored = [instance_scores(truths[t], decode(c, args.mpp)) for t, c in predicted.items()]
                row = {"model": name, "weight": weight, "decoder": decoder,
                       "aji": statistics.fmean(s["aji"] for s in scored),
                       "pq": statistics.fmean(s["pq"] for s in scored), "pooled_dice": 2 * overlap / total}
                rows.append(row)
                print(f"{name} weight {weight} {decoder}: AJI {row['aji']:.4f} PQ {row['pq']:.4f} "
                      f"Dice {row['pooled_dice']:.4f}", flush=True)
    result = {
        "data": str(args.data), "tiles": sorted(images), "mpp": args.mpp,
        "models": dict(spec.partition("=")[::2] for spec in args.model), "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
