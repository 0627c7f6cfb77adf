"""Server-side aggregation: robust FedAvg with update validation and optional client-level DP.

:class:`GuardedStrategy` wraps a Flower 1.42 Message-API strategy (FedAvg, FedMedian,
FedTrimmedAvg, or FedAvg inside DifferentialPrivacyClientSideFixedClipping) and, before the
inner strategy sees them, sorts every reply into

* ``failed`` - an error reply (ClientApp raised, node unreachable or dead), or no reply,
* ``declined`` - the lab sat the round out (privacy budget exhausted),
* ``rejected`` - wrong tensor names/shapes/dtypes, NaN/Inf values, bad metrics (e.g. an
  epsilon that is no privacy claim), an outlier update (its distance to the global model is
  far above the round's median), or (client-level DP) an update larger than the clipping norm,
* ``accepted``.

One lab must not be able to take over the global model, so accepted updates are then bounded
(outside client-level DP, where the clipping norm already bounds them):

1. the FedAvg weight is the reported example count capped at ``max_examples``;
2. every update's delta (reply minus global model) is scaled down to a norm bound: an absolute
   ``norm_bound``, or else the lower median of the round's update norms. The lower median is
   always one of the norms, so with two labs the larger update is cut to the honest-looking
   one rather than to a midpoint an attacker can push up;
3. optionally the coordinate-wise median or trimmed mean replaces the mean when at least
   :data:`ROBUST_MIN_UPDATES` updates are accepted.

An aggregate with NaN/Inf values is discarded. With fewer than ``min_updates`` accepted
replies the global model is kept. Every round leaves a :class:`RoundReport` with the norm,
weight and fate of every update.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)
from flwr.supercore import log
from flwr.supercore.differential_privacy import compute_stdv

#: Metric keys a ClientApp may send in a train reply (anything else is rejected).
TRAIN_METRIC_KEYS = frozenset(
    {"num-examples", "unit-weight", "train-loss", "train-dice", "epsilon", "delta", "steps"}
)
#: Metric keys a ClientApp may send in an evaluate reply.
EVAL_METRIC_KEYS = frozenset(
    {"num-examples", "unit-weight", "eval-loss", "dice", "jaccard", "pixel-accuracy"}
)
#: Names of the records in messages.
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
REASON_KEY = "reason"
#: Largest epsilon a lab may report: beyond it the figure is no privacy claim,
#: and a model card cannot carry it, so the report is treated as corrupt.
EPSILON_LIMIT = 1e6
#: Accepted updates needed for the median / trimmed mean: with fewer, one lab
#: is as much as a third of the votes, and the rules fall back to the mean.
ROBUST_MIN_UPDATES = 4
_NO_REPLY = "no reply before the round timeout"


class NotEnoughNodesError(RuntimeError):
    """Fewer than ``min_clients`` SuperNodes connected within the wait timeout."""


def _numpy(value) -> np.ndarray:
    """A Flower ``Array`` (or anything with ``.numpy()``) or array-like as a numpy array."""
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    return np.asarray(value)


def array_spec(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of an ArrayRecord or a mapping of arrays."""
    numpy_arrays = {name: _numpy(value) for name, value in arrays.items()}
    return {name: (tuple(array.shape), array.dtype.str) for name, array in numpy_arrays.items()}


def check_arrays(reference: Mapping[str, tuple[tuple[int, ...], str]],
                 arrays: ArrayRecord | Mapping[str, np.ndarray]) -> str | None:
    """Why ``arrays`` cannot be aggregated with the global model (spec ``reference``), or None.

    The reason names missing/unexpected arrays, a shape or dtype mismatch or non-finite values.
    """
    missing = sorted(set(reference) - set(arrays.keys()))
    unexpected = sorted(set(arrays.keys()) - set(reference))
    if missing or unexpected:
        return f"array names differ from the global model (missing {missing[:3]}, unexpected {unexpected[:3]})"
    for name, (shape, dtype) in reference.items():
        try:
            value = _numpy(arrays[name])
        except Exception as exc:  # undecodable array
            return f"array {name!r} cannot be decoded ({exc})"
        if tuple(value.shape) != tuple(shape):
            return f"shape mismatch for {name!r}: expected {list(shape)}, received {list(value.shape)}"
        if value.dtype.str != dtype:
            return f"dtype mismatch for {name!r}: expected {dtype}, received {value.dtype.str}"
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            return f"non-finite values (NaN/Inf) in {name!r}"
    return None


def update_norm(new: Mapping[str, np.ndarray] | ArrayRecord, old: Mapping[str, np.ndarray] | ArrayRecord) -> float:
    """L2 norm of ``new - old`` over all arrays."""
    return math.sqrt(sum(
        float(np.sum((_numpy(new[name]).astype(np.float64) - _numpy(old[name])) ** 2)) for name in old
    ))  # fmt: skip


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def valid_epsilon(value) -> float | None:
    """``value`` as a float if it is a usable privacy claim (finite, in ``(0, EPSILON_LIMIT]``), else None."""
    return float(value) if _finite_number(value) and 0 < float(value) <= EPSILON_LIMIT else None


def check_train_metrics(metrics: MetricRecord | Mapping, weight_key: str) -> str | None:
    """Why a train reply's metrics are unusable, or None.

    Only the scalar summaries of :data:`TRAIN_METRIC_KEYS` are accepted, each finite; the
    ``weight_key`` and ``num-examples`` must be positive, an epsilon in ``(0, EPSILON_LIMIT]``,
    a delta in ``(0, 1)``, steps non-negative.
    """
    keys = set(metrics.keys())
    extra = sorted(keys - TRAIN_METRIC_KEYS)
    if extra:
        return f"unexpected metric keys {extra[:5]} (only scalar summaries are accepted)"
    for key in keys:
        if not _finite_number(metrics[key]):
            return f"metric {key!r} is not a finite scalar"
    if "epsilon" in keys and valid_epsilon(metrics["epsilon"]) is None:
        return f"metric 'epsilon' must be > 0 and <= {EPSILON_LIMIT:g}, received {metrics['epsilon']}"
    if "delta" in keys and not 0 < float(metrics["delta"]) < 1:
        return f"metric 'delta' must be in (0, 1), received {metrics['delta']}"
    if "steps" in keys and float(metrics["steps"]) < 0:
        return f"metric 'steps' must be >= 0, received {metrics['steps']}"
    if weight_key not in keys:
        return f"metric {weight_key!r} missing"
    if float(metrics[weight_key]) <= 0:
        return f"metric {weight_key!r} must be positive, received {metrics[weight_key]}"
    if "num-examples" not in keys or float(metrics["num-examples"]) <= 0:
        return "metric 'num-examples' missing or not positive"
    return None


@dataclass
class RoundReport:
    """What happened in one training round (JSON-serialisable via :meth:`to_dict`).

    Node ids are Flower's SuperNode ids; lab names never reach the server. ``updates`` maps
    every node whose update passed validation to its ``norm`` (L2 distance to the global model,
    None if not finite), ``weight`` (after the cap), ``capped`` (the reported weight was
    larger), ``clipped`` (scaled down to ``norm_bound``) and ``rejected`` (dropped as an
    outlier); ``clipped`` says, per clipped node, from which norm to which its update was
    scaled. ``aggregation`` is the rule used.
    """

    round: int
    sampled: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    clipped: dict[str, str] = field(default_factory=dict)
    aggregated: bool = False
    num_examples: int = 0
    train_loss: float | None = None
    train_dice: float | None = None
    epsilon_max: float | None = None
    update_noise_std: float | None = None
    updates: dict[str, dict] = field(default_factory=dict)
    norm_bound: float | None = None
    aggregation: str = "mean"
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict:
        """Plain dictionary for JSON."""
        return asdict(self)


def _reply_metrics(msg: Message) -> MetricRecord | None:
    records = msg.content.metric_records
    return next(iter(records.values())) if len(records) == 1 else None


def _rule_name(strategy: Strategy) -> str:
    """Aggregation rule of a Flower strategy: ``mean``, ``median`` or ``trimmed-mean``."""
    if isinstance(strategy, FedMedian):
        return "median"
    return "trimmed-mean" if isinstance(strategy, FedTrimmedAvg) else "mean"


def _error(msg: Message) -> str:
    return f"error {msg.error.code}: {(msg.error.reason or '')[:200]}"


@dataclass
class _Update:
    """An accepted reply on its way to aggregation."""

    node: int
    msg: Message
    metrics: MetricRecord
    weight: float
    examples: float
    delta: dict[str, np.ndarray] = field(default_factory=dict)
    norm: float = 0.0


class GuardedStrategy(Strategy):
    """Validate and bound replies, then delegate aggregation to an inner strategy.

    Parameters
    ----------
    inner : Strategy
        FedAvg, FedMedian, FedTrimmedAvg, or FedAvg wrapped in
        DifferentialPrivacyClientSideFixedClipping.
    reference : ArrayRecord
        Initial global model: names, shapes and dtypes every update must match.
    min_clients : int
        Nodes that must be connected before a round is configured.
    min_updates : int
        Accepted updates needed to aggregate.
    weight_key : str
        Metric used as FedAvg weight (``num-examples``; ``unit-weight`` for client-level DP,
        whose noise calibration assumes uniform weights).
    node_wait_timeout : float
        Seconds to wait for ``min_clients`` nodes.
    dp_clipping_norm : float, optional
        Reject updates whose L2 distance to the current global model exceeds this
        (client-level DP: the clipping norm, plus a small tolerance).
    max_examples : float, optional
        Cap on every reported weight and example count (None: no cap).
    uniform_weights : bool
        Aggregate with weight 1 whatever a lab reports (client-level DP).
    outlier_factor : float, optional
        With at least 3 accepted updates, reject those whose norm exceeds this times the
        median norm (None: no outlier rejection).
    bound_updates : bool
        Scale every delta down to ``norm_bound`` before aggregation.
    norm_bound : float, optional
        Absolute bound on update norms; None uses the lower median of the round's norms.
    fallback : Strategy, optional
        Weighted mean used instead of a median / trimmed-mean ``inner`` when fewer than
        :data:`ROBUST_MIN_UPDATES` updates are accepted.
    """

    def __init__(
        self,
        inner: Strategy,
        reference: ArrayRecord,
        *,
        min_clients: int = 1,
        min_updates: int = 1,
        weight_key: str = "num-examples",
        node_wait_timeout: float = 300.0,
        dp_clipping_norm: float | None = None,
        max_examples: float | None = 10000,
        uniform_weights: bool = False,
        outlier_factor: float | None = 3.0,
        bound_updates: bool = True,
        norm_bound: float | None = None,
        fallback: Strategy | None = None,
    ) -> None:
        self.inner = inner
        self.reference = array_spec(reference)
        self.min_clients = int(min_clients)
        self.min_updates = int(min_updates)
        self.weight_key = weight_key
        self.node_wait_timeout = float(node_wait_timeout)
        self.dp_clipping_norm = dp_clipping_norm
        self.max_examples = float(max_examples) if max_examples else None
        self.uniform_weights = bool(uniform_weights)
        self.outlier_factor = float(outlier_factor) if outlier_factor else None
        self.bound_updates = bool(bound_updates)
        self.norm_bound = float(norm_bound) if norm_bound else None
        self.fallback = fallback
        self.aggregation = _rule_name(inner)
        self.current: ArrayRecord = reference
        self.reports: dict[int, RoundReport] = {}
        self.evaluation: dict | None = None
        self._outgoing: dict[tuple[str, int], list[Message]] = {}

    def wait_for_nodes(self, grid: Grid, minimum: int | None = None) -> list[int]:
        """Block until ``minimum`` (default ``min_clients``) nodes are connected; return their ids.

        Raises
        ------
        NotEnoughNodesError
            After ``node_wait_timeout`` seconds.
        """
        minimum = self.min_clients if minimum is None else minimum
        deadline = time.monotonic() + self.node_wait_timeout
        last_logged = 0.0
        while len(nodes := list(grid.get_node_ids())) < minimum:
            if time.monotonic() > deadline:
                raise NotEnoughNodesError(
                    f"only {len(nodes)} SuperNode(s) connected after {self.node_wait_timeout:.0f} s, "
                    f"{minimum} required (min-clients)"
                )
            if time.monotonic() - last_logged > 10:
                log(INFO, "Waiting for SuperNodes: %d connected, %d required", len(nodes), minimum)
                last_logged = time.monotonic()
            time.sleep(1.0)
        return nodes

    def _replies(self, kind: str, server_round: int, replies: Iterable[Message]):
        """The nodes sent to this round, and ``(node, reply)`` for every reply.

        The SuperLink answers for dead nodes itself (src = SuperLink), so a reply is matched to
        the node it answers for by its reply_to id.
        """
        outgoing = self._outgoing.pop((kind, server_round), [])
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in outgoing if m.metadata.message_id}
        pairs = [(str(by_id.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)), r) for r in replies]
        return [m.metadata.dst_node_id for m in outgoing], pairs

    # ------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Wait for nodes, remember the global model, delegate to the inner strategy."""
        self.wait_for_nodes(grid)
        self.current = arrays
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._outgoing[("train", server_round)] = messages
        return messages

    def forget_train(self, server_round: int) -> None:
        """Drop the remembered training messages of a round aggregated elsewhere (secure aggregation)."""
        self._outgoing.pop(("train", server_round), None)

    def _check_reply(self, msg: Message, metrics: MetricRecord | None) -> str | None:
        content = msg.content
        if len(content.array_records) != 1 or ARRAYS_KEY not in content.array_records:
            return f"expected exactly one ArrayRecord named {ARRAYS_KEY!r}"
        if metrics is None:
            return "expected exactly one MetricRecord"
        arrays = content.array_records[ARRAYS_KEY]
        reason = check_train_metrics(metrics, self.weight_key) or check_arrays(self.reference, arrays)
        if reason or self.dp_clipping_norm is None:
            return reason
        norm = update_norm(arrays, self.current)
        if not norm <= self.dp_clipping_norm * (1 + 1e-4) + 1e-6:
            return (f"update norm {norm:.4g} exceeds the clipping norm {self.dp_clipping_norm:.4g} "
                    "(client-level DP requires clipped updates)")  # fmt: skip
        return None

    def _classify(self, server_round: int, replies: Iterable[Message]) -> tuple[list[_Update], RoundReport]:
        """Sort replies into accepted / rejected / declined / failed; weigh the accepted ones."""
        sampled, pairs = self._replies("train", server_round, replies)
        report = RoundReport(round=server_round, sampled=sampled)
        expected = {str(node) for node in sampled}
        cap = self.max_examples if self.max_examples is not None else math.inf
        updates: list[_Update] = []
        seen: set[str] = set()
        for node, msg in pairs:
            if node in seen or (expected and node not in expected):
                report.rejected[f"{node}#{len(report.rejected)}"] = "unsolicited or duplicate reply"
                continue
            seen.add(node)
            if msg.has_error():
                report.failed[node] = _error(msg)
                continue
            metrics = _reply_metrics(msg)
            declined = metrics.get("declined") if metrics is not None else None
            if _finite_number(declined) and float(declined) == 1.0:
                reasons = [str(r[REASON_KEY])[:300] for r in msg.content.config_records.values() if REASON_KEY in r]
                report.declined[node] = reasons[0] if reasons else "declined"
                continue
            reason = self._check_reply(msg, metrics)
            if reason:
                report.rejected[node] = reason
                log(WARNING, "Rejected update from node %s: %s", node, reason)
                continue
            reported = float(metrics[self.weight_key])
            weight = 1.0 if self.uniform_weights else min(reported, cap)
            examples = min(float(metrics["num-examples"]), cap)
            updates.append(_Update(int(node), msg, metrics, weight, examples))
            report.accepted.append(int(node))
            report.updates[node] = {
                "norm": None, "weight": weight, "capped": weight < reported, "clipped": False, "rejected": False,
            }  # fmt: skip
        report.failed |= {str(n): _NO_REPLY for n in sampled if str(n) not in seen}
        return updates, report

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, weigh and bound the replies, aggregate them, record a :class:`RoundReport`.

        Parameters
        ----------
        server_round : int
        replies : iterable of Message
            Train replies as the Grid returns them (errors included).

        Returns
        -------
        (ArrayRecord, MetricRecord) or (None, None)
            The new global model and round metrics; (None, None) keeps the global model (too
            few valid updates, a failed or non-finite aggregate). Never raises because of what
            a lab sent.
        """
        updates, report = self._classify(server_round, replies)
        self.reports[server_round] = report
        updates = self._screen(updates, report)
        examples = sum(u.examples for u in updates)
        report.num_examples = int(examples)
        if examples:
            report.train_loss = sum(u.examples * float(u.metrics.get("train-loss", 0.0)) for u in updates) / examples
            report.train_dice = sum(u.examples * float(u.metrics.get("train-dice", 0.0)) for u in updates) / examples
        report.epsilon_max = max((float(u.metrics["epsilon"]) for u in updates if "epsilon" in u.metrics), default=None)
        notes: list[str] = []
        if report.clipped:
            notes.append(f"update(s) of node(s) {', '.join(report.clipped)} scaled down to norm "
                         f"{report.norm_bound:.4g}")  # fmt: skip
        for update in updates:
            # The inner strategies need identical metric keys in every reply; they only use the weight.
            for key in list(update.msg.content.metric_records.keys()):
                del update.msg.content[key]
            update.msg.content[METRICS_KEY] = MetricRecord({self.weight_key: update.weight})
        accepted = [update.msg for update in updates]
        if len(accepted) < self.min_updates:
            return self._skip(report, notes, f"only {len(accepted)} valid update(s), {self.min_updates} required")
        aggregator, report.aggregation = self.inner, self.aggregation
        if self.fallback is not None and len(accepted) < ROBUST_MIN_UPDATES:
            aggregator, report.aggregation = self.fallback, _rule_name(self.fallback)
            notes.append(f"{self.aggregation} needs {ROBUST_MIN_UPDATES} accepted updates, "
                         f"{len(accepted)} received: weighted mean used")  # fmt: skip
        if isinstance(dp := self.inner, DifferentialPrivacyClientSideFixedClipping):
            # Calibrate the noise to the updates actually averaged (conservative).
            dp.num_sampled_clients = len(accepted)
            report.update_noise_std = float(compute_stdv(dp.noise_multiplier, dp.clipping_norm, len(accepted)))
        try:
            arrays, _ = aggregator.aggregate_train(server_round, accepted)
        except Exception as exc:  # a bad round must not end the run
            return self._skip(report, notes, f"aggregation failed ({type(exc).__name__}: {str(exc)[:200]})")
        if arrays is None:
            return self._skip(report, notes, "inner strategy did not aggregate")
        reason = check_arrays(self.reference, arrays)
        if reason:
            return self._skip(report, notes, f"aggregate discarded: {reason}")
        report.aggregated = True
        report.note = "; ".join(notes)
        extra = {"train-loss": report.train_loss, "train-dice": report.train_dice, "epsilon-max": report.epsilon_max}
        return arrays, MetricRecord({"num-examples": report.num_examples, "accepted": len(report.accepted),
                                     **{key: value for key, value in extra.items() if value is not None}})

    @staticmethod
    def _skip(report: RoundReport, notes: list[str], why: str) -> tuple[None, None]:
        report.note = "; ".join([*notes, f"{why}; global model unchanged"])
        log(WARNING, "Round %s: %s", report.round, report.note)
        return None, None

    def _screen(self, updates: list[_Update], report: RoundReport) -> list[_Update]:
        """Measure every delta, reject outliers, clip the rest to the norm bound.

        Returns the updates to aggregate; rejected ones move from ``report.accepted`` to
        ``report.rejected``.
        """
        if not updates:
            return updates
        # Integer buffers (counters) are no weights: they are neither measured nor clipped.
        arrays = {name: _numpy(value) for name, value in self.current.items()}
        current = {name: array.astype(np.float64) for name, array in arrays.items() if array.dtype.kind == "f"}
        for update in updates:
            arrays = update.msg.content[ARRAYS_KEY]
            with np.errstate(over="ignore", invalid="ignore"):
                update.delta = {name: arrays[name].numpy().astype(np.float64) - old for name, old in current.items()}
                total = sum(float(np.sum(delta * delta)) for delta in update.delta.values())
            update.norm = math.sqrt(total) if math.isfinite(total) else math.inf
            report.updates[str(update.node)]["norm"] = update.norm if math.isfinite(update.norm) else None
        if not (self.bound_updates or self.outlier_factor):
            return updates

        def reject(update: _Update, reason: str) -> None:
            report.accepted.remove(update.node)
            report.rejected[str(update.node)] = reason
            report.updates[str(update.node)]["rejected"] = True
            log(WARNING, "Rejected update from node %s: %s", update.node, reason)

        for update in [u for u in updates if not math.isfinite(u.norm)]:
            reject(update, "update norm is not finite (values too large)")
        kept = [u for u in updates if math.isfinite(u.norm)]
        median = float(np.median([u.norm for u in kept])) if len(kept) >= 3 else 0.0
        # A zero median means most labs did not move; the clipping bound (then 0 as well)
        # already neutralises the others.
        if self.outlier_factor and median > 0:
            for update in [u for u in kept if u.norm > self.outlier_factor * median]:
                kept.remove(update)
                reject(update, f"outlier: update norm {update.norm:.4g} exceeds "
                               f"{self.outlier_factor:g} x the median norm {median:.4g}")  # fmt: skip
        if not (self.bound_updates and kept):
            return kept
        bound = self.norm_bound or float(statistics.median_low([u.norm for u in kept]))
        report.norm_bound = bound
        for update in (u for u in kept if u.norm > bound):
            arrays = update.msg.content[ARRAYS_KEY]
            clipped = {name: arrays[name] for name in arrays}
            for name, delta in update.delta.items():  # global + delta * bound / norm, in the reply's dtype
                value = (current[name] + delta * (bound / update.norm)).astype(arrays[name].numpy().dtype)
                clipped[name] = Array(np.ascontiguousarray(value))
            update.msg.content[ARRAYS_KEY] = ArrayRecord(clipped)
            report.updates[str(update.node)]["clipped"] = True
            report.clipped[str(update.node)] = f"norm {update.norm:.4g} scaled to {bound:.4g}"
        return kept

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the model to every connected node (no minimum beyond one)."""
        nodes = self.wait_for_nodes(grid, minimum=1)
        config["server-round"] = server_round
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        messages = [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]
        self._outgoing[("evaluate", server_round)] = messages
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of finite evaluation metrics; failures are counted."""
        sampled, pairs = self._replies("evaluate", server_round, replies)
        totals: dict[str, float] = {}
        examples = 0
        failed: dict[str, str] = {}
        per_node: dict[str, dict[str, float]] = {}
        used = 0
        for node, msg in pairs:
            metrics = None if msg.has_error() else _reply_metrics(msg)
            keys = set(metrics.keys()) if metrics is not None else set()
            if msg.has_error():
                failed[node] = _error(msg)
            elif metrics is None:
                failed[node] = "expected exactly one MetricRecord"
            elif keys - EVAL_METRIC_KEYS or not all(_finite_number(metrics[k]) for k in keys):
                failed[node] = "invalid evaluation metrics"
            elif (n := min(float(metrics.get("num-examples", 0)), self.max_examples or math.inf)) <= 0:
                failed[node] = "no evaluation examples"
            else:
                used += 1
                examples += int(n)
                per_node[node] = {k: float(metrics[k]) for k in keys - {"unit-weight"}}
                for key in keys - {"num-examples", "unit-weight"}:
                    totals[key] = totals.get(key, 0.0) + n * float(metrics[key])
        answered = {node for node, _ in pairs}
        failed |= {str(n): _NO_REPLY for n in sampled if str(n) not in answered}
        result = {k: v / examples for k, v in totals.items()} if examples else {}
        self.evaluation = {"round": server_round, "nodes": used, "num_examples": examples,
                           "metrics": result, "per_node": per_node, "failed": failed}  # fmt: skip
        return MetricRecord({**result, "num-examples": examples}) if examples else None

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "GuardedStrategy: min-clients %d, min-updates %d, weight %r",
            self.min_clients, self.min_updates, self.weight_key)  # fmt: skip
        log(INFO, "GuardedStrategy: aggregation %s, max-examples %s, outlier-factor %s, "
            "update norm bound %s", self.aggregation, self.max_examples, self.outlier_factor,
            (self.norm_bound or "lower median") if self.bound_updates else "none")  # fmt: skip
        self.inner.summary()


def build_strategy(settings, initial: ArrayRecord) -> GuardedStrategy:
    """The strategy for a :class:`~napari_feddp.federation.settings.RunSettings`.

    ``dp_mode == "update"`` wraps FedAvg (uniform weights) in Flower's
    :class:`DifferentialPrivacyClientSideFixedClipping`; the ClientApp clips with Flower's
    ``fixedclipping_mod`` and the clipping norm bounds every update. Other modes use FedAvg
    weighted by capped example counts (or Flower's FedMedian / FedTrimmedAvg, per
    ``aggregation``), outlier rejection and the update norm bound of the settings.
    """
    update_dp = settings.dp_mode == "update"
    weight_key = "unit-weight" if update_dp else "num-examples"
    common = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=1.0 if settings.final_evaluation else 0.0,
        min_train_nodes=settings.min_clients,
        min_evaluate_nodes=1,
        min_available_nodes=settings.min_clients,
        weighted_by_key=weight_key,
        arrayrecord_key=ARRAYS_KEY,
        configrecord_key=CONFIG_KEY,
    )
    inner: Strategy = FedAvg(**common)
    fallback: Strategy | None = None
    if update_dp:
        inner = DifferentialPrivacyClientSideFixedClipping(
            inner,
            noise_multiplier=settings.update_noise_multiplier,
            clipping_norm=settings.update_clipping_norm,
            num_sampled_clients=settings.min_clients,
        )
    elif settings.aggregation == "median":
        inner, fallback = FedMedian(**common), inner
    elif settings.aggregation == "trimmed-mean":
        inner, fallback = FedTrimmedAvg(**common, beta=settings.trim_fraction), inner
    return GuardedStrategy(
        inner,
        initial,
        min_clients=settings.min_clients,
        min_updates=settings.min_updates,
        weight_key=weight_key,
        node_wait_timeout=settings.node_wait_timeout,
        dp_clipping_norm=settings.update_clipping_norm if update_dp else None,
        max_examples=settings.max_examples,
        uniform_weights=update_dp,
        # With client-level DP the clipping norm bounds every update, and dropping or
        # rescaling updates by the round's median would make the aggregate depend on other
        # labs in a way the noise does not cover.
        outlier_factor=None if update_dp else settings.outlier_factor,
        bound_updates=not update_dp,
        norm_bound=settings.max_update_norm or None,
        fallback=fallback,
    )
