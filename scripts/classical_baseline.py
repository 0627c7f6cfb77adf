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
import time
from pathlib import Path

from napari_feddp.training._io import read_image, read_mask
from napari_feddp.training.dataset import find_pairs
from napari_feddp.training.metrics import SegmentationMetrics, confusion_matrix, scores_from_confusion
from napari_feddp.training.pseudo_labels import nuclei_pseudo_mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="MoNuSeg split with images/ and masks/ (default: shared test)")
    parser.add_argument("--mpp", type=float, default=0.25, help="µm per pixel of the images")
    parser.add_argument("--json", default="benchmarks/results/classical_baseline_monuseg.json")
    args = parser.parse_args()
    if args.data is None:
        from napari_feddp.experiments.runner import _find_data

        args.data = str(_find_data() / "test")
    started = time.perf_counter()
    pooled = SegmentationMetrics(n_classes=2)
    per_image = []
    for pair in find_pairs(args.data, source_mpp=args.mpp):
        prediction = nuclei_pseudo_mask(read_image(pair.image_path), mpp=args.mpp).astype("uint8")
        matrix = confusion_matrix(prediction, read_mask(pair.mask_path, n_classes=2), 2)
        pooled.matrix += matrix
        s = scores_from_confusion(matrix)
        per_image.append({"name": pair.name, "dice": s["dice"], "jaccard": s["jaccard"],
                          "accuracy": s["pixel_accuracy"]})
    scores = pooled.compute()
    result = {"method": "haematoxylin optical density, Otsu per image (nuclei_pseudo_mask), no learning",
              "data": str(args.data), "mpp": args.mpp, "dice": scores["dice"], "jaccard": scores["jaccard"],
              "accuracy": scores["pixel_accuracy"], "n_images": len(per_image), "per_image": per_image,
              "seconds": round(time.perf_counter() - started, 1)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"Dice {result['dice']:.4f}  Jaccard {result['jaccard']:.4f}  Acc {result['accuracy']:.4f}  "
          f"({result['n_images']} images, {result['seconds']} s) -> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
