"""Turn a federated checkpoint into the package's default model (``data/models/feddp-nuclei``)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

LICENSE_NOTE = (
    "Weights trained on the MoNuSeg 2018 training set (Kumar et al., IEEE TMI 2017/2020; images from "
    "TCGA, https://monuseg.grand-challenge.org), licensed CC BY-NC-SA 4.0: non-commercial use, share "
    "alike, attribute MoNuSeg and TCGA. No image data is included in this package."
)


def bundle_default_model(checkpoint: str | os.PathLike, dest: str | os.PathLike, *, record: dict[str, Any],
                         metrics: dict[str, float], training_data: str, description: str) -> Path:
    """Copy ``checkpoint`` to ``dest`` (stem) with a completed model card.

    ``record`` is the runner's JSON of the run (epsilon, rounds, budget); ``metrics``
    go into ``card.metrics`` (test_dice, subset3_dice, ...).
    """
    from napari_feddp.models import load_checkpoint, save_checkpoint
    from napari_feddp.models.card import Privacy, Provenance

    model, card = load_checkpoint(checkpoint)
    epsilon = record.get("epsilon")
    privacy = Privacy(epsilon=float(epsilon), delta=float(record["delta"]), dp_mode=record["dp_mode"]) \
        if record.get("dp_mode") not in (None, "none") else Privacy()
    provenance = Provenance(
        training_data=training_data,
        federated_rounds=int(record["budget"]["rounds"]),
        round=int(record["budget"]["rounds"]),
        privacy=privacy,
        license_note=LICENSE_NOTE,
    )
    card = dataclasses.replace(card, name="feddp-nuclei", description=description, provenance=provenance,
                               metrics={k: float(v) for k, v in metrics.items()})
    return save_checkpoint(Path(dest).with_suffix(".safetensors"), model, card)


#: How the card's test metrics were computed (part of the shipped card's description).
METRICS_NOTE = ("pooled foreground Dice/Jaccard, pixel accuracy; AJI, PQ, DQ, SQ per tile, mean over tiles, "
                "on the nuclei the product shows")


def test_metrics(full: dict[str, Any], subset: dict[str, Any]) -> dict[str, float]:
    """Card metrics from two :func:`~experiments.runner.score` results."""
    from .runner import OBJECT_SCORES

    keys = ("dice", "jaccard", "accuracy", *OBJECT_SCORES)
    metrics = {f"test_{k}": full[k] for k in keys if k in full}
    metrics.update({f"subset3_{k}": subset[k] for k in keys if k in subset})
    return metrics


def rescore_default_model(dest: str | os.PathLike, *, data: str | os.PathLike | None = None) -> Path:
    """Score the shipped model again on the MoNuSeg test split and rewrite its card's metrics.

    The weights are unchanged; the card gains every metric :func:`test_metrics` gives
    (e.g. the object scores, once the test split has per-nucleus annotations).
    """
    from napari_feddp.models import load_checkpoint, save_checkpoint

    from .runner import find_monuseg, first_test_names, score

    checkpoint = Path(dest).with_suffix(".safetensors")
    model, card = load_checkpoint(checkpoint)
    test_dir = (Path(data) if data else find_monuseg()) / "test"
    metrics = test_metrics(score(checkpoint, test_dir, None), score(checkpoint, test_dir, first_test_names(test_dir, 3)))
    head = card.description.split(" Test metrics:")[0]
    description = (f"{head} Test metrics: MoNuSeg 2018 test split scored by `napari-feddp evaluate --mpp 0.25` "
                   f"({METRICS_NOTE}); subset3_*: the first 3 test images in sorted order.")
    card = dataclasses.replace(card, description=description, metrics={k: float(v) for k, v in metrics.items()})
    return save_checkpoint(checkpoint, model, card)


#: The privacy promise of the shipped model: sample-level epsilon per hospital dataset.
MAX_DEFAULT_EPSILON = 8.0


def bundle_from_record(record_path: str | os.PathLike, dest: str | os.PathLike, *,
                       data: str | os.PathLike | None = None) -> Path:
    """Ship the checkpoint of a runner record (``OUT/<setting>-s<seed>.json``) as the default model.

    The checkpoint is scored again on the whole MoNuSeg test split (card ``test_*``) and on its
    first 3 images in sorted order (``subset3_*``, what the tests re-score); the card's
    description and training-data text are written from the record's budget.
    """
    import json

    from .hospitals import HOSPITALS
    from .runner import find_monuseg, first_test_names, score

    record = json.loads(Path(record_path).read_text())
    if record.get("dp_mode") != "sample" or not record.get("epsilon"):
        raise ValueError(f"{record_path}: the default model must come from a sample-level FedDP run "
                         f"(dp_mode {record.get('dp_mode')!r})")
    if record["epsilon"] > MAX_DEFAULT_EPSILON:
        raise ValueError(f"{record_path}: the default model's run spent epsilon {record['epsilon']:.4g}; "
                         f"the shipped model promises at most {MAX_DEFAULT_EPSILON:g} per hospital")
    budget = record["budget"]
    checkpoint = Path(record["checkpoint"])
    test_dir = (Path(data) if data else find_monuseg()) / "test"
    full, subset = score(checkpoint, test_dir, None), score(checkpoint, test_dir, first_test_names(test_dir, 3))
    metrics = test_metrics(full, subset)
    sites = "; ".join(f"{h}: TCGA sites {', '.join(HOSPITALS[h])}" for h in budget["hospitals"])
    grid = budget["grid"]
    training_data = (
        f"MoNuSeg 2018 training split (30 H&E tiles, 1000x1000 at 0.25 um/px, TCGA), split by TCGA "
        f"tissue-source site / organ into {len(budget['hospitals'])} non-IID hospitals ({sites}); each tile "
        f"resampled to {budget['mpp']} um/px and cut into {grid}x{grid} patches (DP unit = one patch). "
        f"FedDP through Flower {len(budget['hospitals'])} SuperNodes, {budget['rounds']} rounds x "
        f"{record.get('dp_local_steps') or budget['local_steps']} local DP-SGD steps, batch "
        f"{record.get('dp_batch_size') or budget['batch_size']}, crop {budget['crop_size']}, Adam lr "
        f"{record.get('dp_learning_rate') or budget['learning_rate']}, noise multiplier {record['noise_multiplier']:.4f}, clip "
        f"{budget['max_grad_norm']}, seed {record['seed']}.")
    distributed = record.get("dp_noise") == "distributed"
    if distributed:
        steps = budget["rounds"] * (record.get("dp_local_steps") or budget["local_steps"])
        training_data = training_data.split("FedDP through Flower")[0] + (
            f"FedDP with distributed noise under secure aggregation (Flower SecAgg+, the product's ServerApp and "
            f"ClientApps run in one process): {steps} rounds of one DP-SGD step per hospital, batch "
            f"{record.get('dp_batch_size') or budget['batch_size']}, crop {budget['crop_size']}; each hospital adds "
            f"noise multiplier {record['noise_multiplier']:.4f} / sqrt({record['noise_split']}) to its clipped gradient "
            f"sum (clip {budget['max_grad_norm']}), the sum carries {record['noise_multiplier']:.4f}; server Adam lr "
            f"{record.get('dp_learning_rate') or budget['learning_rate']}, seed {record['seed']}.")
    if budget.get("pretrain_steps") and budget.get("pretrain_data") == "tnbc":
        training_data += (
            f" Initial model: {budget['pretrain_steps']} steps of public pretraining (no DP needed, no MoNuSeg "
            "data) on the TNBC nuclei set (Naylor et al. 2019, Institut Curie, 50 annotated tiles).")
    elif budget.get("pretrain_steps"):
        training_data += (
            f" Initial model: {budget['pretrain_steps']} steps of public pretraining (no DP needed, no MoNuSeg "
            "data) on the CC0 CMU-1-Small-Region sample slide with colour-deconvolution pseudo-labels "
            "(haematoxylin, Otsu).")
    description = (
        "Default nuclei (background / nucleus) GroupNorm U-Net of napari-feddp, trained with FedDP: federated "
        f"averaging over {len(budget['hospitals'])} simulated hospitals with sample-level DP-SGD (Opacus), "
        f"epsilon {record['epsilon']:.2f} at delta {record['delta']:g} per hospital dataset"
        + (f" (distributed noise: the epsilon holds if all {record['noise_split']} hospitals add their noise share "
           "and the coordinator follows SecAgg+)" if distributed else "") + ". Test metrics: "
        f"MoNuSeg 2018 test split ({full['n_images']} images) scored by `napari-feddp evaluate --mpp 0.25` "
        f"({METRICS_NOTE}); subset3_*: the first 3 test images in sorted order.")
    return bundle_default_model(checkpoint, dest, record=record, metrics=metrics, training_data=training_data,
                                description=description)


__all__ = ["LICENSE_NOTE", "bundle_default_model", "bundle_from_record", "rescore_default_model", "test_metrics"]
