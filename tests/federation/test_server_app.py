"""The ServerApp loop against in-process labs (no network): rounds, checkpoints, resume."""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from napari_feddp.federation import client_app, server_app
from napari_feddp.federation.demo import make_synthetic_lab
from napari_feddp.federation.settings import NodeSettings
from napari_feddp.models import load_checkpoint

from .conftest import HERE, tiny_settings


class InProcessGrid(Grid):
    """A Grid whose 'SuperNodes' are ClientApp calls in this process."""

    def __init__(self, contexts: dict[int, Context]):
        self.contexts = contexts
        self.sent: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, *args, **kwargs):  # pragma: no cover - not used
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.sent.append(message)
            context = self.contexts[message.metadata.dst_node_id]
            context.run_config = dict(self._run_config)
            replies.append(client_app.app(message, context))
        return replies


@pytest.fixture
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 9, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def make_grid(tmp_path, settings, **lab_changes) -> InProcessGrid:
    contexts = {}
    for node_id, name in ((101, "a"), (102, "b"), (103, "c")):
        node = NodeSettings(
            lab=name,
            data_dir=str(make_synthetic_lab(tmp_path / name, n_tiles=4, size=32, seed=node_id)),
            ledger_dir=str(tmp_path / "ledgers"),
            model_store=str(tmp_path / "store" / name),
            **lab_changes.get(name, {}),
        )
        contexts[node_id] = Context(run_id=9, node_id=node_id, node_config=node.to_node_config(),
                                    state=RecordDict(), run_config={})
    grid = InProcessGrid(contexts)
    grid._run_config = settings.to_run_config()
    return grid


def test_rounds_checkpoints_and_final_evaluation(tmp_path, task_identity, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    settings = tiny_settings(checkpoint_dir=str(tmp_path / "ckpt"))
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
                            resume_from=str(ckpt / "final.safetensors"))
    grid._run_config = resumed.to_run_config()
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
    with pytest.raises(Exception):
        server_app.main(grid, Context(run_id=9, node_id=1, node_config={}, state=RecordDict(),
                                      run_config=settings.to_run_config()))
    summary = json.loads((tmp_path / "ckpt" / "summary.json").read_text())
    assert summary["status"] == "failed" and "missing" in summary["error"]
