"""Choose the Adam learning rate of the DP and non-DP runs on training data only (not on test).

Proxy task: train on the pooled patches of four hospitals (h1-h4) for 400 steps of batch 8,
score on the fifth hospital's patches (h5-mixed, at 0.5 µm/px, pooled Dice): once without DP,
once with DP-SGD at the ε=8 noise multiplier of the grid (σ = 0.913, C = 1, Poisson sampling).
The MoNuSeg test split is never touched. Run from the repository root after the grid has
prepared its hospital patches (``python -m experiments run --out runs/monuseg ...``). It is
pinned to the shipped model's recipe (base width 16, batch 8)::

    .venv/bin/python scripts/select_dp_lr.py --hospitals runs/monuseg/hospitals

Writes ``benchmarks/results/dp_lr_selection.json`` (about 3 min per candidate on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's experiments/ package

TRAIN = ("h1-breast", "h2-kidney", "h3-liver", "h4-prostate")
VALIDATE = "h5-mixed"
CANDIDATES = [(0.913, 2e-3), (0.913, 1e-3), (0.913, 5e-4), (0.0, 2e-3), (0.0, 1e-3)]


def one(hospitals: Path, pooled: Path, sigma: float, lr: float, steps: int, work: Path) -> dict:
    from experiments.runner import Budget, train_direct
    from napari_feddp.evaluation import evaluate_folder
    from napari_feddp.segmentation import load_model

    # The shipped model's recipe: base width 16, batch 8.
    settings = Budget().settings.replace(learning_rate=lr, model_base_width=16, batch_size=8)
    started = time.monotonic()
    checkpoint = train_direct(pooled, steps, settings, 0, work, f"proxy-{sigma}-{lr}", noise=sigma or None)
    report = evaluate_folder(hospitals / VALIDATE, load_model(str(checkpoint)), mpp=settings.mpp)
    return {"sigma": sigma, "lr": lr, "steps": steps, "val_dice": report.dice, "val_jaccard": report.jaccard,
            "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hospitals", type=Path, default=Path("runs/monuseg/hospitals"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dp_lr_selection.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pooled = work / "train"
        for sub in ("images", "masks"):
            (pooled / sub).mkdir(parents=True)
            for h in TRAIN:
                for f in sorted((args.hospitals / h / sub).iterdir()):
                    (pooled / sub / f.name).symlink_to(f.resolve())
        for sigma, lr in CANDIDATES:
            rows.append(one(args.hospitals, pooled, sigma, lr, args.steps, work))
            print(json.dumps(rows[-1]), flush=True)
    best = {}
    for mode, sigma in (("dp", 0.913), ("no_dp", 0.0)):
        mine = [r for r in rows if r["sigma"] == sigma]
        best[mode] = max(mine, key=lambda r: r["val_dice"])["lr"]
    result = {"proxy": f"train {', '.join(TRAIN)} pooled, validate on {VALIDATE} patches",
              "command": "python scripts/select_dp_lr.py", "runs": rows, "best_lr": best}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"best lr: {best}; wrote {args.out}")


if __name__ == "__main__":
    main()
