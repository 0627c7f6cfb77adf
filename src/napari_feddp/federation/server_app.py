"""Flower ServerApp of napari-feddp (Flower 1.42 Message API).

Loaded by ``flwr-serverapp`` (started by the SuperLink's SuperExec) as
``napari_feddp.federation.server_app:app``. It runs :func:`run_federation`:

* a seeded initial UNet is the round-0 global model;
* every round: wait for ``min-clients`` connected SuperNodes, send the global
  weights + round config, collect replies until ``round-timeout``, drop
  failed/declined/invalid replies (NaN/Inf, wrong shapes, impossible epsilon,
  outlier updates, ...), bound the rest (capped example counts, update norms
  clipped) and FedAvg them (or take their coordinate-wise median / trimmed
  mean; uniform weights with client-level DP, where Flower's
  ``DifferentialPrivacyClientSideFixedClipping`` adds Gaussian noise),
* with secure aggregation (on by default with 3 or more labs,
  :mod:`~napari_feddp.federation.secure`) the round runs through Flower's
  SecAgg+ stages instead, and only the mean of the labs' updates is seen,
* a checkpoint (safetensors + model card) and a ``rounds.jsonl`` line per round;
  a card value that cannot be written is recorded in the round line, it does
  not stop the run,
* the final model: the last global model, or the mean of the last
  ``average-last`` ones,
* a final federated evaluation on every connected node,
* ``summary.json`` with the run status.
"""

from __future__ import annotations

import logging
import time
import traceback

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from .checkpoints import CheckpointWriter, average_arrays
from .local import build_model
from .secure import SecureRound, ServerOptimizer, secure_aggregation_on
from .settings import RunSettings
from .strategy import GuardedStrategy, build_strategy, valid_epsilon

app = ServerApp()


def initial_arrays(settings: RunSettings) -> tuple[ArrayRecord, int]:
    """Starting global model and the number of rounds it has already seen.

    A seeded fresh UNet, or the weights of ``settings.resume_from`` (whose card
    must describe the same architecture) with the card's ``round``.
    """
    if settings.resume_from:
        from ..models import load_checkpoint

        model, card = load_checkpoint(settings.resume_from)

        def shapes(module) -> dict:
            return {k: tuple(v.shape) for k, v in module.state_dict().items()}

        if shapes(model) != shapes(build_model(settings)):
            raise ValueError(f"resume-from {settings.resume_from}: its architecture {card.architecture.params} "
                             f"does not match this run's {settings.unet_params}")
        done = int(card.provenance.round or card.provenance.federated_rounds or 0)
    else:
        torch.manual_seed(settings.seed)
        model, done = build_model(settings), 0
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()}), done


def update_dp_epsilon(settings: RunSettings, releases: int) -> float | None:
    """Client-level epsilon after ``releases`` noisy aggregates (``dp-mode = update``).

    Each aggregate is a Gaussian mechanism on the mean of clipped updates with
    noise multiplier ``update-noise-multiplier``; composition uses the RDP
    accountant without sampling amplification (every lab takes part every
    round), at ``target-delta``. Covers this run only (no cross-run ledger).
    """
    if settings.update_noise_multiplier <= 0 or releases <= 0:
        return None
    from ..training.ledger import epsilon_of

    history = [(float(settings.update_noise_multiplier), 1.0, int(releases))]
    return float(epsilon_of("rdp", history, settings.target_delta))


def run_federation(grid: Grid, settings: RunSettings, writer: CheckpointWriter | None = None,
                   strategy: GuardedStrategy | None = None,
                   context: Context | None = None) -> tuple[ArrayRecord, GuardedStrategy]:
    """Run all training rounds and the final evaluation; return the final weights and the strategy (its reports).

    ``writer`` defaults to one for ``settings.checkpoint_dir``, ``strategy`` to
    :func:`~napari_feddp.federation.strategy.build_strategy`'s; ``context`` is
    the ServerApp's (secure aggregation keeps its protocol state there).
    """
    writer = writer or CheckpointWriter(settings.checkpoint_dir, settings)
    context = context or Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    arrays, done = initial_arrays(settings)
    strategy = strategy or build_strategy(settings, arrays)
    strategy.summary()
    secure = secure_aggregation_on(settings)
    log(logging.INFO, "Secure aggregation (SecAgg+): %s", "on" if secure else "off")
    server_optimizer = ServerOptimizer(settings) if settings.dp_noise == "distributed" else None
    # Nothing lab-reported is in the first card: a failure is the operator's to see.
    writer.save_model(f"round-{done:03d}", arrays, strict=True, round=done, federated_rounds=done)
    epsilon = None
    released = 0  # noisy aggregates published (client-level DP accounting)
    recent: list[ArrayRecord] = []  # the last average-last global models
    last_round = done + settings.num_rounds
    for server_round in range(done + 1, last_round + 1):
        started = time.monotonic()
        log(logging.INFO, "[ROUND %d/%d]", server_round, last_round)
        config = ConfigRecord({"learning-rate": float(settings.learning_rate)})
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        if secure:
            strategy.forget_train(server_round)
            new_arrays, strategy.reports[server_round] = SecureRound(settings, len(messages), server_optimizer).run(
                grid, context, server_round, arrays, messages)
        else:
            new_arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages,
                                                                                       timeout=settings.round_timeout))
        arrays = arrays if new_arrays is None else new_arrays
        recent = [*recent, arrays][-max(1, settings.average_last):]
        report = strategy.reports[server_round]
        report.seconds = time.monotonic() - started
        if settings.dp_mode == "update" and report.aggregated:
            released += 1
            report.epsilon_max = update_dp_epsilon(settings, released)
        # The strategy already rejects labs with invalid epsilons, but the
        # server's own update-DP figure can be infinite; a figure that is no
        # claim must not enter the running maximum and spoil every later card.
        round_epsilon = valid_epsilon(report.epsilon_max)
        if round_epsilon is not None:
            epsilon = max(epsilon or 0.0, round_epsilon)
        elif report.epsilon_max is not None:
            report.note = "; ".join(filter(None, [report.note, f"epsilon {report.epsilon_max!r} ignored (not a valid claim)"]))
        name = f"round-{server_round:03d}"
        path = writer.save_model(name, arrays, round=server_round, federated_rounds=server_round, epsilon=epsilon,
                                 metrics={} if report.train_dice is None else {"train_dice": report.train_dice})
        row = {**report.to_dict(), "checkpoint": str(path) if path else None}
        if problem := writer.problems.get(name):
            row["checkpoint_problem"] = problem
        writer.append_round(row)
        log(logging.INFO, "Round %d: %d accepted, %d rejected, %d declined, %d failed, aggregated=%s", server_round,
            len(report.accepted), len(report.rejected), len(report.declined), len(report.failed), report.aggregated)
    if len(recent) > 1:  # averaging released models is post-processing: no privacy cost
        arrays = average_arrays(recent)
        log(logging.INFO, "Final model: the mean of the last %d rounds' global models", len(recent))
    evaluation_metrics = {}
    if settings.final_evaluation:
        config = ConfigRecord({"final": True})
        if epsilon is not None:
            config["epsilon"] = float(epsilon)
        messages = strategy.configure_evaluate(last_round, arrays, config, grid)
        strategy.aggregate_evaluate(last_round, grid.send_and_receive(messages, timeout=settings.round_timeout))
        writer.write_evaluation(strategy.evaluation)
        if strategy.evaluation:
            evaluation_metrics = strategy.evaluation.get("metrics", {})
    writer.save_model("final", arrays, round=last_round, federated_rounds=last_round, epsilon=epsilon,
                      metrics=evaluation_metrics)
    return arrays, strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point called by ``flwr-serverapp``."""
    settings = RunSettings.from_run_config(context.run_config)
    writer = CheckpointWriter(settings.checkpoint_dir, settings)
    writer.write_summary("running", run_id=context.run_id, settings=settings.to_run_config())
    try:
        _, strategy = run_federation(grid, settings, writer, context=context)
    except BaseException as exc:
        writer.write_summary("failed", run_id=context.run_id, error=f"{type(exc).__name__}: {exc}",
                             traceback=traceback.format_exc()[-4000:])
        raise
    extra = {"checkpoint_problems": writer.problems} if writer.problems else {}
    writer.write_summary("completed", run_id=context.run_id, rounds=len(strategy.reports),
                         evaluation=strategy.evaluation, **extra)
