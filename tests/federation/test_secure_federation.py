"""Secure aggregation in a real federation: SuperLink + 4 SuperNodes over TLS, one killed mid-round.

Three labs train with DP-SGD; the fourth starts training and its SuperNode,
SuperExec and ClientApp are then killed (SIGKILL) after the SecAgg+ key exchange.
The round must finish with the three others, the dead lab's masks removed.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_feddp.federation.demo import make_synthetic_lab
from napari_feddp.federation.pilot import LabSpec, LocalFederation
from napari_feddp.models import load_checkpoint

from .conftest import HERE, tiny_settings, wait_no_processes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    marker = root / "crash-started"
    env = {"PYTHONPATH": str(HERE), "FEDDP_TEST_MARKER": str(marker)}
    labs = [LabSpec(name, make_synthetic_lab(root / "data" / name, n_tiles=4, size=32, seed=i))
            for i, name in enumerate(("lab-a", "lab-b", "lab-c"))]
    labs.append(LabSpec("crash", make_synthetic_lab(root / "data" / "crash", n_tiles=4, size=32, seed=7),
                        train_fn="fault_trainers:hang_until_killed", extra_env=env))
    result = {}
    with LocalFederation(workdir=root / "federation", labs=labs, keep_workdir=True) as fed:
        result["ids"] = {name: node.node_id for name, node in fed.supernodes.items()}
        killed = {}

        def kill_mid_round():
            if marker.exists() and "at" not in killed:
                fed.supernodes["crash"].kill()
                killed["at"] = time.monotonic()

        settings = tiny_settings(min_clients=3, num_rounds=2, round_timeout=30.0, checkpoint_dir=str(root / "run"))
        result["run"] = fed.run(settings, timeout=400, on_poll=kill_mid_round)
        result["killed"] = "at" in killed
    result["left"] = wait_no_processes(str(root / "federation"))
    return result


def test_a_secure_round_finishes_without_the_lab_killed_mid_round(secure_run):
    run, ids = secure_run["run"], secure_run["ids"]
    assert secure_run["killed"] and run.status == "finished:completed"
    honest = sorted(ids[name] for name in ("lab-a", "lab-b", "lab-c"))
    first = run.rounds[0]
    assert first["aggregated"] and first["aggregation"] == "secure-mean"
    assert sorted(first["accepted"]) == honest and str(ids["crash"]) in first["failed"]
    assert first["updates"] == {} and first["epsilon_max"] > 0
    assert all(r["aggregated"] for r in run.rounds)
    model, card = load_checkpoint(run.checkpoint_dir / "final.safetensors")
    start, _ = load_checkpoint(run.checkpoint_dir / "round-000.safetensors")
    moved = [np.abs(p.detach().numpy() - q.detach().numpy()).max() for p, q in zip(model.parameters(), start.parameters())]
    assert max(moved) > 0 and all(np.isfinite(moved))
    assert card.provenance.privacy.epsilon == pytest.approx(max(r["epsilon_max"] for r in run.rounds))


def test_nothing_is_left_running(secure_run):
    assert secure_run["left"] == []
