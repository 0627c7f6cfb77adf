"""The ServerApp loop against in-process labs (no network): rounds, checkpoints, resume,
and labs whose reports are impossible."""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from napari_feddp.federation import server_app
from napari_feddp.federation.checkpoints import CheckpointWriter
from napari_feddp.models import CheckpointError, load_checkpoint

from .conftest import HERE, InProcessGrid, make_grid, tiny_settings


def test_rounds_checkpoints_and_final_evaluation(tmp_path, task_identity, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    # In the clear, so that the server's own checks of each update are what is tested.
    settings = tiny_settings(checkpoint_dir=str(tmp_path / "ckpt"), secure_aggregation="off")
    grid = make_grid(tmp_path, settings, c={"train_fn": "fault_trainers:nan_update"})
    context = Context(run_id=9, node_id=1, node_config={}, state=RecordDict(),
                      run_config=settings.to_run_config())
    server_app.main(grid, context)

    ckpt = tmp_path / "ckpt"
    rounds = [json.loads(line) for line in (ckpt / "rounds.jsonl").read_text().splitlines()]
    assert [sorted(r["accepted"]) for r in rounds] == [[101, 102], [101, 102]]
    assert all("103" in r["rejected"] for r in rounds)
    summary = json.loads((ckpt / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["evaluation"]["nodes"] == 3
    _, card = load_checkpoint(ckpt / "final")
    assert card.provenance.round == 2
    assert card.provenance.privacy.epsilon == pytest.approx(max(r["epsilon_max"] for r in rounds))
    # the final evaluation round told every lab to keep the model
    assert sorted(p.parent.name for p in (tmp_path / "store").glob("*/*.safetensors")) == ["a", "b", "c"]
    final_eval = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(final_eval) == 3 and all(m.content["config"]["final"] for m in final_eval)

    # Resume: weights of round 2 are the start, rounds continue at 3.
    resumed = tiny_settings(num_rounds=1, final_evaluation=False, checkpoint_dir=str(tmp_path / "ckpt2"),
                            resume_from=str(ckpt / "final.safetensors"), secure_aggregation="off")
    grid.run_config = resumed.to_run_config()
    server_app.main(grid, Context(run_id=10, node_id=1, node_config={}, state=RecordDict(),
                                  run_config=resumed.to_run_config()))
    start, _ = load_checkpoint(tmp_path / "ckpt2" / "round-002")
    end, _ = load_checkpoint(ckpt / "final")
    for name, value in start.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), end.state_dict()[name].numpy())
    again = json.loads((tmp_path / "ckpt2" / "rounds.jsonl").read_text())
    assert again["round"] == 3 and again["epsilon_max"] > rounds[-1]["epsilon_max"]


def test_a_failing_run_says_why_in_its_summary(tmp_path, task_identity):
    settings = tiny_settings(checkpoint_dir=str(tmp_path / "ckpt"), resume_from=str(tmp_path / "missing"))
    grid = make_grid(tmp_path, settings)
    with pytest.raises(CheckpointError):
        server_app.main(grid, Context(run_id=9, node_id=1, node_config={}, state=RecordDict(),
                                      run_config=settings.to_run_config()))
    summary = json.loads((tmp_path / "ckpt" / "summary.json").read_text())
    assert summary["status"] == "failed" and "missing" in summary["error"]


class ScriptedGrid(InProcessGrid):
    """A Grid whose labs answer with scripted replies in the clear (real Flower Messages, no training).

    ``epsilons`` maps node id to the epsilon that lab reports with its update.
    """

    def __init__(self, epsilons: dict[int, float]):
        super().__init__(dict.fromkeys(epsilons))
        self.epsilons = epsilons

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if message.metadata.message_type == "train":
                arrays = ArrayRecord({k: Array(v.numpy() + 0.01) for k, v in message.content["arrays"].items()})
                metrics = {"num-examples": 4, "train-loss": 0.5, "train-dice": 0.5,
                           "epsilon": self.epsilons[node], "delta": 1e-5, "steps": 2}  # fmt: skip
                content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
            else:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 4, "dice": 0.5})})
            replies.append(Message(content, reply_to=message))
        return replies


@pytest.mark.parametrize("epsilon", [0.0, -0.74, float("nan")])
def test_labs_reporting_an_impossible_epsilon_are_rejected_and_the_run_completes(tmp_path, task_identity, epsilon):
    settings = tiny_settings(checkpoint_dir=str(tmp_path / "ckpt"), secure_aggregation="off")
    grid = ScriptedGrid({101: epsilon, 102: epsilon, 103: epsilon})
    server_app.main(grid, Context(run_id=9, node_id=1, node_config={}, state=RecordDict(),
                                  run_config=settings.to_run_config()))
    ckpt = tmp_path / "ckpt"
    rounds = [json.loads(line) for line in (ckpt / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 2
    for row in rounds:
        assert row["accepted"] == [] and not row["aggregated"] and row["epsilon_max"] is None
        assert sorted(row["rejected"]) == ["101", "102", "103"]
        assert all("'epsilon'" in reason for reason in row["rejected"].values())
        assert "global model unchanged" in row["note"] and row["checkpoint"]
    assert json.loads((ckpt / "summary.json").read_text())["status"] == "completed"
    first, _ = load_checkpoint(ckpt / "round-000")
    final, card = load_checkpoint(ckpt / "final")
    assert card.provenance.privacy.epsilon is None  # no valid claim was ever made
    for name, value in first.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), final.state_dict()[name].numpy())


def test_one_lab_with_a_negative_epsilon_leaves_the_others_and_the_card_intact(tmp_path, task_identity):
    settings = tiny_settings(checkpoint_dir=str(tmp_path / "ckpt"), final_evaluation=False, secure_aggregation="off")
    writer = CheckpointWriter(settings.checkpoint_dir, settings)
    _, strategy = server_app.run_federation(ScriptedGrid({101: 1.5, 102: 2.0, 103: -0.74}), settings, writer)
    for report in strategy.reports.values():
        assert sorted(report.accepted) == [101, 102] and report.aggregated
        assert "'epsilon' must be > 0" in report.rejected["103"]
    _, card = load_checkpoint(tmp_path / "ckpt" / "final")
    assert card.provenance.privacy.epsilon == pytest.approx(2.0)
    assert writer.problems == {}


@pytest.mark.parametrize("epsilon", [0.0, -0.74, float("nan"), float("inf"), 1e300])
def test_checkpoint_writer_records_an_invalid_card_epsilon_instead_of_raising(tmp_path, epsilon):
    settings = tiny_settings()
    arrays, _ = server_app.initial_arrays(settings)
    writer = CheckpointWriter(tmp_path, settings)
    path = writer.save_model("round-001", arrays, round=1, federated_rounds=1, epsilon=epsilon,
                             metrics={"train_dice": float("nan")})
    _, card = load_checkpoint(path)
    assert card.provenance.privacy.epsilon is None and card.metrics == {}
    assert "not a valid privacy claim" in writer.problems["round-001"]
