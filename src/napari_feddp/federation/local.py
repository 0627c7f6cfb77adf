"""What a lab does locally in a federated round: pluggable training and evaluation.

The ClientApp only needs two functions::

    train_fn(request: LocalRequest) -> LocalUpdate      # trains request.model in place
    eval_fn(request: LocalRequest) -> LocalEvaluation

The defaults (:func:`default_train`, :func:`default_evaluate`) use
:mod:`napari_feddp.training` (``SegmentationDataset``, ``train_local`` with
Opacus DP-SGD, the persistent ``PrivacyLedger``). A lab can plug in another
implementation with the node setting ``train-fn = "package.module:function"``
(tests use this to inject faulty updates).

To sit a round out (privacy budget exhausted) a train function raises
:class:`DeclineRound`; ``training.BudgetExceededError`` is translated to it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .settings import NodeSettings, RunSettings

if TYPE_CHECKING:
    from torch import nn


class DeclineRound(Exception):
    """The lab declines this round; nothing was trained, no budget was spent.

    ``reason`` is sent to the server: short and non-identifying (no paths, no
    data); so are the privacy-budget figures reported with it.
    """

    def __init__(self, reason: str, *, epsilon: float | None = None, epsilon_next: float | None = None,
                 epsilon_max: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.figures = {"epsilon": epsilon, "epsilon-next": epsilon_next, "epsilon-max": epsilon_max}

    def metrics(self) -> dict[str, float]:
        """Scalar figures for the reply (``declined`` = 1)."""
        finite = {k: float(v) for k, v in self.figures.items() if v is not None and math.isfinite(v)}
        return {"declined": 1.0, **finite}


@dataclass
class LocalRequest:
    """Everything a local train/eval function gets.

    ``model`` is the global model (weights loaded; train it in place),
    ``settings`` the run's (the same for every lab), ``node`` this lab's,
    ``server_round`` 1-based; ``train_overrides`` come from the server's round
    config (e.g. ``learning-rate``).
    """

    model: nn.Module
    settings: RunSettings
    node: NodeSettings
    server_round: int
    train_overrides: dict | None = None


@dataclass
class LocalUpdate:
    """Scalar summary of a local training round (weights travel separately).

    ``num_examples`` is the FedAvg weight; ``loss`` and ``dice`` are indicative
    training figures; ``epsilon`` and ``delta`` the cumulative privacy spent by
    this lab's dataset (``sample`` mode).
    """

    num_examples: int
    loss: float
    dice: float
    epsilon: float | None = None
    delta: float | None = None
    steps: int = 0


@dataclass
class LocalEvaluation:
    """Scalar summary of a local evaluation."""

    num_examples: int
    loss: float
    dice: float
    jaccard: float
    pixel_accuracy: float


TrainFn = Callable[[LocalRequest], LocalUpdate]
EvalFn = Callable[[LocalRequest], LocalEvaluation]


def load_function(reference: str) -> Callable:
    """Import ``"package.module:function"`` (ValueError if malformed or not callable)."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected 'module:function', received {reference!r}")
    target = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{reference!r} is not callable")
    return target


# --------------------------------------------------------------------------- model


def build_model(settings: RunSettings) -> nn.Module:
    """The run's UNet (GroupNorm, Opacus-compatible), freshly initialised."""
    from ..models import UNet

    return UNet(**settings.unet_params)


def model_card(settings: RunSettings, **provenance):
    """:class:`~napari_feddp.models.ModelCard` of the run's global model (``provenance``: ``federated_rounds``,
    ``round``, ``epsilon``, ``metrics``)."""
    from ..models import default_card

    epsilon = provenance.get("epsilon")
    accounted = settings.dp_mode != "none" and epsilon is not None
    return default_card(
        name=settings.model_name,
        mpp=settings.mpp,
        tile_size=settings.crop_size,
        description="Federated U-Net trained with napari-feddp (Flower).",
        training_data="federated: private lab datasets (never shared)",
        federated_rounds=int(provenance.get("federated_rounds", settings.num_rounds)),
        round=provenance.get("round"),
        privacy={"dp_mode": settings.dp_mode, "epsilon": float(epsilon) if accounted else None,
                 "delta": settings.target_delta if accounted else None},
        metrics={k: float(v) for k, v in (provenance.get("metrics") or {}).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)},
        **settings.unet_params,
    )


def _dataset(request: LocalRequest, mode: str):
    from ..models.build import IMAGENET_MEAN, IMAGENET_STD
    from ..training import SegmentationDataset

    settings, node = request.settings, request.node
    folder = node.data_dir if mode == "train" else (node.eval_dir or node.data_dir)
    if not folder:
        raise ValueError("node setting 'data-dir' is empty: this lab has no dataset configured")
    return SegmentationDataset(folder, crop_size=settings.crop_size, mode=mode, source_mpp=settings.source_mpp,
                               target_mpp=settings.mpp, n_classes=settings.n_classes,
                               rim_fraction=settings.rim_fraction, normalization=(IMAGENET_MEAN, IMAGENET_STD),
                               augment=mode == "train", seed=None)


def ledger_dir(node: NodeSettings) -> Path:
    """The lab's privacy-ledger directory (default ``$FEDDP_HOME/ledger``).

    ``$FEDDP_HOME`` is :func:`napari_feddp.models.store.feddp_home`
    (``~/.local/share/napari-feddp`` unless set), next to the model store.
    """
    if node.ledger_dir:
        return Path(node.ledger_dir).expanduser()
    from ..models.store import feddp_home

    return feddp_home() / "ledger"


# --------------------------------------------------------------------------- defaults


def default_train(request: LocalRequest) -> LocalUpdate:
    """One local round with :func:`napari_feddp.training.train_local`.

    ``sample`` mode: DP-SGD with the lab's persistent ledger, accounted at the
    lab's own delta (``max-delta`` of its policy, which the run's delta may not
    exceed); a round that would exceed the lab's ``max-epsilon``, or a dataset
    too large for that delta, raises :class:`DeclineRound` before any training.
    With ``dp-noise = distributed`` the round is one DP-SGD step that is not
    applied: the weights sent are the global model plus the lab's noisy
    gradient sum, with the lab's share of the noise (the server sums the
    shares under secure aggregation and applies the step).
    ``update`` and ``none`` modes train without per-sample noise (in ``update``
    mode the ClientApp clips the update and the server adds noise).
    """
    from ..training import BudgetExceededError, PrivacyLedger, dataset_fingerprint, private_gradient_sum, train_local

    settings, node = request.settings, request.node
    overrides = request.train_overrides or {}
    dataset = _dataset(request, "train")
    private = settings.dp_mode == "sample"
    ledger = None
    if private:
        from .policy import delta_refusal

        if refusal := delta_refusal(node.max_delta, len(dataset)):
            raise DeclineRound(refusal)
        ledger = PrivacyLedger(ledger_dir(node), node.lab, dataset_fingerprint(node.data_dir),
                               dataset_dir=node.data_dir, delta=node.max_delta)  # fmt: skip
    config = settings.train_config(node, learning_rate=overrides.get("learning-rate"))
    try:
        if settings.dp_noise == "distributed":
            total, result = private_gradient_sum(request.model, dataset, config, noise_share=settings.noise_share,
                                                 ledger=ledger, round_id=request.server_round)  # fmt: skip
            # The update this lab sends (weights minus the global model) is its noisy gradient sum.
            state = request.model.state_dict()
            result.state_dict = {name: value + total[name] if name in total else value for name, value in state.items()}
        else:
            result = train_local(request.model, dataset, config, ledger=ledger, round_id=request.server_round)
    except BudgetExceededError as exc:
        raise DeclineRound(
            f"next round would reach epsilon {_epsilon(exc.epsilon_next)} > budget {_epsilon(exc.epsilon_max)}",
            epsilon=exc.epsilon_spent, epsilon_next=exc.epsilon_next, epsilon_max=exc.epsilon_max) from None
    request.model.load_state_dict(result.state_dict)
    return LocalUpdate(num_examples=int(result.n_examples), loss=float(result.loss), dice=float(result.dice),
                       epsilon=result.epsilon, delta=result.delta, steps=int(result.steps))


def _epsilon(value: float) -> str:
    """Epsilon for a decline reason: one decimal, two significant digits below 1 (a budget of 0.01 is not 0.0)."""
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.2g}"


def default_evaluate(request: LocalRequest) -> LocalEvaluation:
    """Evaluate the global model on the lab's tiles (deterministic sliding crops)."""
    from ..training import evaluate

    dataset = _dataset(request, "sliding")
    scores = evaluate(request.model, dataset, batch_size=request.settings.batch_size, n_classes=request.settings.n_classes)
    return LocalEvaluation(num_examples=int(scores.get("n_items", len(dataset))), loss=float(scores["loss"]),
                           dice=float(scores["dice"]), jaccard=float(scores["jaccard"]),
                           pixel_accuracy=float(scores["pixel_accuracy"]))
