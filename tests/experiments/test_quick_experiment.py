"""The reproduction harness, ``python -m experiments run --quick`` end to end (real Flower federation on loopback)."""

from __future__ import annotations

import json

import pytest

from experiments.cli import UsageError, main
from experiments.hospitals import HOSPITALS
from experiments.report import markdown_table, summarize
from napari_feddp.federation.sites import split_by_site

from ..conftest import require_data


def test_every_monuseg_train_tile_has_a_hospital():
    train = require_data("monuseg/train")
    names = [p.stem for p in (train / "images").iterdir()]
    groups = split_by_site(names, HOSPITALS)
    assert sum(len(v) for v in groups.values()) == len(names) == 30
    assert len(groups) >= 4 and all(groups.values())
    assert "TCGA-A7-A13E-01Z-00-DX1" in groups["h1-breast"]
    assert set(groups) == set(HOSPITALS)
    with pytest.raises(KeyError, match="TCGA site ZZ is not mapped"):
        split_by_site(["TCGA-ZZ-0000-01Z-00-DX1"], HOSPITALS)


def test_table_marks_missing_settings():
    rows = summarize({"fedavg": [{"dice": 0.5, "jaccard": 0.4, "accuracy": 0.8, "epsilon": None}],
                      "feddp-eps8": [{"dice": 0.45, "jaccard": 0.3, "accuracy": 0.7, "epsilon": 7.9}]})
    table = markdown_table(rows)
    assert "not run yet" in table and "-10.0 %" in table
    assert "Public pretraining" not in table  # a random-init grid has no initial-model row
    with_init = summarize({"pretrained": [{"dice": 0.6, "jaccard": 0.4, "accuracy": 0.8, "epsilon": None}]})
    assert "0 (public data only)" in markdown_table(with_init)


def test_privacy_cost_sweep_is_run_and_tabled_only_on_request():
    from experiments.runner import DP_EPSILONS, GRID, SWEEP_ONLY

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
    from experiments.runner import CLIP_ONLY_NOISE, SAMPLE_DP, SWEEP_ONLY, Budget, _relevant

    assert "feddp-clip" in SAMPLE_DP and "feddp-clip" in SWEEP_ONLY and CLIP_ONLY_NOISE < 1e-3
    # Its records depend on the DP-only budget fields, like every sample-level DP run.
    assert "dp_learning_rate" in _relevant(Budget().as_record(), "feddp-clip")
    rows = summarize({"fedavg": [{"dice": 0.5, "jaccard": 0.4, "accuracy": 0.8, "epsilon": None}],
                      "feddp-clip": [{"dice": 0.495, "jaccard": 0.4, "accuracy": 0.8, "epsilon": None}]})
    table = markdown_table(rows)
    assert "clipping only (diagnostic, no privacy) | 0.4950 | 0.4000 | 0.8000 | ∞ (no DP) | -1.0 % |" in table


def test_round_curves_follow_table_order_and_only_settings_with_epsilon_have_an_epsilon_curve():
    from experiments.report import round_series

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
    from experiments.report import plot_privacy_cost

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
def test_quick_experiment_end_to_end(tmp_path, capsys):
    data = require_data("monuseg")
    out = tmp_path / "quick"
    # FedAvg is left out to stay well under 4 minutes on a loaded 2-core CPU (it runs like feddp-eps8).
    quick = ["run", "--quick", "--out", str(out), "--data", str(data),
             "--settings", "pretrained", "centralized", "feddp-eps8", "--pretrain-steps", "2"]
    assert main(quick) == 0
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
    assert main(quick) == 0
    assert (out / "centralized-s0.json").stat().st_mtime_ns == mtime
    # ... and refuses to mix runs made with another budget into the same table.
    capsys.readouterr()
    assert main(["run", "--quick", "--out", str(out), "--data", str(data),
                 "--settings", "centralized", "--rounds", "2"]) == 2
    assert "another budget" in capsys.readouterr().err
    assert (out / "centralized-s0.json").stat().st_mtime_ns == mtime
    # The FedDP run ships as a default model with a card made from its record ...
    assert main(["bundle", "--record", str(out / "feddp-eps8-s0.json"),
                 "--dest", str(tmp_path / "model" / "feddp-nuclei"), "--data", str(data)]) == 0
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
    capsys.readouterr()
    assert main(["bundle", "--record", str(out / "centralized-s0.json"),
                 "--dest", str(tmp_path / "model" / "other"), "--data", str(data)]) == 2
    assert "sample-level FedDP" in capsys.readouterr().err
    assert not (tmp_path / "model" / "other.safetensors").exists()


def test_default_model_must_keep_the_epsilon_8_promise(tmp_path):
    """A sweep run (eps 32) or the clipping-only diagnostic (no epsilon) is refused before anything is scored."""
    from experiments.bundle import bundle_from_record

    for setting, epsilon, refusal in (("feddp-eps32", 31.68, "promises at most 8"),
                                      ("feddp-clip", None, "must come from a sample-level FedDP run")):
        record = tmp_path / f"{setting}-s0.json"
        record.write_text(json.dumps({"setting": setting, "dp_mode": "sample", "epsilon": epsilon, "delta": None,
                                      "checkpoint": str(tmp_path / "missing.safetensors"), "budget": {}}))
        with pytest.raises(ValueError, match=refusal):
            bundle_from_record(record, tmp_path / "model" / "feddp-nuclei", data=tmp_path)
    assert not (tmp_path / "model").exists()


def test_dp_runs_may_use_their_own_batch_at_the_same_crop_budget():
    from experiments.runner import Budget

    shared = Budget()
    dp = Budget(dp_batch_size=64, dp_local_steps=5).for_sample_dp()
    assert (dp.settings.batch_size, dp.settings.max_steps) == (64, 5)
    assert dp.total_steps * dp.settings.batch_size == shared.total_steps * shared.settings.batch_size
    assert Budget().for_sample_dp() == Budget()
    assert Budget(dp_learning_rate=1e-3).for_sample_dp().settings.learning_rate == 1e-3


def test_dp_only_budget_fields_do_not_invalidate_non_dp_runs(tmp_path):
    """A DP learning rate added to a grid keeps its FedAvg runs but not its FedDP runs."""
    from experiments.runner import Budget, _relevant

    old = Budget().as_record()
    new = {**old, "dp_learning_rate": 1e-3}
    assert _relevant(old, "fedavg") == _relevant(new, "fedavg")
    assert _relevant(old, "feddp-eps8") != _relevant(new, "feddp-eps8")


#: The budget of a run recorded by the grid (runs/monuseg-contour/fedavg-s0.json).
GRID_RECORD = {"rounds": 10, "local_steps": 10, "batch_size": 32, "crop_size": 128, "learning_rate": 0.002,
               "base_width": 8, "depth": 4, "groups": 8, "mpp": 0.5, "grid": 4, "delta": 1e-05,
               "max_grad_norm": 1.0, "update_clipping_norm": 1.0,
               "hospitals": ["h1-breast", "h2-kidney", "h3-liver", "h4-prostate", "h5-mixed"], "max_tiles": None,
               "test_names": None, "round_eval_names": None, "timeout": 5400.0, "dp_batch_size": None,
               "dp_local_steps": None, "dp_learning_rate": None, "dp_augmentations": None, "pretrain_steps": 0,
               "pretrain_data": None, "contours": True, "holdout": None}


def _budget(*flags):
    from experiments.cli import budget_of, build_parser

    return budget_of(build_parser().parse_args(["run", "--out", "unused", *flags]))


def test_recorded_runs_are_kept_by_the_options_that_made_them():
    from experiments.runner import same_budget

    assert _budget().as_record() == GRID_RECORD
    for setting in ("fedavg", "feddp-eps8"):
        assert same_budget(GRID_RECORD, _budget().as_record(), setting)
        assert not same_budget(GRID_RECORD, _budget("--rounds", "11").as_record(), setting)
    # The shipped model's recipe: two classes, base width 16, batch 8.
    shipped = {**GRID_RECORD, "base_width": 16, "batch_size": 8, "contours": False}
    recipe = _budget("--base-width", "16", "--batch-size", "8", "--foreground-only")
    assert same_budget(shipped, recipe.as_record(), "feddp-eps8")
    assert recipe.settings.unet_params == {"in_channels": 3, "n_classes": 2, "depth": 4, "base_width": 16, "groups": 8}
    assert not same_budget(shipped, _budget("--base-width", "16", "--batch-size", "8").as_record(), "feddp-eps8")
    # Records made before augmentation multiplicity and TNBC pretraining existed are kept for the
    # default budget, and refused by a grid that uses either.
    older = {k: v for k, v in GRID_RECORD.items() if k not in ("dp_augmentations", "pretrain_data")}
    assert same_budget(older, _budget().as_record(), "feddp-dist-eps8")
    many = _budget("--dp-augmentations", "4").as_record()
    assert many["dp_augmentations"] == 4 and _budget("--dp-augmentations", "1").as_record()["dp_augmentations"] is None
    assert not same_budget(older, many, "feddp-dist-eps8") and same_budget(older, many, "fedavg")
    tnbc = _budget("--foreground-only", "--pretrain-steps", "500", "--pretrain-data", "tnbc").as_record()
    assert tnbc["pretrain_data"] == "tnbc"
    assert not same_budget({**older, "contours": False, "pretrain_steps": 500}, tnbc, "fedavg")
    # Rim targets are recorded (and kept apart from outline models); foreground-only models have none.
    rim = _budget("--rim-fraction", "0.3")
    assert rim.settings.rim_fraction == 0.3 and rim.as_record() == {**GRID_RECORD, "rim_fraction": 0.3}
    assert not same_budget(GRID_RECORD, rim.as_record(), "centralized")
    with pytest.raises(UsageError, match="--rim-fraction: contour models only"):
        _budget("--rim-fraction", "0.3", "--foreground-only")
    with pytest.raises(UsageError, match="--rim-fraction"):
        _budget("--rim-fraction", "1")


def test_the_budget_records_every_shared_setting_it_changes():
    """Settings without a record key of their own are recorded where they differ from the default."""
    from dataclasses import replace

    from experiments.runner import Budget, same_budget

    budget = Budget()
    assert budget.settings.n_classes == 3 and replace(budget, contours=False).settings.n_classes == 2
    robust = replace(budget, settings=budget.settings.replace(aggregation="median"))
    assert robust.as_record() == {**GRID_RECORD, "aggregation": "median"}
    assert not same_budget(GRID_RECORD, robust.as_record(), "fedavg")


def test_runs_from_before_public_pretraining_count_as_random_init():
    """A kept record without ``pretrain_steps`` started from a random init: it matches
    ``--pretrain-steps 0`` and is refused by a grid that pretrains."""
    from dataclasses import replace

    from experiments.runner import Budget, same_budget

    old = Budget().as_record()
    del old["pretrain_steps"]
    assert Budget().pretrain_steps == 0  # the default budget
    assert same_budget(old, Budget().as_record(), "fedavg")
    assert not same_budget(old, replace(Budget(), pretrain_steps=500).as_record(), "fedavg")
    assert same_budget(Budget().as_record(), Budget().as_record(), "feddp-eps8")
    assert not same_budget(Budget().as_record(), replace(Budget(), pretrain_steps=100).as_record(), "feddp-eps8")


def test_negative_pretraining_steps_are_refused(tmp_path, capsys):
    assert main(["run", "--quick", "--out", str(tmp_path / "x"), "--pretrain-steps", "-1"]) == 2
    assert "--pretrain-steps: expected 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # Scoring the pretrained model of a grid that has none is refused too.
    assert main(["run", "--quick", "--out", str(tmp_path / "y"), "--settings", "pretrained",
                 "--data", str(require_data("monuseg"))]) == 2
    assert "--pretrain-steps N" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_holdout_validation_leaves_a_hospital_out_and_scores_on_its_training_tiles(tmp_path):
    from dataclasses import replace

    from experiments.runner import Budget, _holdout

    train = require_data("monuseg/train")
    budget = replace(Budget(), holdout="h5-mixed", round_eval_names=("a", "b"))
    kept, folder = _holdout(budget, train, tmp_path / "val")
    assert kept.hospitals == ("h1-breast", "h2-kidney", "h3-liver", "h4-prostate")
    stems = sorted(p.stem for p in (folder / "images").iterdir())
    assert stems == sorted(p.stem for p in (folder / "masks").iterdir())
    assert stems == split_by_site([p.stem for p in (train / "images").iterdir()], HOSPITALS)["h5-mixed"]
    assert len(stems) == 6
    # Per-round scoring follows the validation folder, never the test split.
    assert kept.round_eval_names == tuple(stems[:2])
    # Preparing the same folder twice is fine (a grid extended with more seeds).
    assert _holdout(budget, train, tmp_path / "val")[1] == folder
    with pytest.raises(ValueError, match="not one of the budget's hospitals"):
        _holdout(replace(Budget(), holdout="h9-moon"), train, tmp_path / "bad")


def test_bad_overrides_are_refused_before_anything_is_written(tmp_path, capsys):
    for flags, message in ((["--holdout", "h9-moon"], "--holdout: expected one of"),
                           (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
                           (["--base-width", "-8"], "--base-width: Input should be greater than or equal to 1"),
                           (["--rounds", "0"], "--rounds: Input should be greater than or equal to 1"),
                           (["--local-steps", "0"], "--local-steps: the budget counts local steps"),
                           (["--mpp", "0"], "--mpp: Input should be greater than 0"),
                           (["--settings", "feddp-eps99"], "unknown setting(s) ['feddp-eps99']")):
        assert main(["run", "--out", str(tmp_path / "x"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("dp_mode", "noise"), [("none", 1.0), ("update", 1.0), ("sample", 1e-4), ("sample", 2.3)])
def test_the_simulated_hospitals_accept_every_settings_mode_and_noise(tmp_path, dp_mode, noise):
    from experiments.runner import hospital_labs
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
