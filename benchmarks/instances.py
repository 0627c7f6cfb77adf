"""Object-level results of the experiment grid side by side: one JSON per grid.

Run from the repository root after ``python -m experiments run --out GRID``::

    .venv/bin/python benchmarks/instances.py --grid runs/monuseg-contour

Writes ``benchmarks/results/instances.json`` (``--out`` to change)::

    {"classical": {...}, "classical_watershed": {...}, "centralized": {...}, "local_mean": {...},
     "fedavg": {...}, "feddp_eps1": {...}, "feddp_eps3": {...}, "feddp_eps8": {...}, "shipped": {...}}

each ``{"aji", "pq", "dq", "sq", "f1", "dice", "jaccard", "accuracy", "seeds"}``: means over the
grid's seeds on the MoNuSeg test split (14 tiles at 0.25 µm/px). Every checkpoint of the grid
is scored again in this run with :func:`napari_feddp.evaluation.evaluate_folder`, exactly as
``napari-feddp evaluate`` does, so all rows use the same code (``local_mean``: the mean over the
hospitals' own models). ``--foreground-grid`` adds the same rows of a grid of foreground-only
models under ``"foreground_only"``.
``classical`` is the haematoxylin rule (colour deconvolution, Otsu per image, no learning) with
4-connected components as nuclei; ``classical_watershed`` the same rule split by the
distance-transform watershed. ``shipped`` is the model bundled with the package, scored in the
same run. Settings the grid has not run are left out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's experiments/ package

KEYS = ("aji", "pq", "dq", "sq", "f1", "dice", "jaccard", "accuracy")
GRID_ROWS = {"centralized": "centralized", "local": "local_mean", "fedavg": "fedavg",
             "feddp-eps1": "feddp_eps1", "feddp-eps3": "feddp_eps3", "feddp-eps8": "feddp_eps8"}


def _row(report) -> dict:
    scores = {"dice": report.dice, "jaccard": report.jaccard, "accuracy": report.accuracy}
    scores.update({k: report.instances[k] for k in KEYS if k in report.instances})
    return {**scores, "seeds": None}


def _checkpoints(grid: Path, record: dict) -> list[Path]:
    if record["setting"] == "local":
        work = grid / "runs" / f"local-s{record['seed']}"
        return [work / f"local-{h}.safetensors" for h in record["per_hospital"]]
    return [Path(record["checkpoint"])]


def _grid_rows(grid: Path, data: Path) -> dict:
    from experiments.report import load_records
    from napari_feddp.evaluation import evaluate_folder
    from napari_feddp.segmentation import load_model

    rows = {}
    for setting, records in load_records(grid).items():
        if setting not in GRID_ROWS:
            continue
        per_seed = []
        for record in records:
            scored = [_row(evaluate_folder(data, load_model(str(c)), mpp=0.25)) for c in _checkpoints(grid, record)]
            per_seed.append({k: statistics.fmean(r[k] for r in scored) for k in KEYS})
            print(f"  {setting} seed {record['seed']}: AJI {per_seed[-1]['aji']:.4f} PQ {per_seed[-1]['pq']:.4f}",
                  flush=True)
        row = {k: statistics.fmean(r[k] for r in per_seed) for k in KEYS}
        if len(per_seed) > 1:
            row.update({f"{k}_std": statistics.stdev(r[k] for r in per_seed) for k in ("aji", "pq", "dice")})
        row["seeds"] = len(per_seed)
        row["minutes_per_run"] = round(statistics.fmean(r.get("seconds", 0) for r in records) / 60, 1)
        if records[0].get("epsilon") is not None:
            row["epsilon"] = max(r["epsilon"] for r in records)
        rows[GRID_ROWS[setting]] = row
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="output folder of `python -m experiments run`")
    parser.add_argument("--foreground-grid", default=None,
                        help="a grid of foreground-only models (`--foreground-only`), reported alongside")
    parser.add_argument("--data", default=None, help="MoNuSeg test split (default: the shared data)")
    parser.add_argument("--out", default="benchmarks/results/instances.json")
    args = parser.parse_args()

    from experiments.runner import find_monuseg
    from napari_feddp.evaluation import evaluate_folder, score_folder
    from napari_feddp.segmentation import load_model
    from napari_feddp.training.pseudo_labels import nuclei_pseudo_mask

    data = Path(args.data) if args.data else find_monuseg() / "test"
    if not (data / "instances").is_dir():
        raise SystemExit(f"{data}: no instances/ folder; object scores need per-nucleus annotations")

    def rule(image):
        return nuclei_pseudo_mask(image, mpp=0.25).astype("uint8")

    results = {
        "classical": _row(score_folder(data, rule, source_mpp=0.25, objects="components")),
        "classical_watershed": _row(score_folder(data, rule, source_mpp=0.25, objects="watershed")),
    }
    results.update(_grid_rows(Path(args.grid), data))
    shipped = load_model(None)
    results["shipped"] = {**_row(evaluate_folder(data, shipped, mpp=0.25)), "model": shipped.card.name,
                          "classes": shipped.card.class_names}
    if args.foreground_grid:
        results["foreground_only"] = _grid_rows(Path(args.foreground_grid), data)
    out = {
        **results,
        "meta": {
            "data": str(data), "grid": str(args.grid), "foreground_grid": args.foreground_grid,
            "mpp": 0.25, "n_images": 14,
            "convention": "AJI (Kumar 2017), PQ = DQ x SQ (Kirillov 2019, IoU > 0.5), F1 at IoU 0.5: per tile, "
                          "mean over tiles; Dice/Jaccard: nucleus vs background pooled over all pixels",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(), "machine": platform.machine(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for name, row in results.items():
        if name == "foreground_only":
            continue
        print(f"{name:20s} AJI {row.get('aji', float('nan')):.4f}  PQ {row.get('pq', float('nan')):.4f}  "
              f"Dice {row['dice']:.4f}  seeds {row['seeds']}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
