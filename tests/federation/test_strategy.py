"""Server-side aggregation on hand-made replies: FedAvg weights, rejection, DP."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, MetricRecord, RecordDict

from napari_feddp.federation.strategy import (
    GuardedStrategy,
    array_spec,
    build_strategy,
    check_arrays,
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


def test_fedavg_weights_by_examples_like_a_hand_computation():
    # An absolute norm bound above every update: no clipping, plain FedAvg.
    strategy = fedavg_strategy(max_update_norm=100.0)
    replies = [
        train_reply(11, client(1.0), metrics(10, epsilon=1.5)),
        train_reply(12, client(2.0), metrics(30, epsilon=2.5)),
        train_reply(13, client(4.0), metrics(60, epsilon=0.5)),
    ]
    arrays, agg = strategy.aggregate_train(1, replies)
    expected = (10 * 1.0 + 30 * 2.0 + 60 * 4.0) / 100  # 3.1
    for name, value in arrays.items():
        np.testing.assert_allclose(value.numpy(), np.full(GLOBAL[name].shape, expected), rtol=1e-6)
        assert value.numpy().dtype == np.float32
    report = strategy.reports[1]
    assert report.accepted == [11, 12, 13] and report.aggregated
    assert report.num_examples == 100
    assert report.epsilon_max == pytest.approx(2.5)  # the maximum over labs, not a mean
    assert agg["num-examples"] == 100 and agg["epsilon-max"] == pytest.approx(2.5)


def test_nan_and_wrong_shape_updates_are_rejected_and_the_round_goes_on():
    strategy = fedavg_strategy(max_update_norm=100.0)
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
        "reason": ConfigRecord({"reason": "next round would reach epsilon 9.0 > budget 8.0"}),
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
    assert report.declined == {"2": "next round would reach epsilon 9.0 > budget 8.0"}
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


# --------------------------------------------------------------------------- one malicious lab

# A global model away from zero with coordinates of both signs, so that deltas,
# not raw weights, are what the strategy has to bound.
ROBUST_GLOBAL = {
    "w": np.random.default_rng(0).normal(size=(6, 6)).astype(np.float32),
    "b": np.random.default_rng(1).normal(size=6).astype(np.float32),
}
HONEST_EXAMPLES = 100


def flat(arrays) -> np.ndarray:
    """All arrays of an ArrayRecord or dict as one float64 vector (reference order)."""
    return np.concatenate([
        np.asarray(arrays[k].numpy() if hasattr(arrays[k], "numpy") else arrays[k], np.float64).ravel()
        for k in ROBUST_GLOBAL
    ])


def honest_deltas(count: int, seed: int = 2) -> list[dict[str, np.ndarray]]:
    """Updates of honest labs: one shared descent direction plus lab noise, norms near 1."""
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=v.shape) for k, v in ROBUST_GLOBAL.items()}
    scale = 1.0 / np.linalg.norm(flat(base))
    return [
        {k: (base[k] + 0.3 * rng.normal(size=base[k].shape)) * scale for k in base}
        for _ in range(count)
    ]


def weights_after(delta: dict[str, np.ndarray], factor: float = 1.0) -> dict[str, np.ndarray]:
    """What a lab sends: global model plus ``factor`` times its delta, in float32."""
    return {k: (ROBUST_GLOBAL[k] + factor * delta[k]).astype(np.float32) for k in ROBUST_GLOBAL}


def robust_strategy(**changes) -> GuardedStrategy:
    settings = tiny_settings(dp_mode="none", min_clients=1, **changes)
    return build_strategy(settings, array_record(ROBUST_GLOBAL))


def honest_round(deltas) -> list:
    return [
        train_reply(node, weights_after(d), metrics(HONEST_EXAMPLES, epsilon=2.0))
        for node, d in enumerate(deltas, start=1)
    ]


def honest_mean_delta(deltas) -> np.ndarray:
    """The honest labs' FedAvg step (they all report the same example count)."""
    return np.mean([flat(weights_after(d)) - flat(ROBUST_GLOBAL) for d in deltas], axis=0)


def step_of(arrays) -> np.ndarray:
    return flat(arrays) - flat(ROBUST_GLOBAL)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


HUGE = {k: np.full(v.shape, 1e30, dtype=np.float32) for k, v in ROBUST_GLOBAL.items()}


@pytest.mark.parametrize("honest_examples", [10000, 500])
def test_huge_weights_and_example_count_from_one_of_two_labs_move_the_model_one_honest_step(
    honest_examples,
):
    """Two labs, one sends weights of 1e30 and claims 1e9 examples.

    With two labs nobody can tell which one is honest, so the guarantee is a
    bound: the attacker's weight is capped at max-examples (10000) and its
    delta scaled down to the lower median norm, which is the honest norm. The
    model then moves no further than one honest step, and lies within
    ``2 * r * w_attacker / (w_attacker + w_honest)`` of the honest update
    (``r`` the honest norm): within ``r`` when the honest lab is as large as the
    cap, as a lab of 10000 tiles is.
    """
    (delta,) = honest_deltas(1)
    strategy = robust_strategy()
    replies = [
        train_reply(1, weights_after(delta), metrics(honest_examples, epsilon=2.0)),
        train_reply(2, HUGE, metrics(10**9, epsilon=2.0)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.reports[1]
    honest = step_of(weights_after(delta))
    r = np.linalg.norm(honest)
    step = step_of(arrays)
    assert np.all(np.isfinite(step))
    assert report.accepted == [1, 2] and report.aggregated
    assert report.updates["2"]["weight"] == 10000 and report.updates["2"]["capped"]
    assert report.updates["2"]["clipped"] and not report.updates["1"]["clipped"]
    assert list(report.clipped) == ["2"] and "scaled to" in report.clipped["2"]
    assert report.norm_bound == pytest.approx(r)
    assert report.num_examples == honest_examples + 10000
    assert np.linalg.norm(step) <= r * (1 + 1e-5)
    share = 10000 / (10000 + honest_examples)
    assert np.linalg.norm(step - honest) <= 2 * r * share * (1 + 1e-5)
    if honest_examples == 10000:
        assert np.linalg.norm(step - honest) <= r
    # the next round starts from a sane model: honest updates are accepted again
    strategy.current = arrays
    strategy.aggregate_train(2, [train_reply(1, {k: arrays[k].numpy() + 0.01 for k in arrays},
                                             metrics(honest_examples))])
    assert strategy.reports[2].accepted == [1] and strategy.reports[2].aggregated


def test_huge_weights_from_one_of_four_labs_are_rejected_as_an_outlier():
    deltas = honest_deltas(3)
    strategy = robust_strategy()
    replies = honest_round(deltas) + [train_reply(4, HUGE, metrics(10**9, epsilon=2.0))]
    arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.reports[1]
    assert report.accepted == [1, 2, 3]
    assert report.rejected["4"].startswith("outlier") and report.updates["4"]["rejected"]
    assert report.num_examples == 3 * HONEST_EXAMPLES
    step, honest = step_of(arrays), honest_mean_delta(deltas)
    assert np.all(np.isfinite(step))
    assert np.linalg.norm(step - honest) <= min(np.linalg.norm(flat(d)) for d in deltas)


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_sign_flip_from_one_of_four_labs_is_outvoted_by_median_and_trimmed_mean(aggregation):
    from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

    deltas = honest_deltas(3)
    strategy = robust_strategy(aggregation=aggregation)
    assert isinstance(strategy.inner, FedMedian if aggregation == "median" else FedTrimmedAvg)
    # twice the honest step, reversed: not an outlier (< 3x the median norm)
    flipped = {k: -2 * np.mean([d[k] for d in deltas], axis=0) for k in ROBUST_GLOBAL}
    replies = honest_round(deltas) + [train_reply(4, weights_after(flipped), metrics(10**9))]
    arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.reports[1]
    assert report.accepted == [1, 2, 3, 4] and report.aggregation == aggregation
    step, honest = step_of(arrays), honest_mean_delta(deltas)
    assert cosine(step, honest) > 0.9
    assert np.linalg.norm(step - honest) < 0.5 * np.linalg.norm(honest)


def test_sign_flip_with_the_mean_is_not_outvoted_but_bounded_to_one_honest_step():
    """With the weighted mean a flipped update claiming 1e9 examples still wins
    the average (its weight is capped at 10000 against 3 x 100): the aggregate
    points the wrong way. The norm bound limits the damage: the flip is scaled
    down to an honest lab's norm, so the model moves no further than one honest
    step instead of being thrown 2x the honest step (or any distance) away.
    """
    deltas = honest_deltas(3)
    strategy = robust_strategy(aggregation="mean")
    flipped = {k: -2 * np.mean([d[k] for d in deltas], axis=0) for k in ROBUST_GLOBAL}
    replies = honest_round(deltas) + [train_reply(4, weights_after(flipped), metrics(10**9))]
    arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.reports[1]
    assert report.accepted == [1, 2, 3, 4] and report.aggregation == "mean"
    assert report.updates["4"]["clipped"] and report.updates["4"]["weight"] == 10000
    honest_norms = sorted(np.linalg.norm(flat(d)) for d in deltas)
    assert report.norm_bound == pytest.approx(honest_norms[1], rel=1e-5)  # lower median of 4
    step = step_of(arrays)
    assert np.linalg.norm(step) <= report.norm_bound * (1 + 1e-5)
    assert cosine(step, honest_mean_delta(deltas)) < 0  # the damage that remains


def test_scaled_update_from_one_of_four_labs_is_rejected_as_an_outlier():
    deltas = honest_deltas(4)
    strategy = robust_strategy()
    replies = honest_round(deltas[:3]) + [
        train_reply(4, weights_after(deltas[3], factor=50.0), metrics(HONEST_EXAMPLES))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.reports[1]
    assert report.accepted == [1, 2, 3]
    assert "outlier" in report.rejected["4"] and "median norm" in report.rejected["4"]
    assert report.updates["4"] == {
        "norm": pytest.approx(50 * np.linalg.norm(flat(deltas[3])), rel=1e-5),
        "weight": HONEST_EXAMPLES,
        "capped": False,
        "clipped": False,
        "rejected": True,
    }
    step, honest = step_of(arrays), honest_mean_delta(deltas[:3])
    assert cosine(step, honest) > 0.99
    assert np.linalg.norm(step - honest) <= 0.1 * np.linalg.norm(honest)
    json.dumps(report.to_dict())  # the report goes to rounds.jsonl as is


def _equal_norm_round():
    """Three labs whose deltas differ only in signs: exactly equal norms.

    Global values are multiples of 1/4 and delta magnitudes multiples of 1/8,
    so every sent weight is exact in float32 and every delta recovered exactly.
    """
    rng = np.random.default_rng(5)
    global_ = {k: (rng.integers(-8, 8, size=v.shape) / 4).astype(np.float32) for k, v in GLOBAL.items()}
    magnitude = {k: rng.integers(1, 8, size=v.shape) / 8 for k, v in GLOBAL.items()}
    sent = []
    for node, examples in ((1, 10), (2, 30), (3, 60)):
        signs = {k: rng.choice([-1.0, 1.0], size=v.shape) for k, v in GLOBAL.items()}
        sent.append((node, {k: (global_[k] + signs[k] * magnitude[k]).astype(np.float32)
                            for k in GLOBAL}, examples))  # fmt: skip
    return global_, sent


def test_honest_round_with_equal_norms_is_exactly_flowers_weighted_fedavg():
    from flwr.serverapp.strategy import FedAvg

    global_, sent = _equal_norm_round()
    strategy = build_strategy(tiny_settings(dp_mode="none", min_clients=1), array_record(global_))
    arrays, _ = strategy.aggregate_train(1, [train_reply(n, a, metrics(e)) for n, a, e in sent])
    plain, _ = FedAvg().aggregate_train(
        1, [train_reply(n, a, {"num-examples": e}) for n, a, e in sent]
    )
    report = strategy.reports[1]
    assert not any(entry["clipped"] for entry in report.updates.values())
    assert len({entry["norm"] for entry in report.updates.values()}) == 1
    for name in GLOBAL:
        np.testing.assert_array_equal(arrays[name].numpy(), plain[name].numpy())


def test_honest_round_is_weighted_fedavg_of_the_clipped_updates():
    deltas = honest_deltas(3)
    strategy = robust_strategy()
    examples = (10, 30, 60)
    replies = [
        train_reply(n, weights_after(d), metrics(e)) for n, (d, e) in enumerate(zip(deltas, examples), 1)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    sent = [step_of(weights_after(d)) for d in deltas]
    norms = [np.linalg.norm(s) for s in sent]
    bound = sorted(norms)[1]
    expected = sum(e * s * min(1.0, bound / n) for s, n, e in zip(sent, norms, examples)) / 100
    np.testing.assert_allclose(step_of(arrays), expected, atol=1e-6)
    report = strategy.reports[1]
    assert report.norm_bound == pytest.approx(bound)
    assert [report.updates[str(n)]["clipped"] for n in (1, 2, 3)] == [x > bound for x in norms]


def test_an_absolute_norm_bound_replaces_the_median_rule():
    deltas = honest_deltas(2)
    strategy = robust_strategy(max_update_norm=0.5)
    arrays, _ = strategy.aggregate_train(1, honest_round(deltas))
    assert strategy.reports[1].norm_bound == 0.5
    assert all(entry["clipped"] for entry in strategy.reports[1].updates.values())
    assert np.linalg.norm(step_of(arrays)) <= 0.5 * (1 + 1e-5)


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_robust_rules_fall_back_to_the_weighted_mean_below_four_updates(aggregation):
    deltas = honest_deltas(3)
    strategy = robust_strategy(aggregation=aggregation, max_update_norm=100.0)
    arrays, _ = strategy.aggregate_train(1, honest_round(deltas))
    report = strategy.reports[1]
    assert report.aggregated and report.aggregation == "mean"
    assert f"{aggregation} needs 4 accepted updates, 3 received: weighted mean used" in report.note
    np.testing.assert_allclose(step_of(arrays), honest_mean_delta(deltas), atol=1e-6)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"epsilon": 0.0}, "'epsilon' must be > 0"),
        ({"epsilon": -0.74}, "'epsilon' must be > 0"),
        ({"epsilon": 1e7}, "'epsilon' must be > 0 and <= 1e+06"),
        ({"epsilon": float("nan")}, "'epsilon' is not a finite scalar"),
        ({"epsilon": float("inf")}, "'epsilon' is not a finite scalar"),
        ({"delta": 0.0}, "'delta' must be in (0, 1)"),
        ({"delta": 1.5}, "'delta' must be in (0, 1)"),
        ({"steps": -1}, "'steps' must be >= 0"),
        ({"declined": [1.0]}, "unexpected metric keys"),
    ],
)
def test_impossible_privacy_reports_are_rejected_with_a_reason(changes, reason):
    strategy = fedavg_strategy()
    replies = [
        train_reply(1, client(1.0), metrics(10, epsilon=1.0, delta=1e-5, steps=3)),
        train_reply(2, client(1.0), {**metrics(10, epsilon=1.0, delta=1e-5, steps=3), **changes}),
    ]
    arrays, agg = strategy.aggregate_train(1, replies)
    report = strategy.reports[1]
    assert report.accepted == [1] and reason in report.rejected["2"]
    assert report.epsilon_max == 1.0 and agg["epsilon-max"] == 1.0


def test_every_lab_reporting_epsilon_zero_skips_the_round_without_an_exception():
    strategy = build_strategy(tiny_settings(dp_mode="sample", min_clients=2), array_record(GLOBAL))
    replies = [train_reply(n, client(1.0), metrics(10, epsilon=0.0)) for n in (1, 2)]
    assert strategy.aggregate_train(1, replies) == (None, None)
    report = strategy.reports[1]
    assert not report.aggregated and report.epsilon_max is None
    assert all("'epsilon' must be > 0" in report.rejected[n] for n in ("1", "2"))
    assert "global model unchanged" in report.note


def test_update_mode_ignores_the_weight_a_lab_claims():
    settings = tiny_settings(dp_mode="update", min_clients=2, update_clipping_norm=1.0,
                             update_noise_multiplier=0.0)
    strategy = build_strategy(settings, array_record(GLOBAL))
    small = client(0.1)
    arrays, _ = strategy.aggregate_train(1, [
        train_reply(1, small, {**metrics(10), "unit-weight": 1e9}),
        train_reply(2, {k: -v for k, v in small.items()}, metrics(10)),
    ])
    report = strategy.reports[1]
    assert report.updates["1"]["weight"] == 1.0 and report.updates["1"]["capped"]
    assert report.norm_bound is None and not report.updates["1"]["clipped"]
    np.testing.assert_allclose(arrays["w"].numpy(), 0.0, atol=1e-7)  # a uniform mean


def test_evaluation_weights_are_capped_too():
    strategy = fedavg_strategy()
    replies = [
        reply(1, RecordDict({"metrics": MetricRecord({"num-examples": 10**9, "dice": 0.0})}),
              message_type="evaluate"),
        reply(2, RecordDict({"metrics": MetricRecord({"num-examples": 10000, "dice": 0.8})}),
              message_type="evaluate"),
    ]
    pooled = strategy.aggregate_evaluate(1, replies)
    assert strategy.evaluation["num_examples"] == 20000 and pooled["dice"] == pytest.approx(0.4)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"aggregation": "mode"}, "aggregation"),
        ({"aggregation": "median", "dp_mode": "update"}, "noise calibration assumes a mean"),
        ({"aggregation": "trimmed-mean", "dp_mode": "update"}, "noise calibration assumes a mean"),
        ({"trim_fraction": 0.5}, "trim-fraction"),
        ({"trim_fraction": 0.0}, "trim-fraction"),
        ({"outlier_factor": 1.0}, "outlier-factor"),
        ({"outlier_factor": float("inf")}, "outlier-factor"),
        ({"max_update_norm": -1.0}, "max-update-norm"),
        ({"max_update_norm": float("nan")}, "max-update-norm"),
        ({"max_examples": 0}, "max-examples"),
    ],
)
def test_bad_robustness_settings_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_settings(**changes)


def test_robustness_settings_travel_in_the_run_config():
    from napari_feddp.federation.settings import RunSettings

    defaults = RunSettings().to_run_config()
    assert {k: defaults[k] for k in ("max-examples", "outlier-factor", "max-update-norm",
                                     "aggregation", "trim-fraction")} == {
        "max-examples": 10000, "outlier-factor": 3.0, "max-update-norm": 0.0,
        "aggregation": "mean", "trim-fraction": 0.25,
    }  # fmt: skip
    settings = tiny_settings(aggregation="trimmed-mean", trim_fraction=0.3, max_update_norm=2.0)
    assert RunSettings.from_run_config(settings.to_run_config()) == settings
    strategy = build_strategy(settings, array_record(GLOBAL))
    assert strategy.inner.beta == 0.3 and strategy.norm_bound == 2.0
