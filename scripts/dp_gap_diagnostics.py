"""Where does the FedDP Dice gap come from? Foreground bias versus discrimination.

For each experiment record given, scores its checkpoint on the MoNuSeg test split
(0.25 µm/px, the tiled engine, pooled over all pixels) and reports:

* ``fg_ratio``: predicted / true foreground pixels (1 = unbiased; > 1 over-segments),
  ``precision`` and ``recall`` of the nucleus class;
* ``dice_at_offset``: Dice after subtracting an offset from the nucleus logit (the
  model's ``head.bias[1]``), i.e. a stricter decision threshold.

This is an **explanation on the test split, never a selection**: no offset is applied
to any reported model (an offset would have to be chosen without test data, e.g. by a
DP-accounted federated calibration).

    .venv/bin/python scripts/dp_gap_diagnostics.py runs/monuseg-r10/{fedavg,feddp-eps8}-s{0,1,2}.json \
        --json benchmarks/results/dp_gap_diagnostics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's experiments/ package

OFFSETS = (0.0, 0.25, 0.5, 0.75, 1.0)


def diagnose(checkpoint: Path, test_dir: Path) -> dict:
    from napari_feddp.evaluation import evaluate_folder
    from napari_feddp.segmentation import load_model

    loaded = load_model(str(checkpoint))
    bias = loaded.model.head.bias
    original = bias.detach().clone()
    result: dict = {"dice_at_offset": {}}
    for offset in OFFSETS:
        with torch.no_grad():
            bias.copy_(original)
            bias[1] -= offset
        report = evaluate_folder(test_dir, loaded, mpp=0.25)
        result["dice_at_offset"][str(offset)] = report.dice
        if offset == 0.0:
            (_, fp), (fn, tp) = report.matrix.tolist()
            result.update(dice=report.dice, fg_ratio=(tp + fp) / (tp + fn), precision=tp / (tp + fp),
                          recall=tp / (tp + fn))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", help="runner records (OUT/<setting>-s<seed>.json)")
    parser.add_argument("--data", default=None, help="MoNuSeg folder with test/ (default: the shared data)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    from experiments.runner import find_monuseg

    test_dir = (Path(args.data) if args.data else find_monuseg()) / "test"
    rows = []
    for path in args.records:
        record = json.loads(Path(path).read_text())
        row = {"record": str(path), "setting": record["setting"], "seed": record["seed"],
               **diagnose(Path(record["checkpoint"]), test_dir)}
        rows.append(row)
        offsets = "  ".join(f"{k}: {v:.4f}" for k, v in row["dice_at_offset"].items())
        print(f"{path}: Dice {row['dice']:.4f}  fg ratio {row['fg_ratio']:.3f}  precision {row['precision']:.3f}"
              f"  recall {row['recall']:.3f}  | Dice at logit offset {offsets}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"offsets": list(OFFSETS), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
