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
    from ..models import load_checkpoint, save_checkpoint
    from ..models.card import Privacy, Provenance

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


__all__ = ["LICENSE_NOTE", "bundle_default_model"]
