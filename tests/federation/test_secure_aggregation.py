"""Secure aggregation (Flower's SecAgg+) between the ServerApp and in-process labs.

The labs run the real ClientApp (mods included) and Flower's SecAgg+ client; the
Grid hands each lab its own copy of every message, as the network would, and
keeps everything the ServerApp receives so that the tests can look at it.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.supercore.differential_privacy import compute_stdv

from napari_feddp.federation import server_app
from napari_feddp.federation.checkpoints import CheckpointWriter
from napari_feddp.federation.secure import (
    MIN_SECURE_LABS,
    SecureAggregationRefused,
    masked_update,
    secure_aggregation_on,
)
from napari_feddp.federation.settings import SettingsError
from napari_feddp.models import load_checkpoint

from .conftest import HERE, InProcessGrid, make_grid, tiny_settings
from .fault_trainers import known_delta

SHIFTED = {"train_fn": "fault_trainers:shifted_update"}


def _run(tmp_path, grid, settings, rounds=1):
    settings = settings.replace(num_rounds=rounds, final_evaluation=False, checkpoint_dir=str(tmp_path / "ckpt"))
    grid.run_config = settings.to_run_config()
    initial, _ = server_app.initial_arrays(settings)
    context = Context(run_id=9, node_id=1, node_config={}, state=RecordDict(), run_config=settings.to_run_config())
    arrays, strategy = server_app.run_federation(grid, settings, CheckpointWriter(settings.checkpoint_dir, settings),
                                                 context=context)  # fmt: skip
    return initial, arrays, strategy


def _expected_mean(initial, labs):
    return {name: np.mean([known_delta(lab, name, initial[name].numpy().shape) for lab in labs], axis=0)
            for name in initial}  # fmt: skip


def test_the_coordinator_gets_the_mean_update_and_no_lab_update(tmp_path, task_identity, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    settings = tiny_settings()
    assert secure_aggregation_on(settings)  # three labs: on by default
    grid = make_grid(tmp_path, settings, a=SHIFTED, b=SHIFTED, c=SHIFTED)
    initial, arrays, strategy = _run(tmp_path, grid, settings)

    report = strategy.reports[1]
    assert report.aggregated and sorted(report.accepted) == [101, 102, 103] and report.aggregation == "secure-mean"
    assert report.updates == {}  # the server has no per-lab update to measure
    assert report.epsilon_max == pytest.approx(1.0)
    expected = _expected_mean(initial, "abc")
    for name in initial:  # quantization error only (2 x range / 2**24 per lab)
        np.testing.assert_allclose(arrays[name].numpy() - initial[name].numpy(), expected[name], atol=1e-5)

    # Everything the ServerApp received: no weights, and masked vectors unrelated to any lab's update.
    assert grid.received and all(not reply.has_error() for reply in grid.received)
    assert all(len(record) == 0 for reply in grid.received for record in reply.content.array_records.values())
    masked = [r for r in grid.received if Key.MASKED_PARAMETERS in r.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    assert len(masked) == 3
    names = list(initial)
    for reply in masked:
        lab = "abc"[reply.metadata.src_node_id - 101]
        vectors = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        values = np.concatenate([v.ravel() for v in vectors[1:]]).astype(np.float64)  # [0] is the weight
        truth = np.concatenate([known_delta(lab, n, initial[n].numpy().shape).ravel() for n in names])
        assert values.size == truth.size
        assert abs(np.corrcoef(values, truth)[0, 1]) < 0.05
        # uniform over the modulus, as a one-time pad is
        assert 0.45 < values.mean() / 2**32 < 0.55 and values.std() / 2**32 > 0.25


def test_the_round_survives_a_lab_that_drops_out_after_the_key_exchange(tmp_path, task_identity, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    grid = make_grid(tmp_path, tiny_settings(), labs="abcd", a=SHIFTED, b=SHIFTED, c=SHIFTED,
                     d={"train_fn": "fault_trainers:crash"})
    initial, arrays, strategy = _run(tmp_path, grid, tiny_settings(), rounds=2)
    for report in strategy.reports.values():
        assert report.aggregated and sorted(report.accepted) == [101, 102, 103]
        assert "lab machine went down" in report.failed["104"]
    # The dropped lab's masks were removed: the model moved by exactly two means of the others.
    expected = _expected_mean(initial, "abc")
    for name in initial:
        np.testing.assert_allclose(arrays[name].numpy() - initial[name].numpy(), 2 * expected[name], atol=2e-5)


def test_a_lab_gone_before_the_key_exchange_is_left_out_of_the_round(tmp_path, task_identity, monkeypatch):
    """A node that is sampled but unreachable (its SuperNode died in an earlier round)."""
    monkeypatch.syspath_prepend(str(HERE))
    grid = make_grid(tmp_path, tiny_settings(), labs="abcd", a=SHIFTED, b=SHIFTED, c=SHIFTED, d=SHIFTED)
    grid.unreachable = {104}
    initial, arrays, strategy = _run(tmp_path, grid, tiny_settings())
    report = strategy.reports[1]
    assert report.aggregated and sorted(report.accepted) == [101, 102, 103] and "104" in report.failed
    expected = _expected_mean(initial, "abc")
    for name in initial:
        np.testing.assert_allclose(arrays[name].numpy() - initial[name].numpy(), expected[name], atol=1e-5)


def test_a_lab_that_declines_is_reported_and_left_out(tmp_path, task_identity, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    grid = make_grid(tmp_path, tiny_settings(), labs="abcd", a=SHIFTED, b=SHIFTED, c=SHIFTED,
                     d={"max_epsilon": 0.01})
    initial, arrays, strategy = _run(tmp_path, grid, tiny_settings())
    report = strategy.reports[1]
    assert report.aggregated and sorted(report.accepted) == [101, 102, 103]
    assert "budget" in report.declined["104"] and not report.failed
    expected = _expected_mean(initial, "abc")
    name = next(iter(initial))
    np.testing.assert_allclose(arrays[name].numpy() - initial[name].numpy(), expected[name], atol=1e-5)


def test_a_sum_of_two_labs_is_never_released(tmp_path, task_identity, monkeypatch):
    """Three labs sampled, one declines: the two others refuse to unmask (each would read the other's update)."""
    monkeypatch.syspath_prepend(str(HERE))
    grid = make_grid(tmp_path, tiny_settings(), a=SHIFTED, b=SHIFTED, c={"max_epsilon": 0.01})
    initial, arrays, strategy = _run(tmp_path, grid, tiny_settings())
    report = strategy.reports[1]
    assert not report.aggregated and "budget" in report.declined["103"]
    for node in ("101", "102"):
        assert "a secure sum needs 3" in report.declined[node]
    for name in initial:
        np.testing.assert_array_equal(arrays[name].numpy(), initial[name].numpy())


class TamperingGrid(InProcessGrid):
    """The network of a lab whose altered code sends a masked vector shifted by half the modulus."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            configs = None if reply.has_error() else reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if reply.metadata.src_node_id == 103 and configs is not None and Key.MASKED_PARAMETERS in configs:
                vectors = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
                vectors[1:] = [(v + 2**31) % 2**32 for v in vectors[1:]]
                configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(v) for v in vectors]
        return replies


def test_a_malformed_masked_vector_loses_the_round_not_the_model(tmp_path, task_identity, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    plain = make_grid(tmp_path, tiny_settings(), a=SHIFTED, b=SHIFTED, c=SHIFTED)
    grid = TamperingGrid(plain.contexts, plain.run_config)
    initial, arrays, strategy = _run(tmp_path, grid, tiny_settings(), rounds=2)
    for report in strategy.reports.values():
        assert not report.aggregated and "leaves the clipping range" in report.note
    for name in initial:
        np.testing.assert_array_equal(arrays[name].numpy(), initial[name].numpy())


def test_client_level_dp_inside_a_secure_sum(tmp_path, task_identity, monkeypatch):
    """dp-mode update: each lab clips its update to the norm, the server adds the noise to the unmasked mean."""
    monkeypatch.syspath_prepend(str(HERE))
    settings = tiny_settings(dp_mode="update", batch_size=4, update_clipping_norm=1.0, update_noise_multiplier=1.0)
    update = {**SHIFTED, "accept_dp_modes": "update"}
    grid = make_grid(tmp_path, settings, a=update, b=update, c=update)
    initial, arrays, strategy = _run(tmp_path, grid, settings)
    report = strategy.reports[1]
    assert report.aggregated and report.update_noise_std == pytest.approx(compute_stdv(1.0, 1.0, 3))
    names = list(initial)
    clipped = []
    for lab in "abc":
        delta = [known_delta(lab, n, initial[n].numpy().shape) for n in names]
        norm = np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in delta))
        clipped.append([d / max(1.0, norm) for d in delta])
    residual = np.concatenate([(arrays[n].numpy() - initial[n].numpy() - np.mean([c[i] for c in clipped], axis=0)).ravel()
                               for i, n in enumerate(names)])  # fmt: skip
    assert residual.std() == pytest.approx(report.update_noise_std, rel=0.1)


def test_a_round_that_leaves_too_few_labs_changes_nothing(tmp_path, task_identity, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    grid = make_grid(tmp_path, tiny_settings(), a=SHIFTED, b={"train_fn": "fault_trainers:crash"},
                     c={"train_fn": "fault_trainers:crash"})
    initial, arrays, strategy = _run(tmp_path, grid, tiny_settings())
    report = strategy.reports[1]
    assert not report.aggregated and "global model unchanged" in report.note
    for name in initial:
        np.testing.assert_array_equal(arrays[name].numpy(), initial[name].numpy())


def test_secure_aggregation_is_on_by_default_from_three_labs_and_refused_below():
    assert secure_aggregation_on(tiny_settings(min_clients=3))
    assert secure_aggregation_on(tiny_settings(min_clients=5))
    assert not secure_aggregation_on(tiny_settings(min_clients=2))
    assert not secure_aggregation_on(tiny_settings(min_clients=3, secure_aggregation="off"))
    assert not secure_aggregation_on(tiny_settings(min_clients=4, aggregation="median"))
    with pytest.raises(SettingsError, match="min-clients 3 or more, received 2"):
        tiny_settings(min_clients=2, secure_aggregation="on")
    with pytest.raises(SettingsError, match="aggregation 'median' cannot be used with secure-aggregation 'on'"):
        tiny_settings(min_clients=4, secure_aggregation="on", aggregation="median")


def test_a_lab_refuses_a_secure_sum_of_fewer_than_three_labs(task_identity):
    """A coordinator that runs SecAgg+ with two labs would learn each update from the sum and the other."""
    settings = tiny_settings(min_clients=3)
    state = RecordDict({RECORD_KEY_STATE: ConfigRecord({"sample_num": MIN_SECURE_LABS - 1})})
    context = Context(run_id=1, node_id=5, node_config={}, state=state, run_config=settings.to_run_config())

    def train(msg, ctx):
        raise AssertionError("the lab must not train")

    with pytest.raises(SecureAggregationRefused, match="at least 3 needed"):
        masked_update(Message(RecordDict(), dst_node_id=5, message_type="train"), context, train)


def test_a_lab_that_requires_secure_aggregation_declines_a_round_in_the_clear(tmp_path, task_identity, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    settings = tiny_settings(secure_aggregation="off")
    strict = {"require_secure_aggregation": True}
    grid = make_grid(tmp_path, settings, a=strict, b=strict, c=SHIFTED)
    initial, arrays, strategy = _run(tmp_path, grid, settings)
    report = strategy.reports[1]
    for node in ("101", "102"):
        assert "only inside a secure sum" in report.declined[node]
    assert report.accepted == [103]
    # ...and takes part when the round is secure.
    grid = make_grid(tmp_path / "secure", tiny_settings(), a={**SHIFTED, **strict}, b={**SHIFTED, **strict}, c=SHIFTED)
    _, _, strategy = _run(tmp_path / "secure", grid, tiny_settings())
    assert sorted(strategy.reports[1].accepted) == [101, 102, 103]


def test_the_final_model_can_be_the_mean_of_the_last_rounds(tmp_path, task_identity, monkeypatch):
    """average-last: post-processing of released models, so the card's epsilon is the last round's."""
    monkeypatch.syspath_prepend(str(HERE))
    settings = tiny_settings(average_last=2)
    grid = make_grid(tmp_path, settings, a=SHIFTED, b=SHIFTED, c=SHIFTED)
    _, arrays, strategy = _run(tmp_path, grid, settings, rounds=3)
    second, _ = load_checkpoint(tmp_path / "ckpt" / "round-002")
    third, _ = load_checkpoint(tmp_path / "ckpt" / "round-003")
    final, card = load_checkpoint(tmp_path / "ckpt" / "final")
    for name, value in final.state_dict().items():
        expected = (second.state_dict()[name] + third.state_dict()[name]) / 2
        np.testing.assert_allclose(value.numpy(), expected.numpy(), atol=1e-6)
        np.testing.assert_allclose(arrays[name].numpy(), expected.numpy(), atol=1e-6)
    assert card.provenance.privacy.epsilon == pytest.approx(strategy.reports[3].epsilon_max)
