"""Distributed DP noise: each lab adds its share, secure aggregation sums the shares.

The labs run the real ClientApp with Opacus DP-SGD and the real ledger; the
Grid gives each lab its own copy of every message (``experiments.inprocess.InProcessGrid``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from napari_feddp.federation import server_app
from napari_feddp.federation.checkpoints import CheckpointWriter
from napari_feddp.federation.demo import make_synthetic_lab
from napari_feddp.federation.policy import policy_refusal
from napari_feddp.federation.secure import (
    SecureAggregationRefused,
    _check_unmask,
    clipping_range,
    masked_update,
)
from napari_feddp.federation.settings import NodeSettings, SettingsError
from napari_feddp.models import UNet
from napari_feddp.training import SegmentationDataset, TrainConfig, private_gradient_sum
from napari_feddp.training.ledger import epsilon_of

from .conftest import HERE, make_grid, tiny_settings
from .fault_trainers import known_delta

TRUSTING = {"max_noise_split": 3}


def distributed(**changes):
    return tiny_settings(dp_noise="distributed", max_steps=1, noise_multiplier=1.0, **changes)


def test_the_shares_of_three_labs_add_up_to_the_noise_the_accountant_uses(tmp_path):
    """Three noise shares of sigma / sqrt(3), summed: per-weight noise of sigma * C, as one DP-SGD step needs."""
    torch.manual_seed(0)
    data = make_synthetic_lab(tmp_path / "lab", n_tiles=8, size=64, seed=1)
    dataset = SegmentationDataset(data, crop_size=32, mode="train", source_mpp=0.5, target_mpp=0.5, n_classes=2)
    model = UNet(in_channels=3, n_classes=2, depth=2, base_width=8, groups=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sigma, clip = 2.0, 0.5
    config = TrainConfig(batch_size=4, max_physical_batch_size=2, crop_size=32, noise_multiplier=sigma,
                         max_grad_norm=clip, seed=None)  # fmt: skip
    total = None
    for _ in range(3):
        part, result = private_gradient_sum(model, dataset, config, noise_share=sigma / math.sqrt(3))
        total = part if total is None else {n: total[n] + part[n] for n in part}
        assert result.steps == 1 and result.noise_multiplier == sigma
    values = torch.cat([t.ravel() for t in total.values()])
    assert values.numel() > 5000
    assert values.std().item() == pytest.approx(sigma * clip, rel=0.05)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing applied
    # Without noise the sum is the clipped gradients only: at most (batch drawn) x C in norm.
    quiet, _ = private_gradient_sum(model, dataset, config.model_copy(update={"noise_multiplier": 1e-6}),
                                    noise_share=1e-6)  # fmt: skip
    norm = math.sqrt(sum(float((t * t).sum()) for t in quiet.values()))
    assert 0 < norm <= len(dataset) * clip + 1e-4


def _run(tmp_path, grid, settings):
    grid.run_config = settings.to_run_config()
    context = Context(run_id=9, node_id=1, node_config={}, state=RecordDict(), run_config=settings.to_run_config())
    return server_app.run_federation(grid, settings, CheckpointWriter(settings.checkpoint_dir, settings),
                                     context=context)  # fmt: skip


@pytest.mark.parametrize("augmentations", [1, 2])
def test_a_distributed_noise_run_trains_and_each_lab_accounts_the_full_noise(tmp_path, task_identity, augmentations):
    settings = distributed(num_rounds=2, final_evaluation=False, checkpoint_dir=str(tmp_path / "ckpt"),
                           augmentation_multiplicity=augmentations)
    grid = make_grid(tmp_path, settings, a=TRUSTING, b=TRUSTING, c=TRUSTING)
    initial, _ = server_app.initial_arrays(settings)
    arrays, strategy = _run(tmp_path, grid, settings)
    for report in strategy.reports.values():
        assert report.aggregated and sorted(report.accepted) == [101, 102, 103]
    moved = max(float(abs(arrays[n].numpy() - initial[n].numpy()).max()) for n in initial)
    assert 0 < moved <= 2 * settings.learning_rate * 1.01  # two Adam steps on the server
    # 4 tiles, batch 2: sample rate 1/2; one step per round at the full noise multiplier.
    expected = epsilon_of("rdp", [(settings.noise_multiplier, 0.5, 2)], 1e-5)
    assert strategy.reports[2].epsilon_max == pytest.approx(expected, rel=1e-6)
    # Augmentation multiplicity reaches every lab's DP-SGD and leaves the accounting as it is.
    records = [json.loads(line) for path in (tmp_path / "ledgers").rglob("*.jsonl") for line in path.read_text().splitlines()]
    rounds = [r for r in records if "meta" in r and r["meta"].get("noise") == "distributed"]
    assert len(rounds) == 6 and {r["meta"]["augmentations"] for r in rounds} == {augmentations}


def test_the_server_applies_the_mean_of_the_labs_gradient_sums(tmp_path, task_identity, monkeypatch):
    """Labs whose 'gradient sums' are known: the server's Adam step goes against their mean (descent)."""
    monkeypatch.syspath_prepend(str(HERE))
    settings = distributed(num_rounds=1, final_evaluation=False, checkpoint_dir=str(tmp_path / "ckpt"))
    known = {**TRUSTING, "train_fn": "fault_trainers:shifted_update"}
    grid = make_grid(tmp_path, settings, a=known, b=known, c=known)
    initial, _ = server_app.initial_arrays(settings)
    arrays, strategy = _run(tmp_path, grid, settings)
    assert strategy.reports[1].aggregated
    for name in initial:
        mean = np.mean([known_delta(lab, name, initial[name].numpy().shape) for lab in "abc"], axis=0)
        step = arrays[name].numpy() - initial[name].numpy()
        strong = np.abs(mean) > 0.01  # Adam's first step is -lr * sign(gradient) where the gradient is clear
        np.testing.assert_array_equal(np.sign(step[strong]), -np.sign(mean[strong]))
        np.testing.assert_allclose(np.abs(step[strong]), settings.learning_rate, rtol=0.01)


def test_labs_decline_distributed_noise_unless_their_policy_trusts_enough_labs(tmp_path, task_identity):
    settings = distributed(min_clients=4, num_rounds=1, final_evaluation=False, checkpoint_dir=str(tmp_path / "ckpt"))
    assert "at most 1" in policy_refusal(settings, NodeSettings())
    assert policy_refusal(settings, NodeSettings(max_noise_split=4)) is None
    trusting = {"max_noise_split": 4}
    grid = make_grid(tmp_path, settings, labs="abcd", a=trusting, b=trusting, c=trusting)  # d keeps the default (1)
    _, strategy = _run(tmp_path, grid, settings)
    report = strategy.reports[1]
    assert "distributed noise split over 4 labs" in report.declined["104"]
    # Three shares are too little noise for a split over four: the labs refuse to unmask the sum.
    assert not report.aggregated
    for node in ("101", "102", "103"):
        assert "the noise needs 4" in report.declined[node]


def test_distributed_noise_needs_secure_aggregation_and_one_step_per_round():
    with pytest.raises(SettingsError, match="needs dp-mode 'sample', secure aggregation"):
        tiny_settings(dp_noise="distributed", max_steps=2)
    with pytest.raises(SettingsError, match="needs dp-mode 'sample', secure aggregation"):
        tiny_settings(dp_noise="distributed", max_steps=1, min_clients=2)
    with pytest.raises(SettingsError, match="noise-split 4 cannot exceed min-clients 3"):
        distributed(noise_split=4)
    assert distributed().noise_share == pytest.approx(1 / math.sqrt(3))
    assert distributed(min_clients=5, noise_split=4).noise_share == pytest.approx(0.5)


def _secagg_context(settings, **state):
    """A lab's SecAgg+ state after the key exchange with labs 1 and 2 (it is node 5)."""
    values = {"nid": 5, "sample_num": 3, "threshold": 2, "public_keys_dict:K": [1, 2, 5], "max_weight": 1.0,
              "clipping_range": 1.0, **state}
    record = RecordDict({RECORD_KEY_STATE: ConfigRecord(values)})
    return Context(run_id=1, node_id=5, node_config={}, state=record, run_config=settings.to_run_config())


def _collect_message(sources=(1, 2)):
    return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.SOURCE_LIST: list(sources)})}), dst_node_id=5,
                   message_type="train")


def test_a_lab_refuses_to_help_unmask_a_sum_with_too_few_noise_shares(task_identity):
    settings = distributed(min_clients=4)
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.UNMASK,
                                                             Key.ACTIVE_NODE_ID_LIST: [1, 2, 3],
                                                             Key.DEAD_NODE_ID_LIST: [4]})})  # fmt: skip
    message = Message(content, dst_node_id=5, message_type="train")
    with pytest.raises(SecureAggregationRefused, match="only 3 labs in the sum; the noise needs 4"):
        _check_unmask(message, _secagg_context(settings))
    _check_unmask(message, _secagg_context(distributed()))  # 3 of 3: fine


def test_a_lab_refuses_a_clipping_range_that_would_cut_its_noise(task_identity):
    settings = distributed()
    needed = clipping_range(settings)
    assert needed >= 12 * settings.noise_share * settings.max_grad_norm

    def train(msg, ctx):
        raise AssertionError("the lab must not train")

    with pytest.raises(SecureAggregationRefused, match="would cut off values"):
        masked_update(_collect_message(), _secagg_context(settings, clipping_range=needed / 2), train)


@pytest.mark.parametrize(("state", "sources", "why"), [
    ({}, (1,), "key shares from 1 other lab"),
    ({"threshold": 1}, (1, 2), "threshold 1 of 3 keys is not a majority"),
    ({"max_weight": 1000.0}, (1, 2), "secure rounds use unit weights"),
])
def test_a_lab_refuses_protocol_parameters_that_would_expose_its_update(task_identity, state, sources, why):
    """What a coordinator deviating from SecAgg+ could declare to unmask one lab."""

    def train(msg, ctx):
        raise AssertionError("the lab must not train")

    with pytest.raises(SecureAggregationRefused, match=why):
        masked_update(_collect_message(sources), _secagg_context(tiny_settings(), **state), train)
