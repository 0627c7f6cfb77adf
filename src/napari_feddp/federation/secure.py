"""Secure aggregation: the coordinator learns the sum of the labs' updates, never one lab's.

Flower's SecAgg+ protocol (Bell et al. 2020) does the cryptography:
:class:`~flwr.server.workflow.SecAggPlusWorkflow` on the ServerApp and
:func:`~flwr.client.mod.secaggplus_mod` in every ClientApp. Each lab masks its
quantized update with pairwise masks agreed with the other labs plus a private
mask; the masks cancel only in the sum, and the shares of dropped labs' keys let
the server remove their masks without ever seeing an individual update.

This module fits that protocol to napari-feddp's Message-API federation:

* :class:`SecureRound` runs one training round through Flower's four SecAgg+
  stages (setup, share keys, collect masked vectors, unmask) with the round's
  training messages and records a :class:`~.strategy.RoundReport` without
  per-lab norms (the server has none);
* :func:`secure_aggregation_mod` is the lab's side: it hands SecAgg+ messages to
  ``secaggplus_mod`` and turns the lab's trained weights into the update it
  masks: the difference to the global model, checked finite and bounded, with unit weight.

What it does not stop: a lab that alters its own code can add any integer
vector to the sum (the server cannot inspect it, nor the weight it claims). The
server discards a round whose mean leaves the clipping range, which bounds what
such a lab can do per coordinate, and every lab checks the final model on its
own tiles before making it its default (:mod:`~napari_feddp.federation.promotion`).
A coordinator that deviates from the protocol (sends different labs different
lists of dropped labs, or adds labs of its own) can unmask a lab: Flower's
SecAgg+ protects against an honest-but-curious coordinator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.supercore.differential_privacy import compute_stdv

from .settings import RunSettings
from .strategy import ARRAYS_KEY, METRICS_KEY, REASON_KEY, RoundReport, check_train_metrics, update_norm

#: Fewest labs in a secure sum. With two, each lab learns the other's update
#: from the sum and its own, so the protocol would protect nothing.
MIN_SECURE_LABS = 3
#: Integer range the updates are quantized to; the modulus (2**32)
#: leaves room for the sum of :data:`MAX_SECURE_LABS` labs without overflow.
QUANTIZATION_RANGE = 2**24
MODULUS_RANGE = 2**32
MAX_SECURE_LABS = MODULUS_RANGE // QUANTIZATION_RANGE - 1
#: Seconds between two polls for the labs' replies in a SecAgg+ stage.
POLL_SECONDS = 0.2
#: How a lab's error reply says it sat the round out.
DECLINED = "declined: "


def secure_aggregation_on(settings: RunSettings) -> bool:
    """Whether a run aggregates securely: ``on``, or ``auto`` with at least :data:`MIN_SECURE_LABS` labs and a mean."""
    if settings.secure_aggregation == "auto":
        return settings.min_clients >= MIN_SECURE_LABS and settings.aggregation == "mean"
    return settings.secure_aggregation == "on"


def clipping_range(settings: RunSettings) -> float:
    """Bound on every coordinate of a lab's update before quantization.

    ``secure-clipping-range``; with distributed noise at least twice the batch times the clipping
    norm plus 12 standard deviations of the lab's noise share, so that no noise is ever cut off
    (cutting a lab's noise before the sum would void the sum's privacy argument).
    """
    if settings.dp_noise == "distributed":
        tail = (2 * settings.batch_size + 12 * settings.noise_share) * settings.max_grad_norm
        return max(float(settings.secure_clipping_range), tail)
    return float(settings.secure_clipping_range)


def reconstruction_threshold(labs: int) -> int:
    """Shares needed to rebuild a lab's key: a strict majority, so the sum survives a minority dropping out."""
    return labs // 2 + 1


# --------------------------------------------------------------------------- server


class _Collector(LegacyStrategy):
    """The legacy strategy SecAgg+ calls: it names the sampled labs and keeps the unmasked mean."""

    def __init__(self, grid: Grid, run_id: int, node_ids: list[int]) -> None:
        self.proxies = [GridClientProxy(node_id, grid, run_id) for node_id in node_ids]
        self.mean: list[np.ndarray] | None = None
        self.results: list[tuple[GridClientProxy, FitRes]] = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, FitIns(Parameters([], ""), {})) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        if results:  # every result carries the same unmasked mean
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class SecureRound(SecAggPlusWorkflow):
    """One training round aggregated with SecAgg+.

    The server cannot check what a lab claims inside a secure sum, so every
    lab's update counts equally (weight 1, as with client-level DP) and each
    coordinate is bounded by ``secure-clipping-range``: a lab that lies moves
    the mean by at most twice that range over the number of labs. Every sampled lab shares its key with every other (``num_shares`` = labs);
    a strict majority of shares rebuilds a key, so the round survives a minority
    of labs dropping out after the key exchange, and no minority of labs
    colluding with the server can unmask a lab.
    """

    def __init__(self, settings: RunSettings, labs: int, server_optimizer: ServerOptimizer | None = None) -> None:
        super().__init__(num_shares=labs, reconstruction_threshold=reconstruction_threshold(labs),
                         max_weight=1.0, clipping_range=clipping_range(settings),
                         quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE,
                         timeout=settings.round_timeout)  # fmt: skip
        self.settings = settings
        self.server_optimizer = server_optimizer
        self._contents: dict[int, RecordDict] = {}
        self.error_replies: dict[str, str] = {}

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        # The training instruction each lab gets with its forwarded key shares: our
        # Message-API content, one RecordDict per lab (the workflow adds a record to it).
        state.nid_to_fitins = {nid: RecordDict(dict(self._contents[nid].items())) for nid in state.nid_to_fitins}
        return ok

    def share_keys_stage(self, grid, context, state) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        # Only labs that finished the key exchange masked with each other. Flower's workflow
        # would count a lab lost before this point as dropped in the unmask stage and ask the
        # others for key shares they never received: leave such labs out of the round instead.
        active = set(state.active_node_ids)
        state.sampled_node_ids = active
        state.nid_to_neighbours = {nid: peers & active for nid, peers in state.nid_to_neighbours.items()
                                   if nid in active}  # fmt: skip
        return ok

    def run(self, grid: Grid, context: Context, server_round: int, global_arrays: ArrayRecord,
            messages: list[Message]) -> tuple[ArrayRecord | None, RoundReport]:
        """Aggregate the labs' replies to ``messages`` securely; return the new global model (or None) and the report."""
        sampled = [m.metadata.dst_node_id for m in messages]
        report = RoundReport(round=server_round, sampled=sampled, aggregation="secure-mean")
        if not MIN_SECURE_LABS <= len(sampled) <= MAX_SECURE_LABS:
            report.failed = {str(n): "not asked: secure aggregation cannot take this many labs" for n in sampled}
            report.note = (f"secure aggregation needs {MIN_SECURE_LABS} to {MAX_SECURE_LABS} labs, {len(sampled)} "
                           "sampled; global model unchanged")  # fmt: skip
            log(WARNING, "Round %s: %s", server_round, report.note)
            return None, report
        self._contents = {m.metadata.dst_node_id: m.content for m in messages}
        collector = _Collector(grid, context.run_id, sampled)
        legacy = LegacyContext(context, strategy=collector, client_manager=SimpleClientManager())
        legacy.state = RecordDict({MAIN_CONFIGS_RECORD: _round_config(server_round), MAIN_PARAMS_RECORD: ArrayRecord()})
        try:
            self(_RoundGrid(grid, self.error_replies), legacy)
        except Exception as exc:  # a malformed masked vector or share list: this round is lost, not the run
            log(WARNING, "Round %s: secure aggregation failed: %s", server_round, exc)
            report.failed = {str(n): self.error_replies.get(str(n), "secure aggregation failed") for n in sampled}
            return _skip(report, f"secure aggregation failed ({type(exc).__name__}: {str(exc)[:200]})")
        finished = {int(proxy.node_id) for proxy, _ in collector.results}
        for node in (str(n) for n in sampled if n not in finished):
            reason = self.error_replies.get(node, "dropped out of secure aggregation")
            if reason.startswith(DECLINED):
                report.declined[node] = reason.removeprefix(DECLINED)
            else:
                report.failed[node] = reason
        return self._finish(collector, global_arrays, report)

    def _finish(self, collector: _Collector, global_arrays: ArrayRecord,
                report: RoundReport) -> tuple[ArrayRecord | None, RoundReport]:
        """Check the labs' scalar reports and the unmasked mean; apply it to the global model."""
        results = collector.results
        for proxy, fitres in results:
            reason = check_train_metrics(fitres.metrics, "num-examples")
            if reason:  # its update is already inside the sum: the whole round goes
                report.rejected[str(proxy.node_id)] = reason
        report.accepted = [int(proxy.node_id) for proxy, _ in results if str(proxy.node_id) not in report.rejected]
        if report.rejected:
            return _skip(report, "a lab's report is invalid and its update cannot be taken out of the secure sum")
        if collector.mean is None or len(results) < max(self.settings.min_updates, MIN_SECURE_LABS):
            # A sum of two would let each of them read the other's update.
            return _skip(report, f"secure aggregation finished with {len(results)} lab(s), "
                                 f"{max(self.settings.min_updates, MIN_SECURE_LABS)} needed")  # fmt: skip
        examples = [min(float(f.metrics["num-examples"]), float(self.settings.max_examples)) for _, f in results]
        report.num_examples = int(sum(examples))
        for key, attribute in (("train-loss", "train_loss"), ("train-dice", "train_dice")):
            values = [(e, float(f.metrics[key])) for e, (_, f) in zip(examples, results, strict=True) if key in f.metrics]
            if values:
                setattr(report, attribute, sum(e * v for e, v in values) / sum(e for e, _ in values))
        report.epsilon_max = max((float(f.metrics["epsilon"]) for _, f in results if "epsilon" in f.metrics),
                                 default=None)  # fmt: skip
        names = _float_names(global_arrays)
        if [a.shape for a in collector.mean] != [tuple(global_arrays[n].numpy().shape) for n in names]:
            return _skip(report, "the secure sum does not have the model's shapes")
        mean = dict(zip(names, collector.mean, strict=True))
        bound = clipping_range(self.settings) * (1 + 1e-6)
        if not all(np.all(np.abs(d) <= bound) for d in mean.values()):
            # Every honest lab's update is within the range, so their mean is: a lab sent a malformed vector.
            return _skip(report, f"the secure mean leaves the clipping range {bound:g} (a malformed masked vector)")
        if self.settings.dp_noise == "distributed":
            # Each lab sent its noisy gradient sum; the sum over labs carries the full noise. Their mean over
            # the expected batch is the noisy mean gradient, which the server's optimizer applies.
            if self.server_optimizer is None:
                raise ValueError("distributed-noise rounds need the server's optimizer")
            if len(results) < self.settings.noise_labs:
                return _skip(report, f"{len(results)} labs finished, {self.settings.noise_labs} needed for the noise")
            gradient = {n: d / self.settings.batch_size for n, d in mean.items()}
            arrays = self.server_optimizer.step(global_arrays, gradient)
            report.aggregated = True
            return arrays, report
        if self.settings.dp_mode == "update":  # client-level DP: Gaussian noise on the mean of clipped updates
            std = float(compute_stdv(self.settings.update_noise_multiplier, self.settings.update_clipping_norm,
                                     len(results)))  # fmt: skip
            report.update_noise_std = std
            rng = np.random.default_rng()
            mean = {n: d + rng.normal(0.0, std, d.shape) for n, d in mean.items()}
        new = {n: Array(np.ascontiguousarray(global_arrays[n].numpy())) for n in global_arrays}
        for name, delta in mean.items():
            value = global_arrays[name].numpy()
            new[name] = Array(np.ascontiguousarray((value.astype(np.float64) + delta).astype(value.dtype)))
        arrays = ArrayRecord(new)
        norm = update_norm(arrays, global_arrays)
        if not math.isfinite(norm):
            return _skip(report, "the secure mean is not finite")
        report.norm_bound = self.settings.max_update_norm or None
        report.aggregated = True
        return arrays, report


class ServerOptimizer:
    """The server's Adam for distributed-noise rounds: it applies the noisy mean gradient of each round.

    Post-processing of what secure aggregation releases, so it costs no privacy. Its state lives
    for one run (a resumed run starts a fresh one).
    """

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self._params: dict = {}  # name -> torch Parameter, made at the first step
        self._optimizer = None

    def step(self, arrays: ArrayRecord, gradient: dict[str, np.ndarray]) -> ArrayRecord:
        """``arrays`` moved one Adam step along ``gradient`` (per array name)."""
        import torch

        if self._optimizer is None:
            self._params = {n: torch.nn.Parameter(torch.from_numpy(arrays[n].numpy().copy())) for n in gradient}
            self._optimizer = torch.optim.Adam(self._params.values(), lr=self.settings.learning_rate)
        with torch.no_grad():
            for name, parameter in self._params.items():
                parameter.copy_(torch.from_numpy(arrays[name].numpy()))
                parameter.grad = torch.from_numpy(np.asarray(gradient[name], dtype=np.float32))
        self._optimizer.step()
        new = {n: Array(np.ascontiguousarray(arrays[n].numpy())) for n in arrays}
        for name, parameter in self._params.items():
            new[name] = Array(parameter.detach().numpy().copy())
        return ArrayRecord(new)


def _round_config(server_round: int):
    from flwr.app import ConfigRecord

    return ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round, WorkflowKey.START_TIME: time.time()})


def _skip(report: RoundReport, why: str) -> tuple[None, RoundReport]:
    report.note = "; ".join(filter(None, [report.note, f"{why}; global model unchanged"]))
    log(WARNING, "Round %s: %s", report.round, report.note)
    return None, report


def _float_names(arrays: ArrayRecord) -> list[str]:
    """Names of the floating-point arrays (the ones a lab's update changes), in the record's order."""
    return [name for name in arrays if arrays[name].numpy().dtype.kind == "f"]


class _RoundGrid(Grid):
    """The round's Grid for the SecAgg+ stages.

    It polls for replies every :data:`POLL_SECONDS` instead of Flower's 3 s
    (the protocol adds three exchanges to a round), and keeps each lab's error
    reply (why it dropped out) for the round report.
    """

    def __init__(self, grid: Grid, errors: dict[str, str]) -> None:
        self._grid = grid
        self._errors = errors

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        try:
            pending = set(self._grid.push_messages(messages))
        except NotImplementedError:  # a Grid without push/pull (labs in this process)
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        else:
            replies = []
            deadline = time.monotonic() + (timeout if timeout is not None else math.inf)
            while pending and time.monotonic() < deadline:
                arrived = list(self._grid.pull_messages(pending))
                replies += arrived
                pending -= {reply.metadata.reply_to_message_id for reply in arrived}
                if pending:
                    time.sleep(POLL_SECONDS)
        sent = {message.metadata.message_id: message.metadata.dst_node_id for message in messages}
        for reply in replies:
            if reply.has_error():
                node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                reason = reply.error.reason or ""
                self._errors[str(node)] = reason if reason.startswith(DECLINED) else f"error {reply.error.code}: {reason[:200]}"
        return replies

    # The rest of Grid's interface, delegated.
    def set_run(self, run_id):
        return self._grid.set_run(run_id)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs):
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self._grid.get_node_ids()

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)


# --------------------------------------------------------------------------- lab


class SecureAggregationRefused(RuntimeError):
    """The lab will not send its update under these conditions (the reason goes back to the server)."""


def secure_aggregation_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The lab's side of secure aggregation (a ClientApp mod on ``train``).

    SecAgg+ messages go through Flower's ``secaggplus_mod``; when it asks for the
    lab's update, :func:`masked_update` trains and returns the update to mask.
    A lab that will not take part answers with an error whose reason starts with
    ``declined:``; the sum goes on without it. Plain rounds pass through (the
    train handler declines them when the lab requires secure aggregation).
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    try:
        _check_unmask(msg, context)
        return secaggplus_mod(msg, context, lambda m, c: masked_update(m, c, call_next))
    except SecureAggregationRefused as refusal:
        return Message(Error(code=0, reason=f"{DECLINED}{refusal}"[:300]), reply_to=msg)


def _check_unmask(msg: Message, context: Context) -> None:
    """A lab helps unmask only a sum of at least :data:`MIN_SECURE_LABS` labs (with two, each would read the
    other's update), and with distributed noise of at least ``noise_labs`` (else too little noise)."""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) != Stage.UNMASK:
        return
    active = len(set(configs.get(Key.ACTIVE_NODE_ID_LIST, [])))
    if active < MIN_SECURE_LABS:
        raise SecureAggregationRefused(f"only {active} labs in the sum; a secure sum needs {MIN_SECURE_LABS}")
    if context.run_config.get("dp-noise") == "distributed":
        settings = RunSettings.from_run_config(context.run_config)
        if active < settings.noise_labs:
            raise SecureAggregationRefused(f"only {active} labs in the sum; the noise needs {settings.noise_labs}")


def is_secure_round(msg: Message) -> bool:
    """Whether ``msg`` is part of a SecAgg+ exchange."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def masked_update(msg: Message, context: Context, call_next) -> Message:
    """Train, then reply with the update SecAgg+ masks: the difference to the global model, weight 1.

    Refused (an error, so the lab drops out of the round and the sum goes on
    without it) when fewer than :data:`MIN_SECURE_LABS` labs take part, when
    the lab declines the round, or when its update is not finite.
    """
    secagg = context.state.config_records[RECORD_KEY_STATE]
    if int(secagg["sample_num"]) < MIN_SECURE_LABS:
        raise SecureAggregationRefused(f"a secure sum of {secagg['sample_num']} labs would reveal updates "
                                       f"(at least {MIN_SECURE_LABS} needed)")  # fmt: skip
    # What the coordinator declared must match what the protocol needs: masks shared with at least two
    # other labs, a key rebuilt only by a majority, and unit weights (a weight rescales the update).
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
    partners = len(set(configs.get(Key.SOURCE_LIST, [])) - {secagg.get("nid")})
    keys = len(secagg.get("public_keys_dict:K", []))
    if partners + 1 < MIN_SECURE_LABS:
        raise SecureAggregationRefused(f"key shares from {partners} other lab(s): the masks would not hide the update")
    if not 2 * int(secagg.get("threshold", 0)) > keys:
        raise SecureAggregationRefused(f"reconstruction threshold {secagg.get('threshold')} of {keys} keys is not a "
                                       "majority")  # fmt: skip
    if float(secagg.get("max_weight", 0.0)) != 1.0:
        raise SecureAggregationRefused(f"weight range {secagg.get('max_weight')}: secure rounds use unit weights")
    settings = RunSettings.from_run_config(context.run_config)
    if float(secagg["clipping_range"]) < clipping_range(settings):
        raise SecureAggregationRefused(f"the clipping range {secagg['clipping_range']} would cut off values "
                                       f"(at least {clipping_range(settings):g} needed)")  # fmt: skip
    global_arrays = msg.content.array_records[ARRAYS_KEY]
    reply = call_next(msg, context)
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    metrics = reply.content.metric_records[METRICS_KEY]
    if float(metrics.get("declined", 0) or 0) == 1.0:
        reasons = [str(r[REASON_KEY]) for r in reply.content.config_records.values() if REASON_KEY in r]
        raise SecureAggregationRefused(reasons[0] if reasons else "by the lab")
    trained = reply.content.array_records[ARRAYS_KEY]
    deltas = [trained[n].numpy().astype(np.float64) - global_arrays[n].numpy() for n in _float_names(global_arrays)]
    total = math.sqrt(sum(float(np.sum(d * d)) for d in deltas))
    if not math.isfinite(total):
        raise SecureAggregationRefused("the lab's update is not finite; not sent")
    distributed = settings.dp_noise == "distributed"  # scaling a noise share would void the sum's noise
    bound = settings.update_clipping_norm if settings.dp_mode == "update" else settings.max_update_norm
    if bound and total > bound and not distributed:  # the lab bounds its own update (client-level DP: clips it)
        deltas = [d * (bound / total) for d in deltas]
    scalars = dict(metrics)
    if distributed:  # computed on this lab's sample without noise: they stay in the lab
        for key in ("train-loss", "train-dice"):
            scalars.pop(key, None)
    limit = clipping_range(settings)
    clipped = sum(int(np.count_nonzero(np.abs(d) > limit)) for d in deltas)
    log(INFO, "Secure aggregation: update norm %.4g, %d coordinate(s) beyond the clipping range %g", total, clipped,
        limit)  # fmt: skip
    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters([d.astype(np.float32) for d in deltas]),
                    num_examples=1, metrics=scalars)  # fmt: skip
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
