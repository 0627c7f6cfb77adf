"""`napari-feddp ledger show|reset`: what a dataset spent, and a reset that needs a reason and --yes."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from napari_feddp.cli import main
from napari_feddp.federation.demo import make_synthetic_lab
from napari_feddp.training import PrivacyLedger, dataset_fingerprint

ROUND = {"noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 8}


def _epsilon(rounds: int) -> float:
    accountant = RDPAccountant()
    for _ in range(rounds * ROUND["steps"]):
        accountant.step(noise_multiplier=ROUND["noise_multiplier"], sample_rate=ROUND["sample_rate"])
    return accountant.get_epsilon(1e-5)


@pytest.fixture
def trained(tmp_path):
    """A dataset with one recorded round under lab-a."""
    dataset = make_synthetic_lab(tmp_path / "data", n_tiles=3, size=16, seed=1)
    ledger_dir = tmp_path / "ledger"
    PrivacyLedger(ledger_dir, "lab-a", dataset_fingerprint(dataset), dataset_dir=dataset).record_round(**ROUND)
    return ledger_dir, dataset


def _args(ledger_dir, dataset, *more):
    return ["--ledger-dir", str(ledger_dir), "--dataset", str(dataset), *more]


def test_show_prints_epsilon_rounds_and_tiles(trained, capsys):
    ledger_dir, dataset = trained
    assert main(["ledger", "show", *_args(ledger_dir, dataset)]) == 0
    out = capsys.readouterr().out
    assert f"epsilon:    {_epsilon(1):.4f} at delta=1e-05 (rdp)" in out
    assert "rounds:     1" in out and "lab lab-a" in out
    assert "tiles:      3 trained, 0 never trained" in out and "tile000" in out

    assert main(["ledger", "show", *_args(ledger_dir, dataset), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["epsilon"] == pytest.approx(_epsilon(1)) and len(data["tiles"]) == 3
    assert all(t["n_rounds"] == 1 for t in data["tiles"])
    assert not (ledger_dir / "resets.jsonl").exists()  # showing writes nothing


def test_reset_needs_a_reason_and_yes(trained, capsys):
    ledger_dir, dataset = trained
    assert main(["ledger", "reset", *_args(ledger_dir, dataset), "--reason", "  ", "--yes"]) == 2
    assert "--reason: expected a non-empty explanation" in capsys.readouterr().err
    assert main(["ledger", "reset", *_args(ledger_dir, dataset), "--reason", "new cohort"]) == 2
    err = capsys.readouterr().err
    assert "not resetting without --yes: 3 tile(s)" in err and "Traceback" not in err
    assert not (ledger_dir / "resets.jsonl").exists()

    assert main(["ledger", "reset", *_args(ledger_dir, dataset), "--reason", "new cohort",
                 "--operator", "dr-x", "--yes"]) == 0
    out = capsys.readouterr().out
    assert "released 3 tile(s)" in out and f"spent epsilon {_epsilon(1):.4f}" in out
    (line,) = (ledger_dir / "resets.jsonl").read_text().splitlines()
    logged = json.loads(line)
    assert logged["reason"] == "new cohort" and logged["operator"] == "dr-x" and len(logged["tiles"]) == 3

    assert main(["ledger", "show", *_args(ledger_dir, dataset)]) == 0
    out = capsys.readouterr().out
    assert "epsilon:    0.0000" in out and "resets:     1" in out and "dr-x: new cohort" in out
    assert main(["ledger", "reset", *_args(ledger_dir, dataset), "--reason", "again", "--yes"]) == 2
    assert "nothing to reset" in capsys.readouterr().err


def test_user_errors_are_one_line(trained, tmp_path, capsys):
    ledger_dir, dataset = trained
    assert main(["ledger", "show", *_args(ledger_dir, tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-feddp ledger: error: ") and len(err.strip().splitlines()) == 1

    next(ledger_dir.glob("*/*.jsonl")).unlink()  # the dataset's marker says it trained
    assert main(["ledger", "show", *_args(ledger_dir, dataset)]) == 2
    err = capsys.readouterr().err
    assert "is missing, but dataset" in err and "Traceback" not in err
