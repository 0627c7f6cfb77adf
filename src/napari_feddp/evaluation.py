"""Score a model on a folder of image/mask pairs with the tiled inference engine.

The engine a pathologist runs on a slide predicts each image, so the numbers describe what
users get. Dice and Jaccard are over the foreground classes and **pooled** over every pixel of
the set (one confusion matrix, then one score); pixel accuracy counts all pixels; a contour
pixel is a nucleus pixel. When the folder also holds ``instances/`` (one id per annotated
nucleus, as MoNuSeg's), the report adds the object scores of
:mod:`napari_feddp.training.instance_metrics` averaged over tiles, for the objects the product
shows (:func:`napari_feddp.inference.instances.nuclei_from_classes`; for a foreground-only
model ``objects="components"`` scores connected components instead).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from skimage.measure import label

from .inference import run_to_completion
from .inference.instances import contour_class_of, nuclei_from_classes
from .segmentation import LoadedModel, run_segmentation
from .training._io import find_instance_map, read_image, read_instances, read_mask
from .training.dataset import find_pairs, resample_instances
from .training.instance_metrics import instance_scores, mean_instance_scores
from .training.metrics import SegmentationMetrics, confusion_matrix, scores_from_confusion


@dataclass
class EvaluationReport:
    """Pooled and per-image scores of one model on one folder."""

    dice: float
    jaccard: float
    accuracy: float
    n_images: int
    per_image: list[dict[str, Any]] = field(default_factory=list)
    model: str = ""
    mpp: float | None = None
    seconds: float = 0.0
    #: Pooled confusion matrix (rows: truth, columns: prediction); not part of ``to_dict``.
    matrix: np.ndarray | None = field(default=None, repr=False)
    #: Object scores averaged over tiles (``aji``, ``pq``, ``dq``, ``sq``, ``f1``, counts), when
    #: the folder has ``instances/``.
    instances: dict[str, float] | None = None
    #: How predicted objects were made from the class map.
    objects: str = ""
    #: Whether the predictions used test-time augmentation.
    test_time_augmentation: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {
            "dice": self.dice, "jaccard": self.jaccard, "accuracy": self.accuracy,
            "n_images": self.n_images, "per_image": self.per_image, "model": self.model,
            "mpp": self.mpp, "seconds": round(self.seconds, 2), "test_time_augmentation": self.test_time_augmentation,
            "convention": "foreground Dice/Jaccard pooled over all pixels of the set; accuracy over all pixels",
        }
        if self.instances is not None:
            out.update(self.instances)
            out["instance_convention"] = (
                "AJI (Kumar 2017) and PQ/DQ/SQ (Kirillov 2019, match IoU > 0.5) per tile, mean over tiles; "
                f"predicted objects: {self.objects}"
            )
        return out


def evaluate_folder(
    data_dir: str | os.PathLike,
    loaded: LoadedModel,
    *,
    mpp: float | None = None,
    names: list[str] | None = None,
    batch_size: int = 8,
    device: str = "auto",
    augment: bool = False,
) -> EvaluationReport:
    """Predict every image in ``data_dir/images`` with ``loaded`` and score it against ``data_dir/masks``.

    ``mpp`` is the images' µm per pixel (default: the model's, i.e. no resampling); ``names``
    limits the run to these file stems; ``augment``: test-time augmentation (the engine's).
    """
    image_mpp = float(mpp) if mpp is not None else loaded.spec.mpp
    report = score_folder(
        data_dir,
        lambda image: predict_image(image, loaded, mpp=image_mpp, batch_size=batch_size, device=device,
                                    augment=augment),
        n_classes=loaded.card.n_classes, source_mpp=image_mpp, names=names,
        contour_class=contour_class_of(loaded.card.class_names),
    )
    report.model, report.mpp, report.test_time_augmentation = str(loaded.path), image_mpp, augment
    return report


def score_folder(
    data_dir: str | os.PathLike,
    predict: Callable[[np.ndarray], np.ndarray],
    *,
    n_classes: int = 2,
    source_mpp: float | None = None,
    names: list[str] | None = None,
    objects: str = "watershed",
    contour_class: int | None = None,
) -> EvaluationReport:
    """Score any predictor (RGB image -> class map of the same size) on a folder of pairs.

    The loop behind :func:`evaluate_folder`, also used for methods that are not a model (e.g.
    the colour-deconvolution baseline). ``contour_class``: the class index of nucleus contours
    for a contour model (``objects`` is then ignored). ``objects="watershed"`` needs
    ``source_mpp`` (distances are in micrometres); without it the components are scored.
    """
    started = time.perf_counter()
    pairs = find_pairs(data_dir, source_mpp=source_mpp or 1.0)
    if names is not None:
        wanted = set(names)
        missing = wanted - {p.name for p in pairs}
        if missing:
            raise ValueError(f"{data_dir}: no image/mask pair named {sorted(missing)}")
        pairs = [p for p in pairs if p.name in wanted]
    if contour_class is not None:
        n_classes = 2  # scored as nucleus (interior or contour) versus background
    pooled = SegmentationMetrics(n_classes=n_classes)
    if objects not in ("watershed", "components"):
        raise ValueError(f"objects: expected 'watershed' or 'components', received {objects!r}")
    if contour_class is not None and not source_mpp:
        raise ValueError("a contour model's nuclei need the pixel size: pass source_mpp")
    watershed = contour_class is not None or (objects == "watershed" and source_mpp)
    if contour_class is not None:
        described = "nuclei_from_classes: specks dropped, then interiors of the predicted contours grown to the contours"
    elif watershed:
        described = "nuclei_from_classes: specks dropped, then the nucleus class split by distance-transform watershed"
    else:
        described = "4-connected components of the nucleus class"
    per_image, per_tile_objects = [], []
    for pair in pairs:
        image = read_image(pair.image_path)
        truth = read_mask(pair.mask_path, n_classes=n_classes)
        classes = np.asarray(predict(image))
        prediction = (classes > 0).astype(np.uint8) if contour_class is not None else classes
        matrix = confusion_matrix(prediction, truth, n_classes)
        pooled.matrix += matrix
        scores = scores_from_confusion(matrix)
        row = {"name": pair.name, "dice": scores["dice"], "jaccard": scores["jaccard"],
               "accuracy": scores["pixel_accuracy"]}
        instance_path = find_instance_map(Path(data_dir), pair.name)
        if instance_path is not None:
            found = (nuclei_from_classes(classes, float(source_mpp), contour_class=contour_class) if watershed
                     else label(classes == 1, connectivity=1))
            scored = instance_scores(read_instances(instance_path), found)
            per_tile_objects.append(scored)
            row.update({k: scored[k] for k in ("aji", "pq", "dq", "sq")})
        per_image.append(row)
    if not per_image:
        raise ValueError(f"{data_dir}: no image/mask pairs to evaluate")
    scores = pooled.compute()
    if per_tile_objects and len(per_tile_objects) != len(per_image):
        raise ValueError(f"{Path(data_dir) / 'instances'}: instance maps for {len(per_tile_objects)} of {len(per_image)} tiles; "
                         "give one per tile or none")
    return EvaluationReport(
        dice=scores["dice"], jaccard=scores["jaccard"], accuracy=scores["pixel_accuracy"],
        n_images=len(per_image), per_image=per_image, mpp=source_mpp,
        seconds=time.perf_counter() - started, matrix=pooled.matrix,
        instances=mean_instance_scores(per_tile_objects) if per_tile_objects else None,
        objects=described if per_tile_objects else "",
    )


def predict_image(image: np.ndarray, loaded: LoadedModel, *, mpp: float | None, batch_size: int = 8,
                  device: str = "auto", augment: bool = False) -> np.ndarray:
    """Class map of ``image`` at its own resolution (every tile predicted, no tissue masking)."""
    generator = run_segmentation(image, loaded, mpp=mpp, tissue=False, batch_size=batch_size, device=device,
                                 augment=augment)
    result = run_to_completion(generator)
    labels = np.asarray(result.labels[:])
    if labels.shape != image.shape[:2]:
        labels = resample_instances(labels, image.shape[:2])
    return labels
