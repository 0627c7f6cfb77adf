"""One lab's local training round: Dice+CE loss, optional DP-SGD through Opacus.

DP-SGD (``dp_mode="sample"``): Opacus ``make_private`` with Poisson sampling (each tile joins
a logical batch with probability ``sample_rate``), per-sample gradient clipping to
``max_grad_norm`` and Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm``;
Opacus' ``BatchMemoryManager`` splits logical batches into physical ones of at most
``max_physical_batch_size``. The privacy unit is one dataset item - one tile.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._grad_samplers import install_fast_conv_sampler
from .errors import LedgerError
from .ledger import PrivacyLedger, epsilon_of
from .losses import DiceCELoss
from .metrics import SegmentationMetrics

_Count = Annotated[int, Field(strict=True, ge=1)]
_Positive = Annotated[float, Field(strict=True, gt=0)]


class TrainConfig(BaseModel):
    """Settings of one local training round (a federated round's come from
    :meth:`napari_feddp.federation.settings.RunSettings.train_config`).

    Parameters
    ----------
    epochs, steps : int or None
        Passes over the dataset (under Poisson sampling ``1 / sample_rate`` logical steps
        each), or logical optimizer steps; at most one may be given (neither: ``epochs=1``).
    lr, momentum, weight_decay : float
        Optimizer settings (``momentum`` for SGD only).
    optimizer : {"adam", "sgd"}
    batch_size : int
        Logical (expected, under Poisson sampling) batch size.
    max_physical_batch_size : int
        Largest batch pushed through the model at once (memory bound).
    crop_size : int or None
        If set, must equal the dataset's ``crop_size`` (the dataset makes the crops).
    dp_mode : {"sample", "none"}
        ``"sample"``: DP-SGD with per-sample clipping. ``"none"``: plain training.
    max_grad_norm : float
        Per-sample gradient clipping norm C.
    noise_multiplier, target_epsilon : float or None
        Noise standard deviation in units of C, or the epsilon at ``delta`` that
        ``planned_rounds`` rounds of this configuration reach from zero (the noise is derived
        from it). At most one may be given (neither, under DP: ``noise_multiplier=1.0``).
        The ledger still enforces ``epsilon_max`` on what is actually spent.
    planned_rounds : int
        Rounds the ``target_epsilon`` is spread over.
    delta : float
        Delta of the reported epsilon (should be well below 1 / number of tiles).
    epsilon_max : float or None
        Budget; with a ledger, a round that would exceed it is refused before training.
    accountant : {"rdp", "prv"}
        Opacus accountant.
    augmentation_multiplicity : int
        DP-SGD only: each sampled tile's gradient is the mean of the gradients of K
        independently augmented crops of it, taken *before* per-sample clipping (De et al. 2022,
        "augmentation multiplicity"). The tile stays the privacy unit and its clipped
        contribution is still bounded by ``max_grad_norm``, so accounting is unchanged; the
        clipped gradient is less noisy, at K times the compute per step.
    grad_sample_mode : {"hooks", "functorch", "ew"}
        How Opacus computes per-sample gradients (``"ew"`` fails on U-Nets with skip
        concatenations for batches > 1).
    fast_conv_grads : bool
        In ``"hooks"`` mode, Conv2d per-sample gradients as one grouped convolution
        (``training/_grad_samplers.py``: same values, several times faster).
    seed : int or None
        Seeds torch (model noise, sampling, crops); ``None`` leaves RNGs alone.
    device : str
        Torch device, e.g. ``"cpu"`` or ``"cuda"``.
    num_workers : int
        DataLoader worker processes.
    secure_mode : bool
        Opacus cryptographically secure noise (needs ``torchcsprng``).

    Raises
    ------
    pydantic.ValidationError
        (a ``ValueError``) naming the setting that is out of range or inconsistent.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: _Count | None = None
    steps: _Count | None = None
    lr: _Positive = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: _Count = 8
    max_physical_batch_size: _Count = 4
    crop_size: _Count | None = None
    dp_mode: Literal["sample", "none"] = "sample"
    max_grad_norm: _Positive = 1.0
    noise_multiplier: _Positive | None = None
    target_epsilon: _Positive | None = None
    planned_rounds: _Count = 1
    delta: Annotated[float, Field(strict=True, gt=0, lt=1)] = 1e-5
    epsilon_max: _Positive | None = None
    accountant: Literal["rdp", "prv"] = "rdp"
    augmentation_multiplicity: Annotated[int, Field(strict=True, ge=1, le=32)] = 1
    grad_sample_mode: Literal["hooks", "functorch", "ew"] = "hooks"
    fast_conv_grads: bool = True
    seed: int | None = 0
    device: str = "cpu"
    num_workers: int = 0
    secure_mode: bool = False

    @model_validator(mode="after")
    def _one_length_and_one_noise(self) -> TrainConfig:
        if self.epochs is not None and self.steps is not None:
            raise ValueError(f"expected at most one of epochs and steps, received epochs={self.epochs}, "
                             f"steps={self.steps}")
        if self.dp_mode == "sample" and self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("with dp_mode='sample' expected at most one of noise_multiplier and target_epsilon, "
                             f"received noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon}")
        if self.epochs is None and self.steps is None:
            self.epochs = 1
        if self.dp_mode == "sample" and self.noise_multiplier is None and self.target_epsilon is None:
            self.noise_multiplier = 1.0
        if self.augmentation_multiplicity > 1 and self.dp_mode != "sample":
            raise ValueError("augmentation_multiplicity averages per-sample gradients before DP-SGD's clipping; "
                             "with dp_mode='none' use a larger batch instead")
        return self


@dataclass(frozen=True)
class RoundPlan:
    """DP-SGD parameters of a round, known before it runs.

    ``sample_rate`` is ``1 / ceil(n_examples / batch_size)``, ``steps`` the logical (noisy)
    optimizer steps, ``noise_multiplier`` None without DP, ``expected_batch_size``
    ``sample_rate * n_examples``.
    """

    n_examples: int
    sample_rate: float
    steps: int
    noise_multiplier: float | None
    expected_batch_size: float


@dataclass
class TrainResult:
    """Outcome of :func:`train_local`.

    Attributes
    ----------
    state_dict : dict of str to Tensor
        Trained weights (CPU copies, keys of the original model).
    n_examples : int
        Dataset items, the weight of this lab in federated averaging.
    loss : float
        Mean per-sample training loss over the round.
    dice, jaccard, pixel_accuracy : float
        Pooled training metrics on the crops seen (augmented, so only indicative).
    epsilon : float or None
        Cumulative epsilon at ``delta`` after the round (from the ledger if one was given,
        else of this round alone); None without DP.
    epsilon_round : float or None
        Epsilon of this round alone.
    delta : float or None
    steps : int
        Logical optimizer steps taken.
    noise_multiplier, sample_rate, max_grad_norm : float or None
        DP-SGD parameters used (None without DP).
    dp_mode, grad_sample_mode : str
    accountant_state : dict
        This round's Opacus accountant ``state_dict()`` (empty without DP).
    seconds : float
        Wall time of the round.
    """

    state_dict: dict[str, torch.Tensor]
    n_examples: int
    loss: float
    dice: float
    jaccard: float
    pixel_accuracy: float
    epsilon: float | None
    epsilon_round: float | None
    delta: float | None
    steps: int
    noise_multiplier: float | None
    sample_rate: float | None
    max_grad_norm: float | None
    dp_mode: str
    grad_sample_mode: str
    accountant_state: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def plan_round(n_examples: int, config: TrainConfig) -> RoundPlan:
    """Sampling rate, step count and noise multiplier a round of ``config`` will use.

    Raises
    ------
    ValueError
        If the dataset is empty or the target epsilon is unreachable.
    """
    if n_examples < 1:
        raise ValueError("dataset: expected at least one training item, received an empty dataset")
    batches_per_epoch = math.ceil(n_examples / config.batch_size)
    sample_rate = 1.0 / batches_per_epoch
    steps = config.steps if config.steps is not None else config.epochs * batches_per_epoch
    noise = None
    if config.dp_mode == "sample":
        noise = config.noise_multiplier
        if noise is None:
            noise = derive_noise_multiplier(config, sample_rate=sample_rate, steps=steps)
    return RoundPlan(n_examples, sample_rate, int(steps), noise, sample_rate * n_examples)


def derive_noise_multiplier(config: TrainConfig, *, sample_rate: float, steps: int) -> float:
    """Noise multiplier reaching ``config.target_epsilon`` after ``planned_rounds * steps`` steps."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            # The search probes very large noise, where RDP's largest order is optimal: harmless.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(
                target_epsilon=config.target_epsilon, target_delta=config.delta, sample_rate=sample_rate,
                steps=steps * config.planned_rounds, accountant=config.accountant, epsilon_tolerance=0.01,
            ))
    except ValueError as exc:
        raise ValueError(
            f"target_epsilon={config.target_epsilon} at delta={config.delta} cannot be reached with "
            f"{steps * config.planned_rounds} steps at sample rate {sample_rate:.3g} ({exc})"
        ) from exc


def train_local(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig | None = None,
    *,
    ledger: PrivacyLedger | None = None,
    round_id: Any = None,
    loss_fn: nn.Module | None = None,
) -> TrainResult:
    """Train ``model`` in place for one local round and report weights, metrics and epsilon.

    Parameters
    ----------
    model : nn.Module
        Maps ``(B, 3, H, W)`` images to ``(B, C, H, W)`` logits. For DP it must be
        Opacus-compatible (GroupNorm, not BatchNorm); no Opacus hooks remain on it afterwards.
    dataset : Dataset
        Map-style dataset of ``(image float (3, H, W), mask int64 (H, W))``, e.g.
        :class:`~napari_feddp.training.SegmentationDataset` in ``"train"`` mode.
    config : TrainConfig or None
        Defaults to ``TrainConfig()``.
    ledger : PrivacyLedger or None
        If given (DP only), the round is checked against ``config.epsilon_max`` *before*
        training and recorded after it (also when it fails midway); ``epsilon`` is then cumulative.
    round_id : any
        Label stored with the ledger record (e.g. the server round).
    loss_fn : nn.Module or None
        Loss with per-sample structure (default :class:`DiceCELoss`).

    Raises
    ------
    BudgetExceededError
        The round would exceed ``epsilon_max``; nothing was trained.
    ValueError
        Invalid configuration, empty dataset, or a model Opacus cannot make private.
    LedgerError
        Ledger inconsistent with the configuration (delta, accountant) or with disk.
    """
    config = config or TrainConfig()
    started = time.perf_counter()
    dp = config.dp_mode == "sample"
    _check_dataset(dataset, config)
    plan = plan_round(len(dataset), config)
    if ledger is not None:
        if not dp:
            raise ValueError("a privacy ledger was given but dp_mode='none': non-private training has no finite epsilon")
        if not math.isclose(ledger.delta, config.delta) or ledger.mechanism != config.accountant:
            raise LedgerError(
                f"ledger {ledger.path} accounts with {ledger.mechanism!r} at delta={ledger.delta:g}; TrainConfig asks "
                f"for {config.accountant!r} at delta={config.delta:g}"
            )
        ledger.check_budget(plan.noise_multiplier, plan.sample_rate, plan.steps, config.epsilon_max)
    if config.seed is not None:
        torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model.to(device).train()
    loss_fn = loss_fn or DiceCELoss()
    n_classes = _n_classes(model, dataset, device)
    targets = getattr(dataset, "n_classes", None)
    if isinstance(targets, int) and targets != n_classes:
        raise ValueError(
            f"the model predicts {n_classes} classes but the dataset's targets have {targets}; "
            f"build the dataset with n_classes={n_classes} (e.g. SegmentationDataset.for_model)"
        )
    stats = _Stats(SegmentationMetrics(n_classes))
    if dp:
        history = _train_private(model, dataset, config, plan, loss_fn, device, stats, ledger, round_id)
    else:
        _train_plain(model, dataset, config, plan, loss_fn, device, stats)
        history = []

    scores = stats.metrics.compute() if stats.metrics.n_pixels else dict.fromkeys(("dice", "jaccard", "pixel_accuracy"), math.nan)
    epsilon = epsilon_round = epsilon_of(config.accountant, history, config.delta) if dp else None
    if ledger is not None:
        epsilon = ledger.record_round(
            noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=stats.steps,
            history=history, n_examples=plan.n_examples, round_id=round_id, epsilon_max=config.epsilon_max,
            meta={"max_grad_norm": config.max_grad_norm, "batch_size": config.batch_size, "lr": config.lr,
                  "augmentations": config.augmentation_multiplicity},
        ).epsilon
    return TrainResult(
        state_dict={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        n_examples=plan.n_examples, loss=stats.loss_sum / stats.n_samples if stats.n_samples else math.nan,
        dice=scores["dice"], jaccard=scores["jaccard"], pixel_accuracy=scores["pixel_accuracy"], epsilon=epsilon,
        epsilon_round=epsilon_round, delta=config.delta if dp else None, steps=stats.steps,
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate if dp else None,
        max_grad_norm=config.max_grad_norm if dp else None, dp_mode=config.dp_mode,
        grad_sample_mode=config.grad_sample_mode if dp else "none",
        accountant_state={"mechanism": config.accountant, "history": history} if dp else {},
        seconds=time.perf_counter() - started,
    )


def private_gradient_sum(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    *,
    noise_share: float,
    ledger: PrivacyLedger | None = None,
    round_id: Any = None,
    loss_fn: nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """One DP-SGD step's noisy gradient **sum**, not applied: a lab's part of a distributed-noise round.

    A Poisson sample of the dataset (rate from :func:`plan_round`), per-sample gradients clipped to
    ``config.max_grad_norm`` and summed, plus Gaussian noise of standard deviation
    ``noise_share * max_grad_norm`` (the lab's share of the noise). Summed over labs by secure
    aggregation, the shares add up to noise of ``config.noise_multiplier``, and the privacy ledger
    accounts the round at that multiplier: one step of DP-SGD at the lab's sample rate.

    Returns
    -------
    (dict, TrainResult)
        The noisy sum per parameter name (``model``'s parameters are left unchanged) and the
        round's figures (``steps`` 1, ``epsilon`` from the ledger as in :func:`train_local`).

    Raises
    ------
    BudgetExceededError
        The step would exceed ``config.epsilon_max``; nothing was computed.
    """
    started = time.perf_counter()
    config = config.model_copy(update={"steps": 1, "epochs": None})
    if config.dp_mode != "sample" or config.noise_multiplier is None:
        raise ValueError("a distributed-noise round needs dp_mode='sample' and an explicit noise_multiplier")
    if not 0 < noise_share <= config.noise_multiplier:
        raise ValueError(f"noise_share must be in (0, noise_multiplier={config.noise_multiplier}], "
                         f"received {noise_share}")  # fmt: skip
    _check_dataset(dataset, config)
    plan = plan_round(len(dataset), config)
    if ledger is not None:
        ledger.check_budget(plan.noise_multiplier, plan.sample_rate, 1, config.epsilon_max)
    if config.seed is not None:
        torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model.to(device).train()
    loss_fn = loss_fn or DiceCELoss()
    stats = _Stats(SegmentationMetrics(_n_classes(model, dataset, device)))
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    engine, private_model, dp_optimizer, dp_loader = make_private(
        model, torch.optim.SGD(model.parameters(), lr=1.0), _private_loader(dataset, config), config,
        noise_share)  # fmt: skip
    names = {id(p): name for name, p in model.named_parameters()}
    try:
        with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=config.max_physical_batch_size,
                                optimizer=dp_optimizer) as memory_loader:
            for images, masks in _repeat(memory_loader, 1, stats):
                _private_step(private_model, dp_optimizer, loss_fn, images.to(device), masks.to(device), stats,
                              apply=False)  # fmt: skip
        # Opacus scaled the noisy sum by 1 / expected batch size: undo it.
        total = {names[id(p)]: (p.grad.detach() * dp_optimizer.expected_batch_size).cpu().clone()
                 for p in dp_optimizer.params}  # fmt: skip
    finally:
        private_model.cleanup()
        for p in model.parameters():
            p.grad = None
    history = [(float(plan.noise_multiplier), float(plan.sample_rate), 1)]
    if [tuple(e)[2] for e in engine.accountant.history] != [1]:
        raise RuntimeError(f"Opacus accounted {engine.accountant.history} for one step")
    epsilon = epsilon_round = epsilon_of(config.accountant, history, config.delta)
    if ledger is not None:
        epsilon = ledger.record_round(
            noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=1, history=history,
            n_examples=plan.n_examples, round_id=round_id, epsilon_max=config.epsilon_max,
            meta={"max_grad_norm": config.max_grad_norm, "batch_size": config.batch_size, "noise": "distributed",
                  "noise_share": noise_share, "augmentations": config.augmentation_multiplicity},
        ).epsilon
    scores = stats.metrics.compute() if stats.metrics.n_pixels else dict.fromkeys(("dice", "jaccard", "pixel_accuracy"), math.nan)
    result = TrainResult(
        state_dict={}, n_examples=plan.n_examples, loss=stats.loss_sum / stats.n_samples if stats.n_samples else math.nan,
        dice=scores["dice"], jaccard=scores["jaccard"], pixel_accuracy=scores["pixel_accuracy"], epsilon=epsilon,
        epsilon_round=epsilon_round, delta=config.delta, steps=1, noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate, max_grad_norm=config.max_grad_norm, dp_mode="sample",
        grad_sample_mode=config.grad_sample_mode, accountant_state={"mechanism": config.accountant, "history": history},
        seconds=time.perf_counter() - started,
    )
    return total, result


@dataclass
class _Stats:
    metrics: SegmentationMetrics
    loss_sum: float = 0.0
    n_samples: int = 0
    steps: int = 0

    def add(self, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        self.loss_sum += float(loss.detach()) * len(target)
        self.n_samples += len(target)
        self.metrics.update(logits.detach().argmax(1), target)


def make_private(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, config: TrainConfig,
    noise_multiplier: float,
) -> tuple[Any, nn.Module, Any, DataLoader]:
    """Wrap model, optimizer and loader for DP-SGD the way :func:`train_local` does.

    Validates the model, calls Opacus ``PrivacyEngine.make_private`` with Poisson sampling
    and flat clipping, and installs the fast Conv2d per-sample-gradient sampler when configured.

    Returns
    -------
    engine, private_model, dp_optimizer, dp_loader
        The ``PrivacyEngine`` (its ``accountant`` records the steps), the ``GradSampleModule``
        wrapping ``model``, the ``DPOptimizer`` and the Poisson-sampling data loader.

    Raises
    ------
    ValueError
        If Opacus cannot compute per-sample gradients for the model (e.g. BatchNorm).
    """
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(
            f"model cannot be trained with DP-SGD: {'; '.join(str(e) for e in errors[:5])}. Use GroupNorm "
            f"instead of BatchNorm (e.g. napari_feddp.models.UNet)"
        )
    noise_generator = None
    if not config.secure_mode and config.seed is not None:
        noise_generator = torch.Generator(device=torch.device(config.device)).manual_seed(config.seed + 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_mode)
        private_model, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=config.max_grad_norm, poisson_sampling=True, grad_sample_mode=config.grad_sample_mode,
            noise_generator=noise_generator,
        )
    if config.grad_sample_mode == "hooks" and config.fast_conv_grads:
        install_fast_conv_sampler(private_model)
    return engine, private_model, dp_optimizer, dp_loader


def _train_private(model, dataset, config, plan, loss_fn, device, stats, ledger, round_id) -> list[tuple]:
    """DP-SGD steps; returns the accountant's history (also recorded in the ledger when the round fails)."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    engine, private_model, dp_optimizer, dp_loader = make_private(
        model, _make_optimizer(model, config), _private_loader(dataset, config), config, plan.noise_multiplier
    )
    if not math.isclose(dp_optimizer.expected_batch_size, int(plan.expected_batch_size)):
        raise RuntimeError(f"Opacus planned batch {dp_optimizer.expected_batch_size}, expected {plan.expected_batch_size}")
    try:
        with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=config.max_physical_batch_size,
                                optimizer=dp_optimizer) as memory_loader:
            for images, masks in _repeat(memory_loader, plan.steps, stats):
                _private_step(private_model, dp_optimizer, loss_fn, images.to(device), masks.to(device), stats)
    except BaseException:
        # Noisy steps already taken have spent privacy even though the round failed.
        spent = [tuple(entry) for entry in engine.accountant.history]
        if ledger is not None and sum(n for _, _, n in spent):
            ledger.record_round(
                noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=sum(n for _, _, n in spent),
                history=spent, n_examples=plan.n_examples, round_id=round_id, epsilon_max=config.epsilon_max,
                meta={"interrupted": True, "planned_steps": plan.steps},
            )
        raise
    finally:
        private_model.cleanup()  # no Opacus hooks or per-sample-gradient attributes stay on the caller's model
        for p in model.parameters():
            p.grad = None
    history = [tuple(entry) for entry in engine.accountant.history]
    if sum(n for _, _, n in history) != stats.steps:
        raise RuntimeError(f"Opacus accounted {history} but {stats.steps} steps were taken")
    return history


def _private_step(model, optimizer, loss_fn, images, masks, stats: _Stats, apply: bool = True) -> None:
    """One physical batch of DP-SGD; ``apply=False`` leaves the noisy gradient in ``.grad`` without stepping."""
    if len(images) == 0:
        # Empty Poisson batch: the update is noise only, and it still counts as a step.
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    else:
        views = images.shape[1] if images.ndim == 5 else 0  # (tiles, K views, 3, H, W): augmentation multiplicity
        if views:
            images, masks = images.flatten(0, 1), masks.flatten(0, 1)
        logits = model(images)
        loss = loss_fn(logits, masks)
        with warnings.catch_warnings():
            # Opacus' hooks on the first layer fire without input gradients; harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        if views:
            _average_views(optimizer.params, views)
        stats.add(logits, masks, loss)
    if not apply:
        if optimizer.pre_step():  # the last physical batch: clipped sum + noise, scaled; kept in .grad
            stats.steps += 1
        else:  # an earlier physical batch: its clipped sum is accumulated, its per-sample grads go
            optimizer.zero_grad(set_to_none=True)
        return
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not optimizer._is_last_step_skipped:
        stats.steps += 1


def _train_plain(model, dataset, config, plan, loss_fn, device, stats) -> None:
    optimizer = _make_optimizer(model, config)
    chunk = config.max_physical_batch_size
    for images, masks in _repeat(_loader(dataset, config, shuffle=True), plan.steps, stats):
        optimizer.zero_grad(set_to_none=True)
        for chunk_images, chunk_masks in zip(images.split(chunk), masks.split(chunk)):
            chunk_images, chunk_masks = chunk_images.to(device), chunk_masks.to(device)
            logits = model(chunk_images)
            loss = loss_fn(logits, chunk_masks)
            (loss * (len(chunk_masks) / len(masks))).backward()
            stats.add(logits, chunk_masks, loss)
        optimizer.step()
        stats.steps += 1


def _repeat(loader: DataLoader, steps: int, stats: _Stats) -> Iterator[Any]:
    """Yield batches epoch after epoch until ``stats.steps`` reaches ``steps``."""
    while stats.steps < steps:
        progressed = stats.steps
        for batch in loader:
            yield batch
            if stats.steps >= steps:
                return
        if stats.steps == progressed:
            raise RuntimeError("data loader produced no batches; cannot make progress")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 4,
    device: str = "cpu",
    n_classes: int | None = None,
    loss_fn: nn.Module | None = None,
) -> dict[str, Any]:
    """Pooled Dice, Jaccard, pixel accuracy and mean loss of ``model`` on ``dataset``.

    Use a deterministic dataset (``mode="sliding"`` or ``"center"``). The model is put in
    eval mode and restored to its previous mode afterwards.

    Returns
    -------
    dict
        ``dice``, ``jaccard``, ``pixel_accuracy``, ``loss``, ``n_pixels``, ``n_items`` and
        per-class lists (see :func:`~napari_feddp.training.metrics.scores_from_confusion`).
    """
    was_training = model.training
    torch_device = torch.device(device)
    model.to(torch_device).eval()
    loss_fn = loss_fn or DiceCELoss()
    n_classes = n_classes or _n_classes(model, dataset, torch_device)
    metrics, loss_sum, n_items = SegmentationMetrics(n_classes), 0.0, 0
    try:
        for images, masks in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            images, masks = images.to(torch_device), masks.to(torch_device)
            logits = model(images)
            loss_sum += float(loss_fn(logits, masks)) * len(masks)  # mean over the batch -> sum
            n_items += len(masks)
            metrics.update(logits.argmax(1), masks)
    finally:
        model.train(was_training)
    return {**metrics.compute(), "loss": loss_sum / max(n_items, 1), "n_items": n_items}


def _check_dataset(dataset: Dataset, config: TrainConfig) -> None:
    have = getattr(dataset, "crop_size", None)
    if config.crop_size is not None and have is not None and have != config.crop_size:
        raise ValueError(
            f"TrainConfig.crop_size={config.crop_size} but the dataset makes {have}-pixel crops; "
            f"build the dataset with crop_size={config.crop_size}"
        )
    if config.dp_mode == "sample" and getattr(dataset, "mode", None) == "sliding":
        raise ValueError(
            "DP-SGD on a mode='sliding' dataset would make each window, not each tile, the privacy unit "
            "(one tile yields several windows); train on mode='train' (or 'center')"
        )
    if config.dp_mode == "sample" and len(dataset) and config.delta >= 1.0 / len(dataset):
        warnings.warn(
            f"delta={config.delta:g} is not below 1/n = {1.0 / len(dataset):.3g} for {len(dataset)} tiles: "
            f"the (epsilon, delta) guarantee is then weak; use a smaller delta",
            stacklevel=3,
        )


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _loader(dataset: Dataset, config: TrainConfig, *, shuffle: bool) -> DataLoader:
    generator = torch.Generator()
    if config.seed is not None:
        generator.manual_seed(config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=shuffle, num_workers=config.num_workers,
                      generator=generator)


class _Views(Dataset):
    """``k`` independently drawn (cropped, augmented) views of each item of a ``"train"`` dataset,
    stacked: ``(k, 3, H, W)`` images and ``(k, H, W)`` masks. One item stays one privacy unit."""

    def __init__(self, dataset: Dataset, k: int) -> None:
        self.dataset, self.k = dataset, k

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = zip(*(self.dataset[index] for _ in range(self.k)), strict=True)
        return torch.stack(images), torch.stack(masks)


def _private_loader(dataset: Dataset, config: TrainConfig) -> DataLoader:
    """The loader Opacus turns into a Poisson sampler; with augmentation multiplicity, of stacked views."""
    if config.augmentation_multiplicity > 1:
        if getattr(dataset, "mode", "train") != "train" or getattr(dataset, "augmentation", True) is None:
            raise ValueError("augmentation_multiplicity needs a dataset that draws a new augmented crop on each "
                             "access (SegmentationDataset in mode='train' with augmentation)")
        dataset = _Views(dataset, config.augmentation_multiplicity)
    return _loader(dataset, config, shuffle=False)


def _average_views(params, views: int) -> None:
    """Per-sample gradients of ``tiles * views`` rows -> the mean over each tile's views (before clipping)."""
    for p in params:
        sample = p.grad_sample
        if isinstance(sample, list):
            sample = torch.cat(sample)
        p.grad_sample = sample.view(-1, views, *sample.shape[1:]).mean(1)


def _n_classes(model: nn.Module, dataset: Dataset, device: torch.device) -> int:
    """Output classes of the model: ``n_classes`` or ``config["n_classes"]`` if it has one, else one forward pass."""
    n = getattr(model, "n_classes", None)
    config = getattr(model, "config", None)
    if n is None and isinstance(config, dict):
        n = config.get("n_classes")
    if isinstance(n, int):
        return n
    image, _ = dataset[0]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        n = int(model(image.unsqueeze(0).to(device)).shape[1])
    model.train(was_training)
    return n
