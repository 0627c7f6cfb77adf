"""A real federation with misbehaving labs: the run goes on without them.

One federation (SuperLink + 4 SuperNodes, TLS, node authentication) serves
every test in this module:

* ``good``  trains with DP-SGD (default trainer),
* ``nan``   sends weights full of NaN,
* ``poor``  has a privacy budget too small for one round and declines,
* ``crash`` starts training and is then killed (SIGKILL of its SuperNode,
  SuperExec and ClientApp) in the middle of round 1,

plus two intruders (an unregistered key, no key) that the SuperLink refuses.
A second run resumes from the first run's final checkpoint.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from napari_feddp.federation.demo import make_synthetic_lab
from napari_feddp.federation.lab import LabNode
from napari_feddp.federation.pilot import LabSpec, LocalFederation
from napari_feddp.federation.processes import FederationProcessError
from napari_feddp.models import load_checkpoint

from .conftest import HERE, tiny_settings, wait_no_processes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    marker = root / "crash-started"
    env = {"PYTHONPATH": str(HERE), "FEDDP_TEST_MARKER": str(marker)}
    labs = [
        LabSpec("good", make_synthetic_lab(root / "data" / "good", n_tiles=4, size=32, seed=1)),
        LabSpec("nan", make_synthetic_lab(root / "data" / "nan", n_tiles=4, size=32, seed=2),
                train_fn="fault_trainers:nan_update", extra_env=env),
        LabSpec("poor", make_synthetic_lab(root / "data" / "poor", n_tiles=4, size=32, seed=3),
                max_epsilon=0.5),
        LabSpec("crash", make_synthetic_lab(root / "data" / "crash", n_tiles=4, size=32, seed=4),
                train_fn="fault_trainers:hang_until_killed", extra_env=env),
    ]
    result = {"root": root}
    with LocalFederation(workdir=root / "federation", labs=labs, keep_workdir=True) as fed:
        result["ids"] = {name: node.node_id for name, node in fed.supernodes.items()}
        result["intruders"] = _intruders(fed, root)
        killed = {}

        def kill_crash_lab_mid_round():
            if marker.exists() and "at" not in killed:
                fed.supernodes["crash"].kill()
                killed["at"] = time.monotonic()

        settings = tiny_settings(min_clients=2, round_timeout=40.0,
                                 checkpoint_dir=str(root / "run1"))
        result["run1"] = fed.run(settings, timeout=400, on_poll=kill_crash_lab_mid_round)
        result["killed"] = "at" in killed
        resumed = tiny_settings(min_clients=2, num_rounds=1, final_evaluation=False, round_timeout=40.0,
                                checkpoint_dir=str(root / "run2"),
                                resume_from=str(root / "run1" / "final.safetensors"))
        result["run2"] = fed.run(resumed, timeout=300)
    result["left"] = wait_no_processes(str(root / "federation"))
    return result


def _intruders(fed: LocalFederation, root: Path) -> dict[str, str]:
    """Start nodes the SuperLink must refuse; return their logs."""
    logs = {}
    try:
        fed.add_node(LabSpec("rogue", root / "data" / "good", register=False))
    except FederationProcessError as exc:
        logs["rogue"] = str(exc)
    anonymous = LabNode(fed.coordinator.fleet_address, fed.pki.ca.cert, None, root / "data" / "good",
                        lab="anonymous", workdir=root / "anonymous", connect_timeout=60)
    try:
        anonymous.start()
    except FederationProcessError as exc:
        logs["anonymous"] = str(exc)
    finally:
        anonymous.stop()
    logs["nodes"] = fed.cli.list_nodes()
    return logs


def test_unauthenticated_nodes_are_refused(faulty):
    intruders = faulty["intruders"]
    assert "Failed to activate SuperNode" in intruders["rogue"]  # key not registered
    assert "must be registered" in intruders["anonymous"]  # no key at all
    names = {n.get("node-id") for n in intruders["nodes"]}
    assert names == {str(i) for i in faulty["ids"].values()}  # only the 4 registered labs


def test_a_nan_update_is_rejected_and_the_round_goes_on(faulty):
    first = faulty["run1"].rounds[0]
    ids = faulty["ids"]
    assert first["aggregated"]
    assert ids["good"] in first["accepted"]
    assert "non-finite" in first["rejected"][str(ids["nan"])]


def test_an_over_budget_lab_declines_and_the_round_goes_on(faulty):
    ids = faulty["ids"]
    for record in faulty["run1"].rounds:
        assert re.fullmatch(r"next round would reach epsilon [\d.]+ > budget 0\.5",
                            record["declined"][str(ids["poor"])])
        assert record["aggregated"]


def test_a_supernode_killed_mid_round_does_not_stop_the_run(faulty):
    run = faulty["run1"]
    ids = faulty["ids"]
    assert faulty["killed"]
    assert str(ids["crash"]) in run.rounds[0]["failed"]
    assert run.status == "finished:completed" and len(run.rounds) == 2
    assert all(r["accepted"] == [ids["good"]] for r in run.rounds)
    assert run.evaluation["nodes"] >= 1
    start, _ = load_checkpoint(run.checkpoint_dir / "round-000.safetensors")
    end, _ = load_checkpoint(run.checkpoint_dir / "final.safetensors")
    assert not np.allclose(start.state_dict()["head.weight"].numpy(), end.state_dict()["head.weight"].numpy())


def test_a_resumed_run_continues_rounds_and_the_privacy_ledger(faulty):
    first, second = faulty["run1"], faulty["run2"]
    assert [r["round"] for r in second.rounds] == [3]
    assert second.rounds[0]["epsilon_max"] > first.rounds[-1]["epsilon_max"]
    _, card = load_checkpoint(second.checkpoint_dir / "round-003.safetensors")
    assert card.provenance.round == 3


def test_nothing_is_left_running(faulty):
    assert faulty["left"] == []
