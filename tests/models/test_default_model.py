"""The shipped default model: card matches weights, privacy claim, reproducible subset-3 scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from napari_feddp.cli import main
from napari_feddp.models import load_checkpoint, read_card
from napari_feddp.models.store import BUNDLED_STEM, bundled_checkpoint

from ..conftest import require_data

MODEL_DIR = Path(__file__).resolve().parents[2] / "src" / "napari_feddp" / "data" / "models"
WEIGHTS = MODEL_DIR / f"{BUNDLED_STEM}.safetensors"


def test_default_model_is_bundled_and_small():
    assert WEIGHTS.is_file() and WEIGHTS.with_suffix(".json").is_file()
    assert bundled_checkpoint() is not None
    assert WEIGHTS.stat().st_size < 10 * 1024 * 1024


def test_card_matches_weights():
    model, card = load_checkpoint(WEIGHTS)  # checks sha256 and tensor shapes against the card
    assert card.name == BUNDLED_STEM
    assert card.n_classes == 2 and card.class_names[0] == "background"
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == card.tensors
    assert model(torch.zeros(1, 3, card.input.tile_size, card.input.tile_size)).shape[1] == 2
    assert card.input.mpp == pytest.approx(0.5)


def test_card_privacy_claim_and_provenance():
    card = read_card(WEIGHTS)
    privacy = card.provenance.privacy
    assert privacy.dp_mode == "sample"
    assert privacy.epsilon is not None and 0 < privacy.epsilon <= 8.0
    assert privacy.delta == pytest.approx(1e-5)
    assert card.provenance.federated_rounds >= 1
    assert "CC BY-NC-SA 4.0" in card.provenance.license_note and "TCGA" in card.provenance.license_note
    for key in ("test_dice", "test_jaccard", "test_accuracy", "subset3_dice", "subset3_jaccard", "subset3_accuracy",
                "test_aji", "test_pq", "subset3_aji", "subset3_pq"):
        assert 0.0 <= card.metrics[key] <= 1.0
    assert "AJI" in card.description


def test_subset3_scores_are_reproduced(tmp_path):
    test_dir = require_data("monuseg/test")
    card = read_card(WEIGHTS)
    names = sorted(p.stem for p in (test_dir / "images").iterdir())[:3]
    out = tmp_path / "subset3.json"
    rc = main(["evaluate", "--data", str(test_dir), "--model", str(WEIGHTS), "--mpp", "0.25",
               "--json", str(out), "--only", *names])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["n_images"] == 3
    assert report["dice"] == pytest.approx(card.metrics["subset3_dice"], abs=1e-3)
    assert report["jaccard"] == pytest.approx(card.metrics["subset3_jaccard"], abs=1e-3)
    assert report["accuracy"] == pytest.approx(card.metrics["subset3_accuracy"], abs=1e-3)
    # The object scores on the card are those of the nuclei the product shows.
    assert report["aji"] == pytest.approx(card.metrics["subset3_aji"], abs=1e-3)
    assert report["pq"] == pytest.approx(card.metrics["subset3_pq"], abs=1e-3)
