"""``napari-feddp experiment run --quick`` end to end (real Flower federation on loopback)."""

from __future__ import annotations

import json

import pytest

from napari_feddp.experiments.hospitals import HOSPITALS, hospital_of, split_names
from napari_feddp.experiments.report import markdown_table, summarize

from ..conftest import require_data


def test_every_monuseg_train_tile_has_a_hospital():
    train = require_data("monuseg/train")
    names = [p.stem for p in (train / "images").iterdir()]
    groups = split_names(names)
    assert sum(len(v) for v in groups.values()) == len(names) == 30
    assert len(groups) >= 4 and all(groups.values())
    assert hospital_of("TCGA-A7-A13E-01Z-00-DX1") == "h1-breast"
    assert set(groups) == set(HOSPITALS)


def test_table_marks_missing_settings():
    rows = summarize({"fedavg": [{"dice": 0.5, "jaccard": 0.4, "accuracy": 0.8, "epsilon": None}],
                      "feddp-eps8": [{"dice": 0.45, "jaccard": 0.3, "accuracy": 0.7, "epsilon": 7.9}]})
    table = markdown_table(rows)
    assert "not run yet" in table and "-10.0 %" in table
    assert "Public pretraining" not in table  # a random-init grid has no initial-model row
    with_init = summarize({"pretrained": [{"dice": 0.6, "jaccard": 0.4, "accuracy": 0.8, "epsilon": None}]})
    assert "0 (public data only)" in markdown_table(with_init)


def test_privacy_cost_sweep_is_run_and_tabled_only_on_request():
    from napari_feddp.experiments.runner import DP_EPSILONS, GRID, SWEEP_ONLY

    assert set(SWEEP_ONLY).isdisjoint(GRID)
    assert {DP_EPSILONS[s] for s in SWEEP_ONLY if s in DP_EPSILONS} == {16.0, 32.0}
    grid_only = markdown_table(summarize({"fedavg": [{"dice": 0.5, "jaccard": 0.4, "accuracy": 0.8,
                                                      "epsilon": None}]}))
    assert "ε=16" not in grid_only and "ε=8 | not run yet" in grid_only
    swept = markdown_table(summarize({"fedavg": [{"dice": 0.5, "jaccard": 0.4, "accuracy": 0.8, "epsilon": None}],
                                      "feddp-eps16": [{"dice": 0.49, "jaccard": 0.3, "accuracy": 0.8,
                                                       "epsilon": 15.9}]}))
    assert "ε=16 (privacy-cost sweep) | 0.4900 |" in swept and "15.90" in swept and "-2.0 %" in swept


def test_clipping_only_diagnostic_is_a_sample_dp_setting_without_privacy():
    from dataclasses import asdict

    from napari_feddp.experiments.runner import CLIP_ONLY_NOISE, SAMPLE_DP, SWEEP_ONLY, Budget, _relevant

    assert "feddp-clip" in SAMPLE_DP and "feddp-clip" in SWEEP_ONLY and CLIP_ONLY_NOISE < 1e-3
    # Its records depend on the DP-only budget fields, like every sample-level DP run.
    assert "dp_learning_rate" in _relevant(asdict(Budget()), "feddp-clip")
    rows = summarize({"fedavg": [{"dice": 0.5, "jaccard": 0.4, "accuracy": 0.8, "epsilon": None}],
                      "feddp-clip": [{"dice": 0.495, "jaccard": 0.4, "accuracy": 0.8, "epsilon": None}]})
    table = markdown_table(rows)
    assert "clipping only (diagnostic, no privacy) | 0.4950 | 0.4000 | 0.8000 | ∞ (no DP) | -1.0 % |" in table


def test_round_curves_follow_table_order_and_only_settings_with_epsilon_have_an_epsilon_curve():
    from napari_feddp.experiments.report import round_series

    def record(setting, seed, epsilon):
        return {"setting": setting, "seed": seed, "rounds": [
            {"round": r, "epsilon": epsilon and epsilon * r, "test_subset": {"dice": 0.5 + 0.1 * r + 0.01 * seed}}
            for r in (1, 2)]}

    grouped = {"feddp-clip": [record("feddp-clip", 0, None)],
               "feddp-eps8": [record("feddp-eps8", s, 4.0) for s in (0, 1)],
               "fedavg": [{"setting": "fedavg", "seed": 0, "rounds": [{"round": 1, "epsilon": None,
                                                                     "test_subset": {"dice": 0.7}}]}]}
    dice = round_series(grouped, "dice")
    assert list(dice) == ["fedavg", "feddp-eps8", "feddp-clip"]
    assert dice["feddp-eps8"] == {1: [0.6, 0.61], 2: [0.7, 0.71]}
    assert round_series(grouped, "epsilon") == {"feddp-eps8": {1: [4.0, 4.0], 2: [8.0, 8.0]}}


def test_dice_vs_epsilon_plot_needs_two_epsilons(tmp_path):
    from napari_feddp.experiments.report import plot_privacy_cost

    def run(setting, dice, seeds):
        return [{"setting": setting, "seed": k, "dice": dice + k * 1e-3, "jaccard": 0.5, "accuracy": 0.9,
                 "epsilon": None} for k in range(seeds)]

    one = summarize({"fedavg": run("fedavg", 0.78, 2), "feddp-eps8": run("feddp-eps8", 0.76, 3)})
    assert plot_privacy_cost(one, tmp_path) is None and not list(tmp_path.iterdir())
    two = summarize({"fedavg": run("fedavg", 0.78, 2), "feddp-eps8": run("feddp-eps8", 0.76, 3),
                     "feddp-eps32": run("feddp-eps32", 0.775, 1)})
    path = plot_privacy_cost(two, tmp_path)
    assert path == tmp_path / "results_dice_vs_epsilon.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.slow
def test_quick_experiment_end_to_end(tmp_path, monkeypatch):
    data = require_data("monuseg")
    import argparse

    from napari_feddp.commands import experiment

    parser = argparse.ArgumentParser()  # the command module alone (works before cli registers it)
    experiment.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "quick"
    # FedAvg is left out to stay well under 4 minutes on a loaded 2-core CPU (it runs like feddp-eps8).
    args = parser.parse_args(["experiment", "run", "--quick", "--out", str(out), "--data", str(data),
                              "--settings", "pretrained", "centralized", "feddp-eps8", "--pretrain-steps", "2"])
    assert args.func(args) == 0
    # Every setting starts from the public-pretrained model, which is scored on its own too.
    init = json.loads((out / "pretrained-s0.json").read_text())
    assert init["pretrain_steps"] == 2 and init["total_steps"] == 0 and init["epsilon"] is None
    assert init["n_images"] == 2 and 0.0 <= init["dice"] <= 1.0
    from napari_feddp.models import load_checkpoint

    pretrained, _ = load_checkpoint(out / "pretrained" / "public-pretrained.safetensors")
    first_global, _ = load_checkpoint(out / "runs" / "feddp-eps8-s0" / "checkpoints" / "round-000.safetensors")
    for key, value in pretrained.state_dict().items():
        assert first_global.state_dict()[key].equal(value), key
    for setting in ("centralized", "feddp-eps8"):
        record = json.loads((out / f"{setting}-s0.json").read_text())
        assert record["n_images"] == 2
        assert 0.0 <= record["dice"] <= 1.0 and 0.0 <= record["accuracy"] <= 1.0
        assert 0.0 <= record["aji"] <= 1.0 and 0.0 <= record["pq"] <= 1.0  # object scores of every run
        assert record["total_steps"] == 1 * 2 * 2  # rounds x hospitals x local steps
    dp = json.loads((out / "feddp-eps8-s0.json").read_text())
    assert dp["dp_mode"] == "sample" and 0 < dp["epsilon"] <= 8.0
    assert json.loads((out / "centralized-s0.json").read_text())["epsilon"] is None
    table = (out / "table.md").read_text()
    assert "FedDP sample-level, ε=8" in table and "not run yet" in table
    assert (out / "results_epsilon_vs_round.png").is_file()
    assert (out / "results_dice_vs_round.png").is_file()
    # The same grid again keeps every finished run instead of training it again ...
    mtime = (out / "centralized-s0.json").stat().st_mtime_ns
    assert args.func(args) == 0
    assert (out / "centralized-s0.json").stat().st_mtime_ns == mtime
    # ... and refuses to mix runs made with another budget into the same table.
    from napari_feddp.commands import CommandError

    other = parser.parse_args(["experiment", "run", "--quick", "--out", str(out), "--data", str(data),
                               "--settings", "centralized", "--rounds", "2"])
    with pytest.raises(CommandError, match="another budget"):
        other.func(other)
    assert (out / "centralized-s0.json").stat().st_mtime_ns == mtime
    # The FedDP run ships as a default model with a card made from its record ...
    bundle = parser.parse_args(["experiment", "bundle", "--record", str(out / "feddp-eps8-s0.json"),
                                "--dest", str(tmp_path / "model" / "feddp-nuclei"), "--data", str(data)])
    assert bundle.func(bundle) == 0
    _, card = load_checkpoint(tmp_path / "model" / "feddp-nuclei.safetensors")
    assert card.provenance.privacy.epsilon == pytest.approx(dp["epsilon"])
    assert card.provenance.privacy.dp_mode == "sample" and card.provenance.federated_rounds == 1
    assert "1 rounds x 2 local DP-SGD steps" in card.provenance.training_data
    assert "2 steps of public pretraining" in card.provenance.training_data
    assert "CC BY-NC-SA 4.0" in card.provenance.license_note
    assert card.class_names == ["background", "nucleus", "contour"]  # the grid trains contour models
    keys = ("dice", "jaccard", "accuracy", "aji", "pq", "dq", "sq", "f1")  # object scores: test/ has instances/
    assert set(card.metrics) == {f"{s}_{k}" for s in ("test", "subset3") for k in keys}
    # ... and a run without sample-level DP is refused.
    refused = parser.parse_args(["experiment", "bundle", "--record", str(out / "centralized-s0.json"),
                                 "--dest", str(tmp_path / "model" / "other"), "--data", str(data)])
    with pytest.raises(CommandError, match="sample-level FedDP"):
        refused.func(refused)


def test_default_model_must_keep_the_epsilon_8_promise(tmp_path):
    """A sweep run (eps 32) or the clipping-only diagnostic (no epsilon) is refused before anything is scored."""
    from napari_feddp.experiments.bundle import bundle_from_record

    for setting, epsilon, refusal in (("feddp-eps32", 31.68, "promises at most 8"),
                                      ("feddp-clip", None, "must come from a sample-level FedDP run")):
        record = tmp_path / f"{setting}-s0.json"
        record.write_text(json.dumps({"setting": setting, "dp_mode": "sample", "epsilon": epsilon, "delta": None,
                                      "checkpoint": str(tmp_path / "missing.safetensors"), "budget": {}}))
        with pytest.raises(ValueError, match=refusal):
            bundle_from_record(record, tmp_path / "model" / "feddp-nuclei", data=tmp_path)
    assert not (tmp_path / "model").exists()


def test_dp_runs_may_use_their_own_batch_at_the_same_crop_budget():
    from napari_feddp.experiments.runner import Budget

    shared = Budget()
    dp = Budget(dp_batch_size=64, dp_local_steps=5).for_sample_dp()
    assert (dp.batch_size, dp.local_steps) == (64, 5)
    assert dp.total_steps * dp.batch_size == shared.total_steps * shared.batch_size
    assert Budget().for_sample_dp() == Budget()
    assert Budget(dp_learning_rate=1e-3).for_sample_dp().learning_rate == 1e-3


def test_dp_only_budget_fields_do_not_invalidate_non_dp_runs(tmp_path):
    """A DP learning rate added to a grid keeps its FedAvg runs but not its FedDP runs."""
    from dataclasses import asdict

    from napari_feddp.experiments.runner import Budget, _relevant

    old = json.loads(json.dumps({**asdict(Budget()), "hospitals": list(Budget().hospitals)}))
    new = {**old, "dp_learning_rate": 1e-3}
    assert _relevant(old, "fedavg") == _relevant(new, "fedavg")
    assert _relevant(old, "feddp-eps8") != _relevant(new, "feddp-eps8")


def test_runs_from_before_public_pretraining_count_as_random_init():
    """A kept record without ``pretrain_steps`` started from a random init: it matches
    ``--pretrain-steps 0`` and is refused by a grid that pretrains."""
    from dataclasses import asdict, replace

    from napari_feddp.experiments.runner import Budget, same_budget

    def as_recorded(budget):
        return json.loads(json.dumps({**asdict(budget), "hospitals": list(budget.hospitals)}))

    old = as_recorded(Budget())
    del old["pretrain_steps"]
    assert Budget().pretrain_steps == 0  # the headline recipe
    assert same_budget(old, as_recorded(Budget()), "fedavg")
    assert not same_budget(old, as_recorded(replace(Budget(), pretrain_steps=500)), "fedavg")
    assert same_budget(as_recorded(Budget()), as_recorded(Budget()), "feddp-eps8")
    assert not same_budget(as_recorded(Budget()), as_recorded(replace(Budget(), pretrain_steps=100)), "feddp-eps8")


def test_negative_pretraining_steps_are_refused(tmp_path):
    import argparse

    from napari_feddp.commands import CommandError, experiment

    parser = argparse.ArgumentParser()
    experiment.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["experiment", "run", "--quick", "--out", str(tmp_path / "x"), "--pretrain-steps", "-1"])
    with pytest.raises(CommandError, match="--pretrain-steps"):
        args.func(args)
    assert not (tmp_path / "x").exists()
    # Scoring the pretrained model of a grid that has none is refused too.
    args = parser.parse_args(["experiment", "run", "--quick", "--out", str(tmp_path / "y"), "--settings", "pretrained",
                              "--data", str(require_data("monuseg"))])
    with pytest.raises(CommandError, match="--pretrain-steps N"):
        args.func(args)
    assert not (tmp_path / "y").exists()


def test_holdout_validation_leaves_a_hospital_out_and_scores_on_its_training_tiles(tmp_path):
    from dataclasses import replace

    from napari_feddp.experiments.runner import Budget, _holdout

    train = require_data("monuseg/train")
    budget = replace(Budget(), holdout="h5-mixed", round_eval_names=("a", "b"))
    kept, folder = _holdout(budget, train, tmp_path / "val")
    assert kept.hospitals == ("h1-breast", "h2-kidney", "h3-liver", "h4-prostate")
    stems = sorted(p.stem for p in (folder / "images").iterdir())
    assert stems == sorted(p.stem for p in (folder / "masks").iterdir())
    assert stems == split_names([p.stem for p in (train / "images").iterdir()])["h5-mixed"]
    assert len(stems) == 6 and all(hospital_of(s) == "h5-mixed" for s in stems)
    # Per-round scoring follows the validation folder, never the test split.
    assert kept.round_eval_names == tuple(stems[:2])
    # Preparing the same folder twice is fine (a grid extended with more seeds).
    assert _holdout(budget, train, tmp_path / "val")[1] == folder
    with pytest.raises(ValueError, match="not one of the budget's hospitals"):
        _holdout(replace(Budget(), holdout="h9-moon"), train, tmp_path / "bad")


def test_bad_overrides_are_refused_before_anything_is_written(tmp_path):
    import argparse

    from napari_feddp.commands import CommandError, experiment

    parser = argparse.ArgumentParser()
    experiment.add_parser(parser.add_subparsers(dest="command"))
    for flags, message in ((["--holdout", "h9-moon"], "--holdout: expected one of"),
                           (["--batch-size", "0"], "--batch-size"), (["--base-width", "-8"], "--base-width")):
        args = parser.parse_args(["experiment", "run", "--out", str(tmp_path / "x"), *flags])
        with pytest.raises(CommandError, match=message):
            args.func(args)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("dp_mode", "noise"), [("none", 1.0), ("update", 1.0), ("sample", 1e-4), ("sample", 2.3)])
def test_the_simulated_hospitals_accept_every_settings_mode_and_noise(tmp_path, dp_mode, noise):
    from napari_feddp.experiments.runner import hospital_labs
    from napari_feddp.federation.policy import policy_refusal
    from napari_feddp.federation.settings import NodeSettings, RunSettings

    labs = hospital_labs(["h1", "h2"], {"h1": tmp_path, "h2": tmp_path}, dp_mode, 8.0)
    settings = RunSettings(dp_mode=dp_mode, noise_multiplier=noise, min_clients=2, crop_size=128,
                           model_base_width=8)
    for lab in labs:
        assert policy_refusal(settings, NodeSettings(**lab.policy)) is None
    # A lab left at its defaults would decline all but DP-SGD with enough noise.
    refused = policy_refusal(settings, NodeSettings())
    assert (refused is None) == (dp_mode == "sample" and noise >= 0.5)
