"""Server-side aggregation on hand-made replies: FedAvg weights, rejection, DP."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, MetricRecord, RecordDict

from napari_feddp.federation.strategy import (
    GuardedStrategy,
    build_strategy,
    check_arrays,
    array_spec,
    weighted_average,
)

from .conftest import array_record, instruction, reply, tiny_settings, train_reply

GLOBAL = {"w": np.zeros((2, 2), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def client(value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in GLOBAL.items()}


def metrics(examples: int, **extra) -> dict:
    return {"num-examples": examples, "unit-weight": 1.0, "train-loss": 0.5, "train-dice": 0.5, **extra}


def fedavg_strategy(**kwargs) -> GuardedStrategy:
    settings = tiny_settings(dp_mode="none", min_clients=1, **kwargs)
    return build_strategy(settings, array_record(GLOBAL))


def test_weighted_average_matches_hand_computation():
    a = {"w": np.array([1.0, 2.0]), "b": np.array([[0.0]])}
    b = {"w": np.array([4.0, 8.0]), "b": np.array([[3.0]])}
    out = weighted_average([(a, 1.0), (b, 3.0)])
    # (1*1 + 3*4)/4 = 3.25, (1*2 + 3*8)/4 = 6.5, (0 + 9)/4 = 2.25
    np.testing.assert_allclose(out["w"], [3.25, 6.5])
    np.testing.assert_allclose(out["b"], [[2.25]])


@pytest.mark.parametrize("weights", [[0.0, 1.0], [-1.0, 2.0], [float("nan"), 1.0]])
def test_weighted_average_refuses_bad_weights(weights):
    a = {"w": np.ones(2)}
    with pytest.raises(ValueError):
        weighted_average([(a, weights[0]), (a, weights[1])])


def test_fedavg_weights_by_examples_like_a_hand_computation():
    strategy = fedavg_strategy()
    replies = [
        train_reply(11, client(1.0), metrics(10, epsilon=1.5)),
        train_reply(12, client(2.0), metrics(30, epsilon=2.5)),
        train_reply(13, client(6.0), metrics(60, epsilon=0.5)),
    ]
    arrays, agg = strategy.aggregate_train(1, replies)
    expected = (10 * 1.0 + 30 * 2.0 + 60 * 6.0) / 100  # 4.3
    for name, value in arrays.items():
        np.testing.assert_allclose(value.numpy(), np.full(GLOBAL[name].shape, expected), rtol=1e-6)
        assert value.numpy().dtype == np.float32
    report = strategy.reports[1]
    assert report.accepted == [11, 12, 13] and report.aggregated
    assert report.num_examples == 100
    assert report.epsilon_max == pytest.approx(2.5)  # the maximum over labs, not a mean
    assert agg["num-examples"] == 100 and agg["epsilon-max"] == pytest.approx(2.5)


def test_nan_and_wrong_shape_updates_are_rejected_and_the_round_goes_on():
    strategy = fedavg_strategy()
    bad_nan = client(1.0)
    bad_nan["w"][0, 0] = np.nan
    bad_inf = client(1.0)
    bad_inf["b"][1] = np.inf
    bad_shape = {"w": np.ones((3, 2), dtype=np.float32), "b": np.ones(3, dtype=np.float32)}
    bad_names = {"w": np.ones((2, 2), dtype=np.float32), "extra": np.ones(3, dtype=np.float32)}
    replies = [
        train_reply(1, bad_nan, metrics(10)),
        train_reply(2, bad_inf, metrics(10)),
        train_reply(3, bad_shape, metrics(10)),
        train_reply(4, bad_names, metrics(10)),
        train_reply(5, client(2.0), metrics(10)),
        train_reply(6, client(4.0), metrics(30)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 3.5))
    report = strategy.reports[1]
    assert report.accepted == [5, 6]
    assert set(report.rejected) == {"1", "2", "3", "4"}
    assert "non-finite" in report.rejected["1"] and "non-finite" in report.rejected["2"]
    assert "shape mismatch" in report.rejected["3"]
    assert "names differ" in report.rejected["4"]


def test_errors_declines_and_bad_metrics_are_sorted_out():
    strategy = fedavg_strategy()
    decline = RecordDict({
        "metrics": MetricRecord({"declined": 1.0, "epsilon": 7.9, "epsilon-next": 9.1, "epsilon-max": 8.0}),
        "reason": ConfigRecord({"reason": "privacy budget exhausted"}),
    })
    replies = [
        reply(1, error=Error(code=3, reason="Node unavailable")),
        reply(2, decline),
        train_reply(3, client(1.0), {**metrics(10), "per-sample-loss": 0.1}),  # not a summary
        train_reply(4, client(1.0), {**metrics(10), "train-loss": float("nan")}),
        train_reply(5, client(1.0), {"unit-weight": 1.0}),  # no example count
        train_reply(6, client(5.0), metrics(10)),
    ]
    arrays, _ = strategy.aggregate_train(2, replies)
    np.testing.assert_allclose(arrays["b"].numpy(), np.full(3, 5.0))
    report = strategy.reports[2]
    assert report.failed == {"1": "error 3: Node unavailable"}
    assert report.declined == {"2": "privacy budget exhausted"}
    assert set(report.rejected) == {"3", "4", "5"}
    assert report.accepted == [6]


def test_too_few_valid_updates_keep_the_global_model():
    strategy = build_strategy(tiny_settings(dp_mode="none", min_clients=2, min_updates=2), array_record(GLOBAL))
    bad = client(1.0)
    bad["w"][:] = np.nan
    arrays, agg = strategy.aggregate_train(1, [train_reply(1, bad, metrics(5)), train_reply(2, client(1.0), metrics(5))])
    assert arrays is None and agg is None
    assert not strategy.reports[1].aggregated
    assert "global model unchanged" in strategy.reports[1].note


def test_silent_and_dead_nodes_are_reported_as_failed_under_their_own_id():
    strategy = fedavg_strategy()
    sent = [instruction(array_record(GLOBAL), {}, node_id=n) for n in (7, 8, 9)]
    strategy._outgoing[("train", 1)] = sent
    dead = reply(1, error=Error(code=5, reason="Node Unavailable"))  # answered by the SuperLink
    dead.metadata.__dict__["_reply_to_message_id"] = sent[1].metadata.message_id
    ok = train_reply(7, client(1.0), metrics(5))
    ok.metadata.__dict__["_reply_to_message_id"] = sent[0].metadata.message_id
    strategy.aggregate_train(1, [ok, dead])
    report = strategy.reports[1]
    assert report.sampled == [7, 8, 9] and report.accepted == [7]
    assert report.failed == {"8": "error 5: Node Unavailable", "9": "no reply before the round timeout"}


def test_check_arrays_names_the_problem():
    spec = array_spec(GLOBAL)
    assert check_arrays(spec, client(1.0)) is None
    as_float64 = {k: v.astype(np.float64) for k, v in GLOBAL.items()}
    assert "dtype mismatch" in check_arrays(spec, as_float64)


def test_update_mode_uses_flower_dp_wrapper_uniform_weights_and_checks_clipping():
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    settings = tiny_settings(dp_mode="update", min_clients=2, update_clipping_norm=1.0,
                             update_noise_multiplier=0.5)
    strategy = build_strategy(settings, array_record(GLOBAL))
    assert isinstance(strategy.inner, DifferentialPrivacyClientSideFixedClipping)
    assert strategy.weight_key == "unit-weight"
    small = client(0.1)  # norm 0.1 * sqrt(7) < 1: a clipped update
    large = client(1.0)  # norm sqrt(7) > 1: not clipped
    np.random.seed(0)
    arrays, _ = strategy.aggregate_train(1, [
        train_reply(1, small, metrics(10)),
        train_reply(2, {k: -v for k, v in small.items()}, metrics(1000)),
        train_reply(3, large, metrics(10)),
    ])
    report = strategy.reports[1]
    assert report.accepted == [1, 2]
    assert "exceeds the clipping norm" in report.rejected["3"]
    # uniform mean of +0.1 and -0.1 is 0; the aggregate is pure Gaussian noise of
    # std noise_multiplier * clip / n_accepted = 0.25, not the example-weighted -0.098
    values = np.concatenate([a.numpy().ravel() for a in arrays.values()])
    assert report.update_noise_std == pytest.approx(0.25)
    assert np.all(np.abs(values) < 5 * 0.25) and np.std(values) > 0.01


def test_evaluation_is_pooled_by_examples_and_reported_per_node():
    strategy = fedavg_strategy()
    replies = [
        reply(1, RecordDict({"metrics": MetricRecord({"num-examples": 10, "dice": 0.2, "eval-loss": 1.0})}),
              message_type="evaluate"),
        reply(2, RecordDict({"metrics": MetricRecord({"num-examples": 30, "dice": 0.6, "eval-loss": 2.0})}),
              message_type="evaluate"),
        reply(3, error=Error(code=3, reason="gone"), message_type="evaluate"),
    ]
    pooled = strategy.aggregate_evaluate(2, replies)
    assert pooled["dice"] == pytest.approx(0.5)
    assert strategy.evaluation["per_node"]["1"]["dice"] == pytest.approx(0.2)
    assert strategy.evaluation["failed"] == {"3": "error 3: gone"}
    assert strategy.evaluation["nodes"] == 2 and strategy.evaluation["num_examples"] == 40


def test_unsolicited_and_duplicate_replies_are_rejected():
    strategy = fedavg_strategy()
    sent = [instruction(array_record(GLOBAL), {}, node_id=7)]
    strategy._outgoing[("train", 1)] = sent
    first = train_reply(7, client(1.0), metrics(5))
    again = train_reply(7, client(9.0), metrics(500))
    stranger = train_reply(8, client(9.0), metrics(500))
    arrays, _ = strategy.aggregate_train(1, [first, again, stranger])
    np.testing.assert_allclose(arrays["w"].numpy(), np.ones((2, 2)))
    assert sorted(strategy.reports[1].rejected.values()) == ["unsolicited or duplicate reply"] * 2
