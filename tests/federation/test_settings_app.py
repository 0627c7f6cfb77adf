"""Run/node settings and the generated Flower App directory."""

from __future__ import annotations

import io
import zipfile

import pytest

from napari_feddp.federation.app_bundle import CLIENT_APP_REF, SERVER_APP_REF, write_app_dir
from napari_feddp.federation.processes import format_node_config
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
    ],
)
def test_bad_run_settings_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_settings(**changes)


def test_node_settings_survive_the_supernode_command_line(tmp_path):
    from flwr.common.config import parse_config_args

    node = NodeSettings(lab="lab-a", data_dir=str(tmp_path / "my data"), max_epsilon=8.0, threads=2)
    parsed = parse_config_args([format_node_config(node.to_node_config())])
    assert NodeSettings.from_node_config(parsed) == node
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
