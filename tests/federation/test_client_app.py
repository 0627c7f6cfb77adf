"""The ClientApp in-process: what leaves the lab, declines, client-side clipping, evaluation."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from napari_feddp.federation import client_app
from napari_feddp.federation.local import build_model
from napari_feddp.federation.settings import NodeSettings
from napari_feddp.federation.strategy import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS, update_norm
from napari_feddp.models import load_checkpoint

from .conftest import context, instruction, tiny_settings


def global_arrays(settings) -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(build_model(settings).state_dict())


@pytest.fixture
def node(tmp_path, lab_dir) -> NodeSettings:
    return NodeSettings(
        lab="lab-a",
        data_dir=str(lab_dir),
        ledger_dir=str(tmp_path / "ledger"),
        model_store=str(tmp_path / "store"),
        history_file=str(tmp_path / "history.jsonl"),
        accept_dp_modes="sample,update",
    )


def test_train_reply_carries_only_weights_and_scalar_summaries(settings, node, tmp_path):
    arrays = global_arrays(settings)
    msg = instruction(arrays, {"server-round": 1, "learning-rate": 0.01})
    out = client_app.app(msg, context(settings, node))

    assert not out.has_error()
    content = out.content
    assert set(content.keys()) == {"arrays", "metrics"}
    assert len(content.config_records) == 0
    sent = content.array_records["arrays"]
    assert list(sent.keys()) == list(arrays.keys())
    for name in arrays:
        assert sent[name].shape == arrays[name].shape
    # Nothing else hides in the payload: its size is the model's size.
    model_bytes = sum(a.numpy().nbytes for a in arrays.values())
    assert sum(a.numpy().nbytes for a in sent.values()) == model_bytes
    metrics = content.metric_records["metrics"]
    assert set(metrics.keys()) <= TRAIN_METRIC_KEYS
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
    assert metrics["num-examples"] == 4 and metrics["epsilon"] > 0
    assert update_norm(sent, arrays) > 0  # it trained

    # The privacy ledger persisted the round on the lab's disk.
    ledgers = list((tmp_path / "ledger" / "lab-a").glob("*.jsonl"))
    assert len(ledgers) == 1 and len(ledgers[0].read_text().splitlines()) == 2  # genesis + round
    events = [json.loads(line)["event"] for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert events == ["training", "trained"]


def test_second_round_continues_the_ledger(settings, node):
    arrays = global_arrays(settings)
    first = client_app.app(instruction(arrays, {"server-round": 1}), context(settings, node))
    second = client_app.app(instruction(arrays, {"server-round": 2}), context(settings, node))
    assert second.content["metrics"]["epsilon"] > first.content["metrics"]["epsilon"]


def test_over_budget_lab_declines_without_training(settings, node, tmp_path):
    poor = NodeSettings(**{**node.__dict__, "max_epsilon": 0.01})
    out = client_app.app(instruction(global_arrays(settings), {"server-round": 1}), context(settings, poor))
    assert not out.has_error()
    assert len(out.content.array_records) == 0  # no weights at all
    metrics = out.content.metric_records["metrics"]
    assert metrics["declined"] == 1.0 and metrics["epsilon-max"] == pytest.approx(0.01)
    assert metrics["epsilon-next"] > 0.01
    reason = out.content.config_records["reason"]["reason"]
    # The figures the reply carries anyway, and no ledger path or other local detail.
    assert re.fullmatch(r"next round would reach epsilon [\d.]+ > budget 0\.01", reason), reason
    assert not list((tmp_path / "ledger").rglob("*.jsonl"))  # nothing spent


def test_update_mode_clips_the_update_with_flowers_mod(node):
    settings = tiny_settings(dp_mode="update", batch_size=4, learning_rate=0.5, max_steps=3)
    arrays = global_arrays(settings)
    clip = 1e-3
    msg = instruction(arrays, {"server-round": 1, "clipping_norm": clip})
    out = client_app.app(msg, context(settings, node))
    assert not out.has_error()
    norm = update_norm(out.content["arrays"], arrays)
    assert 0 < norm <= clip * (1 + 1e-5)
    assert "epsilon" not in out.content["metrics"]  # no per-sample DP in update mode


def test_update_mode_lets_declines_through(node):
    settings = tiny_settings(dp_mode="update", batch_size=4)
    poor = NodeSettings(**{**node.__dict__, "train_fn": "tests.federation.test_client_app:declining"})
    msg = instruction(global_arrays(settings), {"server-round": 1, "clipping_norm": 1.0})
    out = client_app.app(msg, context(settings, poor))
    assert not out.has_error() and out.content["metrics"]["declined"] == 1.0


def declining(request):
    from napari_feddp.federation.local import DeclineRound

    raise DeclineRound("next round would reach epsilon 9.0 > budget 8.0", epsilon=1.0)


def test_final_evaluation_keeps_the_model_and_returns_scores_only(settings, node, tmp_path):
    arrays = global_arrays(settings)
    msg = instruction(arrays, {"server-round": 2, "final": True, "epsilon": 3.5}, message_type="evaluate")
    out = client_app.app(msg, context(settings, node))
    assert set(out.content.keys()) == {"metrics"}
    metrics = out.content["metrics"]
    assert set(metrics.keys()) <= EVAL_METRIC_KEYS
    assert 0 <= metrics["dice"] <= 1 and metrics["num-examples"] >= 4
    stored = list((tmp_path / "store").glob("*.safetensors"))
    assert len(stored) == 1
    model, card = load_checkpoint(stored[0])
    assert card.provenance.round == 2 and card.provenance.privacy.epsilon == pytest.approx(3.5)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), arrays[name].numpy())


def test_update_mode_clips_even_if_the_server_does_not_ask(node):
    settings = tiny_settings(dp_mode="update", batch_size=4, learning_rate=0.5, max_steps=3, update_clipping_norm=2e-3)
    arrays = global_arrays(settings)
    out = client_app.app(instruction(arrays, {"server-round": 1}), context(settings, node))
    assert 0 < update_norm(out.content["arrays"], arrays) <= 2e-3 * (1 + 1e-5)
