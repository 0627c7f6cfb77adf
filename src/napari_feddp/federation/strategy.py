"""Server-side aggregation: robust FedAvg with update validation and optional client-level DP.

:class:`GuardedStrategy` wraps a Flower 1.42 Message-API strategy
(:class:`flwr.serverapp.strategy.FedAvg`, :class:`~flwr.serverapp.strategy.FedMedian`,
:class:`~flwr.serverapp.strategy.FedTrimmedAvg`, or FedAvg inside
:class:`~flwr.serverapp.strategy.DifferentialPrivacyClientSideFixedClipping`)
and, before the inner strategy sees them, sorts every reply into

* ``failed`` - an error reply (ClientApp raised, node unreachable or dead),
* ``declined`` - the lab sat the round out (privacy budget exhausted),
* ``rejected`` - wrong tensor names/shapes/dtypes, NaN/Inf values, bad metrics
  (e.g. an epsilon that is no privacy claim), an outlier update (its distance to
  the global model is far above the round's median), or (client-level DP) an
  update larger than the clipping norm,
* ``accepted``.

One lab must not be able to take over the global model, so accepted updates are
then bounded (outside client-level DP, where the clipping norm already bounds
them):

1. the FedAvg weight is the reported example count capped at ``max_examples``;
2. every update's delta (reply minus global model) is scaled down to a norm
   bound: an absolute ``norm_bound``, or else the lower median of the round's
   update norms, so that even with two labs the larger update is cut to the
   honest-looking one;
3. optionally the coordinate-wise median or trimmed mean replaces the mean when
   at least :data:`ROBUST_MIN_UPDATES` updates are accepted.

An aggregate with NaN/Inf values is discarded. With fewer than ``min_updates``
accepted replies the global model is kept. Every round leaves a
:class:`RoundReport` with the norm, weight and fate of every update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
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

#: Metric keys a ClientApp may send in a train reply (anything else is rejected).
TRAIN_METRIC_KEYS = frozenset(
    {"num-examples", "unit-weight", "train-loss", "train-dice", "epsilon", "delta", "steps"}
)
#: Metric keys of a declined train reply.
DECLINE_METRIC_KEYS = frozenset({"declined", "epsilon", "epsilon-next", "epsilon-max"})
#: Metric keys a ClientApp may send in an evaluate reply.
EVAL_METRIC_KEYS = frozenset(
    {"num-examples", "unit-weight", "eval-loss", "dice", "jaccard", "pixel-accuracy"}
)
#: Name of the single ArrayRecord / MetricRecord in messages.
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
REASON_KEY = "reason"
#: Largest epsilon a lab may report: beyond it the figure is no privacy claim,
#: and a model card cannot carry it, so the report is treated as corrupt.
EPSILON_LIMIT = 1e6
#: Aggregation rules of the ``aggregation`` run-config key.
AGGREGATIONS = ("mean", "median", "trimmed-mean")
#: Accepted updates needed for the median / trimmed mean: with fewer, one lab
#: is as much as a third of the votes, and the rules fall back to the mean.
ROBUST_MIN_UPDATES = 4


class NotEnoughNodesError(RuntimeError):
    """Fewer than ``min_clients`` SuperNodes connected within the wait timeout."""


# --------------------------------------------------------------------------- pure helpers


def array_spec(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of an ArrayRecord or a mapping of arrays."""
    spec = {}
    for name, value in arrays.items():
        if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
            value = value.numpy()
        value = np.asarray(value)
        spec[name] = (tuple(value.shape), value.dtype.str)
    return spec


def check_arrays(
    reference: Mapping[str, tuple[tuple[int, ...], str]],
    arrays: ArrayRecord | Mapping[str, np.ndarray],
) -> str | None:
    """Why ``arrays`` cannot be aggregated with the global model, or None.

    Parameters
    ----------
    reference : mapping
        ``{name: (shape, dtype)}`` of the global model (see :func:`array_spec`).
    arrays : ArrayRecord or mapping
        A client's returned weights.

    Returns
    -------
    str or None
        A one-line reason (missing/unexpected names, shape or dtype mismatch,
        non-finite values), or None if the update is usable.
    """
    names = list(arrays.keys())
    missing = sorted(set(reference) - set(names))
    unexpected = sorted(set(names) - set(reference))
    if missing or unexpected:
        return f"array names differ from the global model (missing {missing[:3]}, unexpected {unexpected[:3]})"
    for name in reference:
        value = arrays[name]
        if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
            try:
                value = value.numpy()
            except Exception as exc:  # noqa: BLE001 - undecodable array
                return f"array {name!r} cannot be decoded ({exc})"
        value = np.asarray(value)
        shape, dtype = reference[name]
        if tuple(value.shape) != tuple(shape):
            return f"shape mismatch for {name!r}: expected {list(shape)}, received {list(value.shape)}"
        if value.dtype.str != dtype:
            return f"dtype mismatch for {name!r}: expected {dtype}, received {value.dtype.str}"
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            return f"non-finite values (NaN/Inf) in {name!r}"
    return None


def update_norm(
    new: Mapping[str, np.ndarray] | ArrayRecord, old: Mapping[str, np.ndarray] | ArrayRecord
) -> float:
    """L2 norm of ``new - old`` over all arrays."""
    total = 0.0
    for name in old.keys():
        a = new[name].numpy() if hasattr(new[name], "numpy") else np.asarray(new[name])
        b = old[name].numpy() if hasattr(old[name], "numpy") else np.asarray(old[name])
        diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def _finite_number(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def valid_epsilon(value) -> float | None:
    """``value`` as a float if it is a usable privacy claim, else None.

    Parameters
    ----------
    value : object
        An epsilon reported by a lab or computed by the server.

    Returns
    -------
    float or None
        The value if it is a finite number in ``(0, EPSILON_LIMIT]``.
    """
    if not _finite_number(value):
        return None
    value = float(value)
    return value if 0 < value <= EPSILON_LIMIT else None


def lower_median(values: Sequence[float]) -> float:
    """The lower median: the ``(n - 1) // 2``-th smallest value.

    Unlike the usual median it is always one of the values, so with two labs it
    is the smaller update norm, not the midpoint an attacker can push up.
    """
    if not values:
        raise ValueError("lower_median needs at least one value")
    return float(sorted(values)[(len(values) - 1) // 2])


def check_train_metrics(metrics: MetricRecord | Mapping, weight_key: str) -> str | None:
    """Why a train reply's metrics are unusable, or None.

    Parameters
    ----------
    metrics : MetricRecord or mapping
        The reply's only MetricRecord.
    weight_key : str
        Metric that must be present and positive (the FedAvg weight).

    Returns
    -------
    str or None
        A one-line reason: unexpected keys, a value that is not a finite
        scalar, a missing or non-positive weight or example count, an epsilon
        outside ``(0, EPSILON_LIMIT]``, a delta outside ``(0, 1)``, negative
        steps. None if the metrics are usable.
    """
    keys = set(metrics.keys())
    extra = sorted(keys - TRAIN_METRIC_KEYS)
    if extra:
        return f"unexpected metric keys {extra[:5]} (only scalar summaries are accepted)"
    for key in keys:
        if not _finite_number(metrics[key]):
            return f"metric {key!r} is not a finite scalar"
    if "epsilon" in keys and valid_epsilon(metrics["epsilon"]) is None:
        return (
            f"metric 'epsilon' must be > 0 and <= {EPSILON_LIMIT:g}, received {metrics['epsilon']}"
        )
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


# --------------------------------------------------------------------------- reports


@dataclass
class RoundReport:
    """What happened in one training round (JSON-serialisable via :meth:`to_dict`).

    Node ids are Flower's SuperNode ids; lab names never reach the server.
    ``updates`` maps every node whose update passed validation to its
    ``norm`` (L2 distance to the global model, None if not finite), ``weight``
    (aggregation weight after the cap), ``capped`` (the reported weight was
    larger), ``clipped`` (the delta was scaled down to ``norm_bound``) and
    ``rejected`` (dropped as an outlier); ``clipped`` says, per clipped node,
    from which norm to which its update was scaled. ``aggregation`` is the rule
    used.
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
    if len(records) != 1:
        return None
    return next(iter(records.values()))


def _rule_name(strategy: Strategy) -> str:
    """Aggregation rule of a Flower strategy, as named in :data:`AGGREGATIONS`."""
    if isinstance(strategy, FedMedian):
        return "median"
    if isinstance(strategy, FedTrimmedAvg):
        return "trimmed-mean"
    return "mean"


def _reason(msg: Message) -> str:
    records = msg.content.config_records
    for record in records.values():
        if REASON_KEY in record:
            return str(record[REASON_KEY])[:300]
    return "declined"


# --------------------------------------------------------------------------- strategy


@dataclass
class _Update:
    """An accepted reply on its way to aggregation."""

    node: int
    msg: Message
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
        Metric used as FedAvg weight (``num-examples``; ``unit-weight`` for
        client-level DP, whose noise calibration assumes uniform weights).
    node_wait_timeout : float
        Seconds to wait for ``min_clients`` nodes.
    dp_clipping_norm : float, optional
        Reject updates whose L2 distance to the current global model exceeds
        this (client-level DP: the clipping norm, plus a small tolerance).
    max_examples : float, optional
        Cap on every reported weight and example count (None: no cap).
    uniform_weights : bool
        Aggregate with weight 1 whatever a lab reports (client-level DP).
    outlier_factor : float, optional
        With at least 3 accepted updates, reject those whose norm exceeds this
        times the median norm (None: no outlier rejection).
    bound_updates : bool
        Scale every delta down to ``norm_bound`` before aggregation.
    norm_bound : float, optional
        Absolute bound on update norms; None uses the lower median of the
        round's norms (see :func:`lower_median`).
    fallback : Strategy, optional
        Weighted mean used instead of a median / trimmed-mean ``inner`` when
        fewer than :data:`ROBUST_MIN_UPDATES` updates are accepted.
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
        # Messages sent per round: the SuperLink answers for dead nodes itself
        # (src = SuperLink), so replies are matched to nodes by reply_to id.
        self._outgoing: dict[tuple[str, int], list[Message]] = {}

    # ------------------------------------------------------------------ sampling

    def wait_for_nodes(self, grid: Grid, minimum: int | None = None) -> list[int]:
        """Block until ``minimum`` nodes are connected; return their ids.

        Raises
        ------
        NotEnoughNodesError
            After ``node_wait_timeout`` seconds.
        """
        minimum = self.min_clients if minimum is None else minimum
        deadline = time.monotonic() + self.node_wait_timeout
        last_logged = 0.0
        while True:
            nodes = list(grid.get_node_ids())
            if len(nodes) >= minimum:
                return nodes
            if time.monotonic() > deadline:
                raise NotEnoughNodesError(
                    f"only {len(nodes)} SuperNode(s) connected after {self.node_wait_timeout:.0f} s, "
                    f"{minimum} required (min-clients)"
                )
            if time.monotonic() - last_logged > 10:
                log(INFO, "Waiting for SuperNodes: %d connected, %d required", len(nodes), minimum)
                last_logged = time.monotonic()
            time.sleep(1.0)

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

    @staticmethod
    def _node_of(outgoing: list[Message]):
        """Function mapping a reply to the node it answers for."""
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in outgoing if m.metadata.message_id}

        def node_of(reply: Message) -> int:
            return by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

        return node_of

    def classify(
        self, replies: Iterable[Message], outgoing: list[Message] | None = None
    ) -> tuple[list[Message], RoundReport]:
        """Sort replies into accepted / rejected / declined / failed."""
        report = RoundReport(round=0)
        accepted: list[Message] = []
        node_of = self._node_of(outgoing or [])
        expected = {str(m.metadata.dst_node_id) for m in outgoing or []}
        seen: set[str] = set()
        for msg in replies:
            node = str(node_of(msg))
            if node in seen or (expected and node not in expected):
                report.rejected[f"{node}#{len(report.rejected)}"] = "unsolicited or duplicate reply"
                continue
            seen.add(node)
            if msg.has_error():
                report.failed[node] = f"error {msg.error.code}: {(msg.error.reason or '')[:200]}"
                continue
            metrics = _reply_metrics(msg)
            declined = metrics.get("declined") if metrics is not None else None
            if _finite_number(declined) and float(declined) == 1.0:
                report.declined[node] = _reason(msg)
                continue
            reason = self._check_reply(msg, metrics)
            if reason:
                report.rejected[node] = reason
                log(WARNING, "Rejected update from node %s: %s", node, reason)
                continue
            accepted.append(msg)
            report.accepted.append(int(node))
        return accepted, report

    def _check_reply(self, msg: Message, metrics: MetricRecord | None) -> str | None:
        content = msg.content
        if len(content.array_records) != 1 or ARRAYS_KEY not in content.array_records:
            return f"expected exactly one ArrayRecord named {ARRAYS_KEY!r}"
        if metrics is None:
            return "expected exactly one MetricRecord"
        reason = check_train_metrics(metrics, self.weight_key)
        if reason:
            return reason
        arrays = next(iter(content.array_records.values()))
        reason = check_arrays(self.reference, arrays)
        if reason:
            return reason
        if self.dp_clipping_norm is not None:
            norm = update_norm(arrays, self.current)
            if not norm <= self.dp_clipping_norm * (1 + 1e-4) + 1e-6:
                return (
                    f"update norm {norm:.4g} exceeds the clipping norm {self.dp_clipping_norm:.4g} "
                    "(client-level DP requires clipped updates)"
                )
        return None

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
            The new global model and round metrics; (None, None) keeps the
            global model (too few valid updates, a failed or non-finite
            aggregate). Never raises because of what a lab sent.
        """
        outgoing = self._outgoing.pop(("train", server_round), [])
        accepted, report = self.classify(replies, outgoing)
        report.round = server_round
        report.sampled = [m.metadata.dst_node_id for m in outgoing]
        for node in report.sampled:
            key = str(node)
            if (
                node not in report.accepted
                and key not in report.rejected
                and key not in report.declined
                and key not in report.failed
            ):
                report.failed[key] = "no reply before the round timeout"
        self.reports[server_round] = report
        updates = self._weigh(accepted, report)
        updates = self._screen(updates, report)
        self._summarise(report, updates)
        notes: list[str] = []
        if report.clipped:
            notes.append(f"update(s) of node(s) {', '.join(report.clipped)} scaled down to norm "
                         f"{report.norm_bound:.4g}")  # fmt: skip
        for update in updates:
            # The inner strategies need identical metric keys in every reply; they
            # only use the weight, and the summary above already read the rest.
            for key in list(update.msg.content.metric_records.keys()):
                del update.msg.content[key]
            update.msg.content[METRICS_KEY] = MetricRecord({self.weight_key: update.weight})
        accepted = [update.msg for update in updates]
        if len(accepted) < self.min_updates:
            notes.append(
                f"only {len(accepted)} valid update(s), {self.min_updates} required; "
                "global model unchanged"
            )
            return self._skip(report, notes)
        aggregator, report.aggregation = self.inner, self.aggregation
        if self.fallback is not None and len(accepted) < ROBUST_MIN_UPDATES:
            aggregator, report.aggregation = self.fallback, _rule_name(self.fallback)
            notes.append(
                f"{self.aggregation} needs {ROBUST_MIN_UPDATES} accepted updates, "
                f"{len(accepted)} received: weighted mean used"
            )
        dp = self.inner if isinstance(self.inner, DifferentialPrivacyClientSideFixedClipping) else None
        if dp is not None:
            # Calibrate the noise to the updates actually averaged (conservative).
            dp.num_sampled_clients = len(accepted)
            report.update_noise_std = float(
                dp.noise_multiplier * dp.clipping_norm / len(accepted)
            )
        try:
            arrays, _ = aggregator.aggregate_train(server_round, accepted)
        except Exception as exc:  # noqa: BLE001 - a bad round must not end the run
            notes.append(f"aggregation failed ({type(exc).__name__}: {str(exc)[:200]}); "
                         "global model unchanged")  # fmt: skip
            return self._skip(report, notes)
        if arrays is None:
            notes.append("inner strategy did not aggregate; global model unchanged")
            return self._skip(report, notes)
        reason = check_arrays(self.reference, arrays)
        if reason:
            notes.append(f"aggregate discarded: {reason}; global model unchanged")
            return self._skip(report, notes)
        report.aggregated = True
        report.note = "; ".join(notes)
        metrics = {"num-examples": report.num_examples, "accepted": len(report.accepted)}
        for key, value in (
            ("train-loss", report.train_loss),
            ("train-dice", report.train_dice),
            ("epsilon-max", report.epsilon_max),
        ):
            if value is not None:
                metrics[key] = value
        return arrays, MetricRecord(metrics)

    @staticmethod
    def _skip(report: RoundReport, notes: list[str]) -> tuple[None, None]:
        report.note = "; ".join(notes)
        log(WARNING, "Round %s: %s", report.round, report.note)
        return None, None

    def _weigh(self, accepted: list[Message], report: RoundReport) -> list[_Update]:
        """Aggregation weight and example count of every accepted reply, capped."""
        cap = self.max_examples if self.max_examples is not None else math.inf
        updates = []
        # classify() appends to report.accepted in the order of ``accepted``.
        for node, msg in zip(report.accepted, accepted):
            metrics = _reply_metrics(msg)
            reported = float(metrics[self.weight_key])
            weight = 1.0 if self.uniform_weights else min(reported, cap)
            examples = min(float(metrics["num-examples"]), cap)
            updates.append(_Update(node=node, msg=msg, weight=weight, examples=examples))
            report.updates[str(node)] = {
                "norm": None,
                "weight": weight,
                "capped": weight < reported,
                "clipped": False,
                "rejected": False,
            }
        return updates

    def _global_arrays(self) -> dict[str, np.ndarray]:
        """Floating-point arrays of the current global model, as float64.

        Integer buffers (counters) are no weights: they are neither measured
        nor clipped.
        """
        out = {}
        for name, value in self.current.items():
            array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
            if array.dtype.kind == "f":
                out[name] = np.asarray(array, dtype=np.float64)
        return out

    def _screen(self, updates: list[_Update], report: RoundReport) -> list[_Update]:
        """Measure every delta, reject outliers, clip the rest to the norm bound.

        Returns the updates to aggregate; rejected ones move from
        ``report.accepted`` to ``report.rejected``.
        """
        if not updates:
            return updates
        current = self._global_arrays()
        for update in updates:
            arrays = update.msg.content[ARRAYS_KEY]
            total = 0.0
            with np.errstate(over="ignore", invalid="ignore"):
                for name, old in current.items():
                    delta = np.asarray(arrays[name].numpy(), dtype=np.float64) - old
                    update.delta[name] = delta
                    total += float(np.sum(delta * delta))
            update.norm = math.sqrt(total) if math.isfinite(total) else math.inf
            entry = report.updates[str(update.node)]
            entry["norm"] = update.norm if math.isfinite(update.norm) else None
        if not (self.bound_updates or self.outlier_factor):
            return updates

        def reject(update: _Update, reason: str) -> None:
            report.accepted.remove(update.node)
            report.rejected[str(update.node)] = reason
            report.updates[str(update.node)]["rejected"] = True
            log(WARNING, "Rejected update from node %s: %s", update.node, reason)

        kept = []
        for update in updates:
            if math.isfinite(update.norm):
                kept.append(update)
            else:
                reject(update, "update norm is not finite (values too large)")
        if self.outlier_factor and len(kept) >= 3:
            median = float(np.median([u.norm for u in kept]))
            # A zero median means most labs did not move; the clipping bound
            # (then 0 as well) already neutralises the others.
            if median > 0:
                limit = self.outlier_factor * median
                for update in list(kept):
                    if update.norm > limit:
                        kept.remove(update)
                        reject(update, (
                            f"outlier: update norm {update.norm:.4g} exceeds "
                            f"{self.outlier_factor:g} x the median norm {median:.4g}"
                        ))  # fmt: skip
        if not (self.bound_updates and kept):
            return kept
        bound = self.norm_bound if self.norm_bound else lower_median([u.norm for u in kept])
        report.norm_bound = bound
        for update in kept:
            if update.norm > bound:
                self._clip(update, current, bound / update.norm)
                report.updates[str(update.node)]["clipped"] = True
                report.clipped[str(update.node)] = f"norm {update.norm:.4g} scaled to {bound:.4g}"
        return kept

    @staticmethod
    def _clip(update: _Update, current: Mapping[str, np.ndarray], scale: float) -> None:
        """Replace the reply's arrays by ``global + delta * scale``."""
        arrays = update.msg.content[ARRAYS_KEY]
        clipped = {}
        for name in arrays.keys():
            if name in update.delta:
                dtype = arrays[name].numpy().dtype
                value = (current[name] + update.delta[name] * scale).astype(dtype)
                clipped[name] = Array(np.ascontiguousarray(value))
            else:
                clipped[name] = arrays[name]
        update.msg.content[ARRAYS_KEY] = ArrayRecord(clipped)

    @staticmethod
    def _summarise(report: RoundReport, updates: list[_Update]) -> None:
        examples, loss, dice, eps = 0.0, 0.0, 0.0, []
        for update in updates:
            metrics = _reply_metrics(update.msg)
            n = update.examples
            examples += n
            loss += n * float(metrics.get("train-loss", 0.0))
            dice += n * float(metrics.get("train-dice", 0.0))
            if "epsilon" in metrics:
                eps.append(float(metrics["epsilon"]))
        report.num_examples = int(examples)
        if examples:
            report.train_loss = loss / examples
            report.train_dice = dice / examples
        report.epsilon_max = max(eps) if eps else None

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the model to every connected node (no minimum beyond one)."""
        nodes = self.wait_for_nodes(grid, minimum=1)
        config["server-round"] = server_round
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        messages = [
            Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=node)
            for node in nodes
        ]
        self._outgoing[("evaluate", server_round)] = messages
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of finite evaluation metrics; failures are counted."""
        totals: dict[str, float] = {}
        examples = 0
        failed: dict[str, str] = {}
        per_node: dict[str, dict[str, float]] = {}
        used = 0
        outgoing = self._outgoing.pop(("evaluate", server_round), [])
        node_of = self._node_of(outgoing)
        answered = set()
        for msg in replies:
            node = str(node_of(msg))
            answered.add(node)
            if msg.has_error():
                failed[node] = f"error {msg.error.code}: {(msg.error.reason or '')[:200]}"
                continue
            metrics = _reply_metrics(msg)
            if metrics is None:
                failed[node] = "expected exactly one MetricRecord"
                continue
            keys = set(metrics.keys())
            if keys - EVAL_METRIC_KEYS or not all(_finite_number(metrics[k]) for k in keys):
                failed[node] = "invalid evaluation metrics"
                continue
            n = float(metrics.get("num-examples", 0))
            if self.max_examples is not None:
                n = min(n, self.max_examples)
            if n <= 0:
                failed[node] = "no evaluation examples"
                continue
            used += 1
            examples += int(n)
            per_node[node] = {k: float(metrics[k]) for k in keys - {"unit-weight"}}
            for key in keys - {"num-examples", "unit-weight"}:
                totals[key] = totals.get(key, 0.0) + n * float(metrics[key])
        for message in outgoing:
            if str(message.metadata.dst_node_id) not in answered:
                failed[str(message.metadata.dst_node_id)] = "no reply before the round timeout"
        result = {k: v / examples for k, v in totals.items()} if examples else {}
        self.evaluation = {
            "round": server_round,
            "nodes": used,
            "num_examples": examples,
            "metrics": result,
            "per_node": per_node,
            "failed": failed,
        }
        if not examples:
            return None
        return MetricRecord({**result, "num-examples": examples})

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
    :class:`DifferentialPrivacyClientSideFixedClipping`; the ClientApp clips with
    Flower's ``fixedclipping_mod`` and the clipping norm bounds every update.
    Other modes use FedAvg weighted by capped example counts (or Flower's
    FedMedian / FedTrimmedAvg, per ``aggregation``), outlier rejection and the
    update norm bound of the settings.
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
    fedavg = FedAvg(**common)
    inner: Strategy = fedavg
    fallback: Strategy | None = None
    if update_dp:
        inner = DifferentialPrivacyClientSideFixedClipping(
            fedavg,
            noise_multiplier=settings.update_noise_multiplier,
            clipping_norm=settings.update_clipping_norm,
            num_sampled_clients=settings.min_clients,
        )
    elif settings.aggregation == "median":
        inner, fallback = FedMedian(**common), fedavg
    elif settings.aggregation == "trimmed-mean":
        inner, fallback = FedTrimmedAvg(**common, beta=settings.trim_fraction), fedavg
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
        # With client-level DP the clipping norm bounds every update, and
        # dropping or rescaling updates by the round's median would make the
        # aggregate depend on other labs in a way the noise does not cover.
        outlier_factor=None if update_dp else settings.outlier_factor,
        bound_updates=not update_dp,
        norm_bound=settings.max_update_norm or None,
        fallback=fallback,
    )
