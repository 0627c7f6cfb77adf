"""Choose the nucleus-splitting parameters of foreground-only models on training data only.

A foreground-only model predicts a nucleus mask; :func:`napari_feddp.inference.instances.split_nuclei`
turns it into one label per nucleus (distance-map smoothing, smallest distance between two nucleus
centres) after specks under ``min_area_um2`` are dropped. This script scores a grid of those
parameters on the held-out hospital h5-mixed (its six MoNuSeg *training* tiles, never the test
split) with models trained on the other four hospitals, and reports the candidate with the highest
AJI averaged over the models (PQ breaks ties). Each model predicts each tile once; only the
post-processing varies. Run from the repository root after the held-out runs
(``python -m experiments run --holdout h5-mixed ...``)::

    .venv/bin/python scripts/select_split_params.py \\
        --data runs/val-h5/fg/holdout-h5-mixed \\
        --model fedavg=runs/val-h5/fg/runs/fedavg-s0/checkpoints/final.safetensors ...

Writes ``benchmarks/results/split_selection.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

SMOOTHING_UM = (0.0, 0.25, 0.5, 1.0)
MIN_CENTRE_DISTANCE_UM = (0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
MIN_AREA_UM2 = (3.0,)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with images/, masks/ and instances/")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT",
                        help="a foreground-only checkpoint trained without the data's hospital (repeatable)")
    parser.add_argument("--mpp", type=float, default=0.25, help="the tiles' µm per pixel (MoNuSeg: 0.25)")
    parser.add_argument("--smoothing", type=float, nargs="+", default=SMOOTHING_UM, metavar="UM",
                        help=f"distance-map smoothing candidates (µm; default {SMOOTHING_UM})")
    parser.add_argument("--centres", type=float, nargs="+", default=MIN_CENTRE_DISTANCE_UM, metavar="UM",
                        help=f"smallest centre distance candidates (µm; default {MIN_CENTRE_DISTANCE_UM})")
    parser.add_argument("--areas", type=float, nargs="+", default=MIN_AREA_UM2, metavar="UM2",
                        help=f"speck size candidates (µm²; default {MIN_AREA_UM2})")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/split_selection.json"))
    args = parser.parse_args()

    import numpy as np

    from napari_feddp.evaluation import predict_image
    from napari_feddp.inference.instances import contour_class_of, nuclei_from_classes
    from napari_feddp.segmentation import load_model
    from napari_feddp.training._io import find_instance_map, read_image, read_instances
    from napari_feddp.training.dataset import find_pairs
    from napari_feddp.training.instance_metrics import instance_scores

    pairs = find_pairs(args.data, source_mpp=args.mpp)
    truths = {p.name: read_instances(find_instance_map(args.data, p.name)) for p in pairs}
    predicted: dict[str, dict[str, np.ndarray]] = {}
    for spec in args.model:
        name, _, checkpoint = spec.partition("=")
        loaded = load_model(checkpoint)
        if contour_class_of(loaded.card.class_names) is not None:
            raise SystemExit(f"{checkpoint}: a contour model; this script tunes foreground-only models")
        predicted[name] = {p.name: predict_image(read_image(p.image_path), loaded, mpp=args.mpp) for p in pairs}
        print(f"predicted {len(pairs)} tiles with {name}", flush=True)

    candidates = []
    started = time.perf_counter()
    for smoothing, distance, area in itertools.product(args.smoothing, args.centres, args.areas):
        per_model = {}
        for name, classes_by_tile in predicted.items():
            scored = [instance_scores(truths[t], nuclei_from_classes(c, args.mpp, min_area_um2=area,
                                                                      smoothing_um=smoothing,
                                                                      min_centre_distance_um=distance))
                      for t, c in classes_by_tile.items()]
            per_model[name] = {k: statistics.fmean(s[k] for s in scored) for k in ("aji", "pq")}
        row = {"smoothing_um": smoothing, "min_centre_distance_um": distance, "min_area_um2": area,
               "aji": statistics.fmean(m["aji"] for m in per_model.values()),
               "pq": statistics.fmean(m["pq"] for m in per_model.values()), "per_model": per_model}
        candidates.append(row)
        print(f"smoothing {smoothing} um, centres {distance} um, specks < {area} um2: "
              f"AJI {row['aji']:.4f} PQ {row['pq']:.4f}", flush=True)
    best = max(candidates, key=lambda r: (round(r["aji"], 4), r["pq"]))
    from napari_feddp.inference import instances

    product = (instances.SMOOTHING_UM, instances.MIN_CENTRE_DISTANCE_UM, instances.MIN_NUCLEUS_AREA_UM2)
    defaults = next((r for r in candidates
                     if (r["smoothing_um"], r["min_centre_distance_um"], r["min_area_um2"]) == product), None)
    result = {
        "data": str(args.data), "tiles": [p.name for p in pairs], "mpp": args.mpp,
        "models": dict(spec.partition("=")[::2] for spec in args.model),
        "rule": "best: the highest AJI averaged over the models (PQ breaks ties), held-out hospital only",
        "best": {k: best[k] for k in ("smoothing_um", "min_centre_distance_um", "min_area_um2", "aji", "pq")},
        "product_defaults": defaults and {k: defaults[k] for k in ("smoothing_um", "min_centre_distance_um",
                                                                    "min_area_um2", "aji", "pq")},
        "candidates": candidates,
        "seconds": round(time.perf_counter() - started, 1),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"best: {result['best']}\nproduct defaults: {result['product_defaults']}  -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
