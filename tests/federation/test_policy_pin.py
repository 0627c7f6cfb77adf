"""Lab-side defences in-process: the app pin refuses foreign bundles, the lab policy refuses runs."""

from __future__ import annotations

import io
import json
import math
import zipfile

import pytest
import torch
from flwr.app import ArrayRecord

from napari_feddp.federation import client_app
from napari_feddp.federation.app_bundle import render_pyproject, write_app_dir
from napari_feddp.federation.app_pin import UntrustedAppError, check_fab, install_pin, installed_version, write_launcher
from napari_feddp.federation.local import build_model
from napari_feddp.federation.policy import describe_policy, policy_refusal
from napari_feddp.federation.settings import NodeSettings

from .conftest import context, instruction, tiny_settings


def _fab(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(".info/CONTENT", "")
    return buffer.getvalue()


def test_the_bundle_napari_feddp_builds_is_accepted(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    app = write_app_dir(tmp_path / "app", tiny_settings())
    pyproject = check_fab(build_fab_from_disk(app))
    assert pyproject["project"]["version"] == installed_version()


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda p, f: f.update({"evil.py": "print('hi')"}), "carries files of its own"),
        (lambda p, f: f.update({"napari_feddp/__init__.py": ""}), "carries files of its own"),
        (lambda p, f: f.update({"pyproject.toml": p.replace("napari_feddp.federation.client_app:app",
                                                             "napari_feddp.federation.local:load_function")}),
         "clientapp"),
        (lambda p, f: f.update({"pyproject.toml": p.replace('publisher = "napari-feddp"', 'publisher = "x"')}),
         "publisher"),
        (lambda p, f: f.update({"pyproject.toml": p.replace(f'version = "{installed_version()}"',
                                                             'version = "0.0.1"')}), "same version"),
        (lambda p, f: f.update({"pyproject.toml": p.replace("dependencies = []", 'dependencies = ["evil"]')}),
         "dependencies"),
        (lambda p, f: f.pop("pyproject.toml"), "no pyproject.toml"),
        (lambda p, f: f.update({"pyproject.toml": "[project\n"}), "unreadable"),
    ],
)
def test_anything_else_is_refused(edit, reason):
    pyproject = render_pyproject(tiny_settings())
    files = {"pyproject.toml": pyproject}
    edit(pyproject, files)
    with pytest.raises(UntrustedAppError, match=reason):
        check_fab(_fab(files))


def test_not_a_zip_is_refused():
    with pytest.raises(UntrustedAppError, match="not a valid FAB"):
        check_fab(b"PK\x03\x04 certainly not a zip")


def test_the_pin_refuses_before_flower_installs_and_records_why(tmp_path, monkeypatch):
    from flwr.supernode.runtime import run_clientapp as runner

    history = tmp_path / "history.jsonl"
    monkeypatch.setenv("NAPARI_FEDDP_HISTORY_FILE", str(history))
    monkeypatch.setattr(runner, "install_from_fab", runner.install_from_fab)  # restored after the test
    install_pin()
    with pytest.raises(UntrustedAppError):
        runner.install_from_fab(_fab({"pyproject.toml": "x = 1", "evil.py": ""}), skip_prompt=True)
    row = json.loads(history.read_text())
    assert row["event"] == "refused-app" and "evil.py" in row["reason"]
    assert not (tmp_path / "apps").exists()


def test_the_launcher_the_lab_superexec_finds_is_flowers_clientapp_with_the_pin(tmp_path):
    import stat
    import subprocess

    launcher = write_launcher(tmp_path / "bin")
    assert launcher.name == "flwr-clientapp" and stat.S_IMODE(launcher.stat().st_mode) == 0o700
    assert "run_pinned_clientapp" in launcher.read_text()
    done = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and "usage: flwr-clientapp" in done.stdout, done.stderr


# ----------------------------------------------------------------------------------- policy


@pytest.fixture
def node(tmp_path, lab_dir) -> NodeSettings:
    return NodeSettings(lab="lab-a", data_dir=str(lab_dir), ledger_dir=str(tmp_path / "ledger"),
                        history_file=str(tmp_path / "history.jsonl"), max_epsilon=0)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"dp_mode": "none"}, "dp-mode 'none' is not accepted"),
        ({"dp_mode": "update"}, "dp-mode 'update' is not accepted"),
        ({"target_delta": 0.9}, "target-delta 0.9 is above"),
        ({"noise_multiplier": 0.01}, "noise-multiplier 0.01 is below"),
        ({"model_base_width": 1024, "model_groups": 8}, "parameters, above"),
        ({"model_base_width": 65536, "model_groups": 8}, "width 65536 is out of range"),
        ({"max_steps": 10**6}, "max-steps 1000000 is above"),
        ({"crop_size": 4096}, "crop-size 4096 is above"),
        ({"batch_size": 4096}, "batch-size 4096 is above"),
        ({"batch_size": 16, "augmentation_multiplicity": 8}, "x augmentation-multiplicity 8 = 128 crops per step"),
    ],
)
def test_a_run_outside_the_lab_policy_is_declined_before_training(node, tmp_path, changes, reason):
    settings = tiny_settings(**changes)
    assert reason in policy_refusal(settings, node)
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model(tiny_settings()).state_dict())  # never loaded: declined first
    reply = client_app.train(instruction(arrays, {"server-round": 3}), context(settings, node))
    metrics = reply.content.metric_records["metrics"]
    assert metrics["declined"] == 1.0 and not reply.content.array_records
    assert reason in reply.content.config_records["reason"]["reason"]
    row = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])
    assert row["event"] == "declined" and row["round"] == 3
    assert not (tmp_path / "ledger").exists()  # nothing trained, nothing spent


def test_the_policy_decides_evaluation_too(node):
    settings = tiny_settings(model_base_width=1024)
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model(tiny_settings()).state_dict())
    reply = client_app.evaluate(instruction(arrays, {"server-round": 1}, message_type="evaluate"),
                                context(settings, node))
    assert reply.has_error() and "parameters, above" in reply.error.reason


def test_an_invalid_run_config_is_declined_not_a_crash(node):
    settings = tiny_settings()
    ctx = context(settings, node)
    ctx.run_config["target-delta"] = 1.5
    arrays = ArrayRecord(build_model(settings).state_dict())
    reply = client_app.train(instruction(arrays, {"server-round": 1}), ctx)
    assert reply.content.metric_records["metrics"]["declined"] == 1.0
    assert "invalid run config" in reply.content.config_records["reason"]["reason"]


def test_a_lab_that_accepts_a_mode_trains_under_it(node):
    lenient = NodeSettings(**{**node.__dict__, "accept_dp_modes": "sample,none"})
    assert policy_refusal(tiny_settings(dp_mode="none", batch_size=lenient.min_clear_batch_size), lenient) is None
    with pytest.raises(ValueError, match="unknown mode"):
        policy_refusal(tiny_settings(), NodeSettings(accept_dp_modes="sample,maybe"))


@pytest.mark.parametrize("mode", ["none", "update"])
def test_an_update_without_dp_noise_must_mix_several_tiles(node, mode):
    """A coordinator cannot ask a lab that accepts un-noised updates for one-tile batches (easiest to invert)."""
    lenient = NodeSettings(**{**node.__dict__, "accept_dp_modes": f"sample,{mode}"})
    assert lenient.min_clear_batch_size == 4
    reason = policy_refusal(tiny_settings(dp_mode=mode, batch_size=1), lenient)
    assert reason == (f"lab policy: batch-size 1 without DP-SGD noise (dp-mode {mode}) is below this lab's "
                      "minimum 4")
    assert policy_refusal(tiny_settings(dp_mode=mode, batch_size=4), lenient) is None
    assert policy_refusal(tiny_settings(dp_mode="sample", batch_size=1), lenient) is None  # DP-SGD bounds any batch
    trusting = NodeSettings(**{**lenient.__dict__, "min_clear_batch_size": 1})
    assert policy_refusal(tiny_settings(dp_mode=mode, batch_size=1), trusting) is None


def test_the_policy_is_described_in_one_line():
    text = describe_policy(NodeSettings())
    assert "epsilon budget 8 at delta <= 1e-05" in text and "DP modes sample" in text
    assert "unlimited" in describe_policy(NodeSettings(max_epsilon=0))
    assert math.isfinite(NodeSettings().max_delta)


def test_a_refused_bundle_shows_as_the_labs_status(joined_lab):
    joined_lab.history_file.write_text(json.dumps({"event": "refused-app", "reason": "the app bundle carries "
                                                   "files of its own (evil.py)"}) + "\n")
    status = joined_lab.status()
    assert status.state == "refused" and "evil.py" in status.message


@pytest.mark.parametrize(
    ("rows", "state", "round_", "text"),
    [
        ([], "waiting", None, ""),
        ([{"event": "training", "round": 3}], "training", 3, ""),
        ([{"event": "declined", "round": 4, "reason": "next round would reach epsilon 9.0 > budget 8.0"}],
         "declined", 4, "next round would reach epsilon 9.0 > budget 8.0"),
        ([{"event": "trained", "round": 4}], "waiting", 4, ""),
        ([{"event": "evaluating", "round": 5}], "evaluating", 5, ""),
        ([{"event": "model-refused", "round": 5, "reason": "Dice 0.10 < 0.90 - 0.02"},
          {"event": "evaluated", "round": 5, "final": True}], "finished", 5, "was not adopted: Dice 0.10"),
    ],
)
def test_the_labs_status_comes_from_its_history(joined_lab, rows, state, round_, text):
    joined_lab.history_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    status = joined_lab.status()
    assert (status.state, status.round) == (state, round_) and text in status.message
