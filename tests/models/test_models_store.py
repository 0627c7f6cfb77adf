"""The lab's model store: which models a user can pick, what each card says, and what is the default."""

from __future__ import annotations

import json
import os
import sys

import pytest

from napari_feddp.models import CheckpointError
from napari_feddp.models.store import (
    REFUSED_FOLDER,
    available_models,
    bundled_checkpoint,
    describe_model,
    resolve_checkpoint,
)

from ..conftest import save_received_model


def test_bundled_model_is_listed_with_its_card(isolated_feddp_home):
    models = available_models()
    assert [m.source for m in models] == ["bundled"]
    bundled = models[0]
    assert bundled.path == bundled_checkpoint() == resolve_checkpoint(None)
    card = json.loads(bundled.path.with_suffix(".json").read_text())
    date = card["created"][:10]
    assert bundled.name == "feddp-nuclei" and bundled.date == date
    assert bundled.epsilon == pytest.approx(card["provenance"]["privacy"]["epsilon"]) and 0 < bundled.epsilon <= 8
    line = bundled.description
    assert "\n" not in line
    expected = f"feddp-nuclei · bundled · {date} · ε {bundled.epsilon:.2f} · test dice {card['metrics']['test_dice']:.3f}"
    assert line.startswith(expected)


def test_received_models_newest_first_then_bundled_refused_never(isolated_feddp_home):
    store = isolated_feddp_home / "models"
    older = save_received_model(store, "a", epsilon=2.0, test_dice=0.4)
    newer = save_received_model(store, "b", epsilon=5.5, test_dice=0.6)
    refused = save_received_model(store / REFUSED_FOLDER, "c")
    os.utime(older, (1_000_000, 1_000_000))  # mtime decides "newest", as for the default
    (store / "half.safetensors").write_bytes(b"")  # weights without a card: not a model

    models = available_models()
    assert [m.path for m in models] == [newer, older, bundled_checkpoint()]
    assert [m.source for m in models] == ["received", "received", "bundled"]
    assert models[0].path == resolve_checkpoint(None)  # the first entry is the default
    assert refused not in [m.path for m in models]
    assert models[0].description.startswith("federation-b (tiny-federated) · received · ")
    assert "ε 5.5" in models[0].description and "test dice 0.600" in models[0].description


def test_describe_model_reports_an_unreadable_card(tmp_path, tiny_checkpoint):
    (tmp_path / "bad.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    (tmp_path / "bad.json").write_text("{not json")
    info = describe_model(tmp_path / "bad.safetensors")
    assert info.source == "file" and info.name is None
    assert "invalid model card" in info.problem and "unusable" in info.description
    plain = describe_model(tiny_checkpoint)
    assert plain.problem is None and plain.privacy_text == "no DP" and plain.metrics_text == ""


def test_resolve_names_the_real_cause(tmp_path):
    with pytest.raises(CheckpointError, match=r"model file not found: .*missing\.safetensors"):
        resolve_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="is a folder, not a model checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "lonely.safetensors").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match="model card file is missing"):
        resolve_checkpoint(tmp_path / "lonely.safetensors")


def test_feddp_home_is_the_per_user_data_folder_unless_overridden(monkeypatch, tmp_path):
    from napari_feddp.models.store import feddp_home, model_store

    monkeypatch.setenv("FEDDP_HOME", str(tmp_path / "home"))
    assert feddp_home() == tmp_path / "home" and model_store() == tmp_path / "home" / "models"
    monkeypatch.delenv("FEDDP_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    if sys.platform.startswith("linux"):
        assert feddp_home() == tmp_path / "data" / "napari-feddp"
    assert feddp_home().name == "napari-feddp"
