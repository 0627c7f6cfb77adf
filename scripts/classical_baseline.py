"""Score the colour-deconvolution pseudo-labeller (no learning) on a MoNuSeg split.

The rule that labels the public pretraining data
(:func:`napari_feddp.training.pseudo_labels.nuclei_pseudo_mask`: haematoxylin optical
density, Otsu threshold per image, physical size filters) applied directly to the test
images at their own 0.25 µm/px, scored like ``napari-feddp evaluate`` (pooled foreground
Dice / Jaccard, pixel accuracy). A classical reference row for ``docs/results.md``:
what the learnt models add beyond the stain itself.

    .venv/bin/python scripts/classical_baseline.py [--data DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from napari_feddp.evaluation import score_folder
from napari_feddp.training.pseudo_labels import nuclei_pseudo_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's experiments/ package


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="MoNuSeg split with images/ and masks/ (default: shared test)")
    parser.add_argument("--mpp", type=float, default=0.25, help="µm per pixel of the images")
    parser.add_argument("--json", default="benchmarks/results/classical_baseline_monuseg.json")
    args = parser.parse_args()
    if args.data is None:
        from experiments.runner import find_monuseg

        args.data = str(find_monuseg() / "test")
    def rule(image):
        return nuclei_pseudo_mask(image, mpp=args.mpp).astype("uint8")

    report = score_folder(args.data, rule, source_mpp=args.mpp)
    components = score_folder(args.data, rule, source_mpp=args.mpp, objects="components")
    result = {"method": "haematoxylin optical density, Otsu per image (nuclei_pseudo_mask), no learning",
              "data": str(args.data), "mpp": args.mpp, "dice": report.dice, "jaccard": report.jaccard,
              "accuracy": report.accuracy, "n_images": report.n_images, "per_image": report.per_image,
              "seconds": round(report.seconds, 1)}
    if report.instances is not None:  # object scores (instances/ present): watershed, and plain components
        result.update(report.instances)
        result["objects"] = report.objects
        result["components"] = {k: components.instances[k] for k in ("aji", "pq", "dq", "sq", "f1")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    objects = f"  AJI {result['aji']:.4f}  PQ {result['pq']:.4f}" if "aji" in result else ""
    print(f"Dice {result['dice']:.4f}  Jaccard {result['jaccard']:.4f}  Acc {result['accuracy']:.4f}{objects}  "
          f"({result['n_images']} images, {result['seconds']} s) -> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
