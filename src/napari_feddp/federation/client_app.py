"""Flower ClientApp of napari-feddp (Flower 1.42 Message API).

Loaded by ``flwr-clientapp`` inside each lab's SuperNode as
``napari_feddp.federation.client_app:app``. For every message it

1. reads the run settings (run config) and the lab settings (node config),
2. builds the UNet and loads the global weights from the ``arrays`` record,
3. trains (``train``) or evaluates (``evaluate``) with the lab's pluggable
   function (:mod:`napari_feddp.federation.local`),
4. replies with **only** the model weights and a few scalar summaries:
   ``num-examples``, ``train-loss``, ``train-dice``, ``epsilon`` (and
   ``unit-weight``, ``delta``, ``steps``). No image, mask, per-sample value or
   file path leaves the lab.

In a secure-aggregation round, :func:`~.secure.secure_aggregation_mod` runs
Flower's SecAgg+ protocol around training and the weights leave the lab only
as a masked update. With ``dp-mode = "update"`` the server's round config carries
``clipping_norm`` and Flower's :func:`~flwr.clientapp.mod.fixedclipping_mod`
clips the update before it is sent (client-level DP with
``DifferentialPrivacyClientSideFixedClipping`` on the server).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .checkpoints import append_jsonl
from .local import DeclineRound, LocalRequest, build_model, default_evaluate, default_train, load_function
from .policy import policy_refusal
from .secure import is_secure_round, secure_aggregation_mod
from .settings import NodeSettings, RunSettings
from .strategy import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, REASON_KEY

app = ClientApp()


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(CONFIG_KEY) or ConfigRecord()


def _record(node: NodeSettings, server_round: int, event: str, **fields) -> None:
    """Append a local-only record to the lab's history (Federation widget, ``join``); never sent."""
    if node.history_file:
        with contextlib.suppress(OSError):  # the history is a convenience, never a reason to fail a round
            append_jsonl(node.history_file, {"time": time.time(), "round": server_round, "event": event, **fields})


def update_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Apply Flower's ``fixedclipping_mod`` when the server asks for clipping.

    Rounds configured by ``DifferentialPrivacyClientSideFixedClipping`` carry
    ``clipping_norm``. With ``dp-mode = "update"`` the lab clips even if the
    server forgot to ask (using the run's ``update-clipping-norm``); in other
    modes rounds without a clipping norm pass through. Decline replies (no
    weights) bypass the clipping.
    """
    if is_secure_round(msg):  # inside a secure sum the lab clips its update itself (secure.masked_update)
        return call_next(msg, context)
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is not None and KEY_CLIPPING_NORM not in config:
        try:
            settings = RunSettings.from_run_config(context.run_config)
        except (ValueError, TypeError):
            return call_next(msg, context)  # the handler declines the invalid run config
        if settings.dp_mode == "update":
            config[KEY_CLIPPING_NORM] = float(settings.update_clipping_norm)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    declined: list[Message] = []

    def run_and_capture(message: Message, ctx: Context) -> Message:
        reply = call_next(message, ctx)
        metrics = None if reply.has_error() else reply.content.metric_records.get(METRICS_KEY)
        if metrics is not None and float(metrics.get("declined", 0) or 0) == 1.0:
            declined.append(reply)
            return Message(Error(code=0, reason="declined"), reply_to=message)
        return reply

    clipped = fixedclipping_mod(msg, context, run_and_capture)
    return declined[0] if declined else clipped


def _prepare(msg: Message, context: Context) -> LocalRequest:
    """The lab's request for this message; DeclineRound if the run config is invalid or outside the lab's policy."""
    node = NodeSettings.from_node_config(context.node_config)
    try:
        settings = RunSettings.from_run_config(context.run_config)
    except (ValueError, TypeError) as exc:
        raise DeclineRound(f"invalid run config: {exc}"[:200]) from None
    if refusal := policy_refusal(settings, node):
        raise DeclineRound(refusal[:200])
    import torch  # here, not at import: the SecAgg+ stages that do not train start faster without it

    torch.set_num_threads(max(1, int(node.threads)))
    model = build_model(settings)
    model.load_state_dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict(), strict=True)
    config = _config(msg)
    return LocalRequest(model=model, settings=settings, node=node, server_round=int(config.get("server-round", 0)),
                        train_overrides={k: config[k] for k in ("learning-rate",) if k in config})  # fmt: skip


def _scalars(values: dict[str, float | int | None]) -> dict[str, float | int]:
    """Keep finite scalars only (a NaN Dice on an empty crop is dropped)."""
    return {key: value for key, value in values.items() if not isinstance(value, bool)
            and (isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)))}  # fmt: skip


@app.train(mods=[secure_aggregation_mod, update_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the lab's data; reply with weights + scalars.

    A run outside the lab's policy, or a round beyond its privacy budget, is
    declined before anything is built or trained.
    """
    try:
        if not is_secure_round(msg):
            if NodeSettings.from_node_config(context.node_config).require_secure_aggregation:
                raise DeclineRound("lab policy: this lab sends its update only inside a secure sum (SecAgg+) of 3 or "
                                   "more labs")  # fmt: skip
            if context.run_config.get("dp-noise") == "distributed":
                raise DeclineRound("a distributed-noise update carries only a share of the noise: sent only inside a "
                                   "secure sum")  # fmt: skip
        request = _prepare(msg, context)
        train_fn = load_function(request.node.train_fn) if request.node.train_fn else default_train
        _record(request.node, request.server_round, "training")
        update = train_fn(request)
    except DeclineRound as decline:
        _record(NodeSettings.from_node_config(context.node_config), int(_config(msg).get("server-round", 0)),
                "declined", reason=decline.reason, **decline.metrics())  # fmt: skip
        reason = ConfigRecord({REASON_KEY: decline.reason[:200]})
        return Message(RecordDict({METRICS_KEY: MetricRecord(decline.metrics()), REASON_KEY: reason}), reply_to=msg)
    metrics = _scalars({"num-examples": int(update.num_examples), "unit-weight": 1.0, "train-loss": float(update.loss),
                        "train-dice": float(update.dice), "steps": int(update.steps),
                        "epsilon": None if update.epsilon is None else float(update.epsilon),
                        "delta": None if update.delta is None else float(update.delta)})  # fmt: skip
    _record(request.node, request.server_round, "trained", **metrics)
    state = {k: v.detach().cpu() for k, v in request.model.state_dict().items()}
    return Message(RecordDict({ARRAYS_KEY: ArrayRecord(state), METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


def keep_global_model(request: LocalRequest, run_id: int, epsilon: float | None) -> Path:
    """Keep the federation's final model in the lab's model store, promoted only if it passes the lab's check.

    The check (:func:`napari_feddp.federation.promotion.check_promotion`) runs
    on the lab's machine against the lab's current default model. A promoted
    model goes into the store's root, where it becomes the default of the
    Segment widget and ``napari-feddp segment``; a refused one is kept under
    ``<store>/refused/`` for inspection and is never a default. Either way a
    ``model-promoted`` or ``model-refused`` record with the reason and the Dice
    scores goes to the lab's local history.

    Returns
    -------
    pathlib.Path
        The stored ``.safetensors`` file.
    """
    from ..models import save_checkpoint
    from ..models.store import REFUSED_FOLDER, model_store
    from .local import model_card
    from .promotion import PromotionDecision, check_promotion, current_default

    store = Path(request.node.model_store).expanduser() if request.node.model_store else model_store()
    card = model_card(request.settings, round=request.server_round, federated_rounds=request.server_round,
                      epsilon=epsilon)  # fmt: skip
    try:
        decision = check_promotion(request.model, current_default(store), request, card=card)
    except Exception as exc:
        decision = PromotionDecision(False, f"promotion check failed: {str(exc)[:160]}")
    folder = store if decision.promoted else store / REFUSED_FOLDER
    path = save_checkpoint(folder / f"federation-{run_id}", request.model, card)
    _record(request.node, request.server_round, "model-promoted" if decision.promoted else "model-refused",
            reason=decision.reason[:200], candidate_dice=decision.candidate_score, current_dice=decision.current_score)
    return path


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the lab's held-out tiles; reply with scalars only.

    In the final evaluation round (config ``final``) the lab also keeps the
    global model in its local model store (:func:`keep_global_model`); it
    becomes the lab's default model only if it passes the lab's own check.
    """
    config = _config(msg)
    try:
        request = _prepare(msg, context)
    except DeclineRound as decline:
        _record(NodeSettings.from_node_config(context.node_config), int(config.get("server-round", 0)), "declined",
                reason=decline.reason)  # fmt: skip
        return Message(Error(code=0, reason=f"declined: {decline.reason}"[:200]), reply_to=msg)
    final = bool(config.get("final", False))
    _record(request.node, request.server_round, "evaluating")
    if final:
        epsilon = config.get("epsilon")
        try:
            keep_global_model(request, context.run_id, float(epsilon) if epsilon is not None else None)
        except Exception as exc:
            _record(request.node, request.server_round, "store-failed", reason=str(exc)[:200])
    result = (load_function(request.node.eval_fn) if request.node.eval_fn else default_evaluate)(request)
    metrics = _scalars({"num-examples": int(result.num_examples), "eval-loss": float(result.loss),
                        "dice": float(result.dice), "jaccard": float(result.jaccard),
                        "pixel-accuracy": float(result.pixel_accuracy)})  # fmt: skip
    _record(request.node, request.server_round, "evaluated", final=final, **metrics)
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)
