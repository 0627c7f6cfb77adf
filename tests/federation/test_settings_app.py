"""Run/node settings and the generated Flower App directory."""

from __future__ import annotations

import io
import zipfile

import pytest

from napari_feddp.federation.app_bundle import CLIENT_APP_REF, SERVER_APP_REF, write_app_dir
from napari_feddp.federation.lab import LabNode
from napari_feddp.federation.settings import NodeSettings, RunSettings

from .conftest import tiny_settings


def test_run_settings_round_trip_through_a_flower_run_config():
    settings = tiny_settings(dp_mode="update", checkpoint_dir="/tmp/x", final_evaluation=False)
    config = settings.to_run_config()
    assert config["dp-mode"] == "update" and config["num-rounds"] == 2
    assert all(isinstance(v, (bool, int, float, str)) for v in config.values())
    assert RunSettings.from_run_config(config) == settings
    # Flower may hand integers for floats and vice versa
    assert RunSettings.from_run_config({**config, "learning-rate": 1, "num-rounds": 3.0}).num_rounds == 3


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dp_mode": "local"}, "dp-mode"),
        ({"num_rounds": 0}, "num-rounds"),
        ({"min_updates": 4, "min_clients": 3}, "min-updates"),
        ({"crop_size": 33}, "multiple of 2"),
        ({"noise_multiplier": 0.0}, "noise-multiplier"),
        ({"fraction_train": 0.0}, "fraction-train"),
        ({"target_delta": 1.0}, "target-delta"),
        ({"rim_fraction": 1.0}, "rim-fraction"),
    ],
)
def test_bad_run_settings_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_settings(**changes)


def test_node_settings_survive_the_supernode_command_line(tmp_path):
    from flwr.common.config import parse_config_args

    data = tmp_path / "it's \"my\" data"  # both quotes, a space: no quoting rule to break
    lab = LabNode("127.0.0.1:1", None, None, data, lab="lab-a", workdir=tmp_path / "lab", threads=2, insecure=True)
    parsed = parse_config_args([str(lab.write_node_config())])  # what flower-supernode --node-config does
    node = NodeSettings.from_node_config(parsed)
    assert node == lab.settings() and node.data_dir == str(data) and node.max_epsilon == 8.0
    assert node.epsilon_budget == 8.0 and NodeSettings(max_epsilon=0).epsilon_budget is None
    assert NodeSettings().epsilon_budget == 8.0  # a lab that sets nothing has a budget


def test_generated_app_is_a_valid_flower_app_with_nothing_to_install(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    app = write_app_dir(tmp_path / "app", tiny_settings(checkpoint_dir=str(tmp_path / "ckpt")))
    config, _warnings = load_and_validate(app / "pyproject.toml", check_module=True)
    assert config["tool"]["flwr"]["app"]["components"] == {
        "serverapp": SERVER_APP_REF,
        "clientapp": CLIENT_APP_REF,
    }
    assert config["project"]["dependencies"] == []
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert RunSettings.from_run_config(run_config).checkpoint_dir == str(tmp_path / "ckpt")
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert sorted(n for n in names if not n.startswith(".info")) == ["pyproject.toml"]


def _parse(*argv: str):
    from napari_feddp import cli

    return cli.build_parser().parse_args(["federation", *argv])


def test_cli_options_are_the_run_settings(tmp_path):
    from napari_feddp.commands.federation import _settings

    settings = _settings(_parse("run", "--checkpoint-dir", str(tmp_path)), tmp_path)
    # A coordinator's command asks for more rounds and longer waits than a run built in code.
    assert settings == RunSettings(num_rounds=10, learning_rate=0.001, source_mpp=0.25, round_timeout=1800.0,
                                   node_wait_timeout=600.0, checkpoint_dir=str(tmp_path.resolve()))
    typed = _settings(_parse("run", "--checkpoint-dir", "c", "--rounds", "3", "--lr", "0.02", "--delta", "1e-6",
                             "--depth", "3", "--base-width", "12", "--aggregation", "median",
                             "--no-final-evaluation"), tmp_path)
    assert (typed.num_rounds, typed.learning_rate, typed.target_delta, typed.model_depth) == (3, 0.02, 1e-6, 3)
    assert typed.model_groups == 4 and typed.aggregation == "median" and not typed.final_evaluation
    demo = _parse("demo")
    assert (demo.rounds, demo.max_steps, demo.depth, demo.base_width) == (2, 3, 3, 8)


def test_cli_refuses_bad_values_naming_the_flag(tmp_path):
    from napari_feddp.commands import CommandError
    from napari_feddp.commands.federation import _settings

    with pytest.raises(CommandError, match=r"--rounds: .*greater than or equal to 1(.|\n)*--delta: .*less than 1"):
        _settings(_parse("run", "--checkpoint-dir", "c", "--rounds", "0", "--delta", "2"), tmp_path)
    with pytest.raises(CommandError, match="crop-size 33 must be a multiple of 8"):
        _settings(_parse("run", "--checkpoint-dir", "c", "--crop-size", "33"), tmp_path)


def test_join_policy_options_are_the_node_policy_fields():
    from napari_feddp.commands.federation import policy_from_args

    policy = policy_from_args(_parse("join", "--superlink", "h:1", "--dataset", "d", "--max-delta", "1e-6",
                                     "--max-crop-size", "128"))
    node = NodeSettings(**policy)
    assert node.max_delta == 1e-6 and node.max_crop_size == 128 and node.max_epsilon == 8.0
    assert NodeSettings(**policy_from_args(_parse("join", "--superlink", "h:1", "--dataset", "d"))) == NodeSettings()
    for bad in ({"max_delta": 1.0}, {"max_epsilon": -1.0}, {"threads": 0}):
        with pytest.raises(ValueError, match=next(iter(bad)).replace("_", "-")):
            NodeSettings(**bad)


def test_a_labs_round_is_trained_as_the_run_asks_within_the_labs_policy():
    node = NodeSettings(max_delta=1e-6, max_epsilon=4.0)
    config = tiny_settings(max_steps=5).train_config(node, learning_rate=0.5)
    assert (config.steps, config.epochs, config.lr, config.batch_size, config.crop_size) == (5, None, 0.5, 2, 32)
    assert (config.delta, config.epsilon_max, config.noise_multiplier, config.seed) == (1e-6, 4.0, 1.0, None)
    plain = tiny_settings(dp_mode="none", max_steps=0, local_epochs=2).train_config(NodeSettings())
    assert plain.dp_mode == "none" and plain.epsilon_max is None and plain.epochs == 2 and plain.lr == 0.01


def test_settings_values_are_never_booleans_and_integers_stay_whole():
    with pytest.raises(ValueError, match="num-rounds: only on/off settings take a boolean"):
        RunSettings(num_rounds=True)
    with pytest.raises(ValueError, match="num-rounds"):
        RunSettings.from_run_config({"num-rounds": 2.5})
    assert RunSettings.from_run_config({"final-evaluation": "false"}).final_evaluation is False


def test_a_lab_builds_its_contour_targets_with_the_runs_rim_fraction(tmp_path):
    import numpy as np
    from PIL import Image

    from napari_feddp.federation.local import LocalRequest, _dataset
    from napari_feddp.training.dataset import contour_target

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 8:40] = 255
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    settings = tiny_settings(n_classes=3, rim_fraction=0.5, mpp=0.5, source_mpp=0.5)
    assert RunSettings.from_run_config(settings.to_run_config()).rim_fraction == 0.5
    request = LocalRequest(model=None, settings=settings, node=NodeSettings(data_dir=str(tmp_path)), server_round=1)
    _, target = _dataset(request, "train").load_tile(0)
    assert np.array_equal(target, contour_target((mask > 0).astype(np.int32), 0.5))
    assert (target == 1).sum() < (contour_target((mask > 0).astype(np.int32)) == 1).sum()
