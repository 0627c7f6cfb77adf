"""Gradient-inversion privacy audit of one client update (no Qt).

Three pieces, usable separately:

* :func:`client_update` - what one lab sends after **one** local step on a
  batch of crops, computed with the product's own training code
  (:func:`napari_feddp.training.train_local`; with ``dp=True`` that is Opacus
  ``make_private``: Poisson sampling, per-sample clipping, Gaussian noise,
  division by the expected batch size). It returns the update as the server can
  read it: ``(w_before - w_after) / lr`` per parameter.
* :func:`invert_gradients` - the attack of Geiping et al., "Inverting Gradients -
  How easy is it to break privacy in federated learning?" (NeurIPS 2020): dummy
  images are optimised with Adam so that their gradient has maximal *cosine
  similarity* with the observed update, plus a total-variation prior; images
  are boxed to the valid pixel range, labels (masks) are known to the attacker.
* :func:`score_reconstructions` - PSNR and SSIM (``skimage.metrics``) of each
  reconstruction against its true crop in [0, 1] RGB, with the permutation
  ambiguity of a batch resolved by optimal matching (Hungarian algorithm on PSNR).

Images travel as float ``(B, 3, H, W)`` tensors in [0, 1] RGB; the model sees
them normalised with the card's ``(mean, std)``, exactly as
:class:`~napari_feddp.training.SegmentationDataset` feeds them.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from napari_feddp.training import DiceCELoss, TrainConfig, train_local

__all__ = [
    "AttackConfig",
    "AttackResult",
    "FixedCrops",
    "Score",
    "attack_objective",
    "client_update",
    "cosine_distance",
    "invert_gradients",
    "noise_images",
    "normalize",
    "score_reconstructions",
    "total_variation",
]

#: Cap used in place of an infinite PSNR (identical images) when matching.
_PSNR_CAP = 1000.0


# --------------------------------------------------------------------------- the client


class FixedCrops(Dataset):
    """A map-style dataset of fixed, already normalised ``(image, mask)`` pairs.

    One item is one crop, i.e. one DP sample, as one tile is in
    :class:`~napari_feddp.training.SegmentationDataset`'s ``"train"`` mode.
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(
                f"FixedCrops: expected images (B, C, H, W) and masks (B, H, W), "
                f"received {tuple(images.shape)} and {tuple(masks.shape)}"
            )
        self.images = images.float().contiguous()
        self.masks = masks.long().contiguous()
        self.crop_size = int(images.shape[-1])
        self.mode = "train"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.masks[index]


def normalize(images01: torch.Tensor, normalization: tuple[Sequence[float], Sequence[float]]) -> torch.Tensor:
    """``(images01 - mean) / std`` per RGB channel (the card's input normalisation)."""
    mean, std = (torch.as_tensor(v, dtype=images01.dtype).reshape(1, -1, 1, 1) for v in normalization)
    return (images01 - mean) / std


def client_update(
    model: nn.Module,
    images01: torch.Tensor,
    masks: torch.Tensor,
    *,
    normalization: tuple[Sequence[float], Sequence[float]],
    dp: bool,
    lr: float = 0.01,
    optimizer: str = "sgd",
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    seed: int | None = 0,
) -> dict[str, torch.Tensor]:
    """The update one client sends after one local step, as the server reads it.

    Runs :func:`~napari_feddp.training.train_local` for exactly one logical
    step on a dataset of the ``B`` given crops with ``batch_size=B``, i.e. a lab
    whose round is a single step (Poisson sampling rate 1: every crop is in the
    batch, expected batch size ``B``). ``model`` is not modified.

    Parameters
    ----------
    model : nn.Module
        Global model the round starts from.
    images01 : Tensor
        ``(B, 3, H, W)`` crops in [0, 1] RGB.
    masks : Tensor
        ``(B, H, W)`` int64 class indices.
    normalization : (mean, std)
        Input normalisation of the model card.
    dp : bool
        ``True``: DP-SGD (``dp_mode="sample"``, Opacus). ``False``: plain training.
    lr : float
        Local learning rate (FedDP default 0.01).
    optimizer : {"sgd", "adam"}
        Local optimizer. With SGD (any momentum, no weight decay) the first step
        is ``w - lr * g`` so the returned update *is* the averaged (clipped,
        noised) gradient ``g``. With Adam the first step is
        ``lr * g / (|g| + eps)`` ≈ ``lr * sign(g)``, which is what is returned then.
    noise_multiplier, max_grad_norm : float
        DP-SGD parameters (ignored without DP).
    seed : int or None
        Seed of the DP noise (``None``: fresh noise).

    Returns
    -------
    dict of str to Tensor
        ``(w_before - w_after) / lr`` for every trainable parameter, by name.
    """
    local = copy.deepcopy(model)
    before = {name: p.detach().clone() for name, p in local.named_parameters() if p.requires_grad}
    batch = len(images01)
    config = TrainConfig(
        steps=1,
        lr=lr,
        optimizer=optimizer,
        momentum=0.0,
        batch_size=batch,
        max_physical_batch_size=batch,
        crop_size=int(images01.shape[-1]),
        dp_mode="sample" if dp else "none",
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier if dp else None,
        seed=seed,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*delta=.*")
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        rng_state = torch.get_rng_state()  # train_local seeds torch's global RNG; leave the caller's alone
        try:
            result = train_local(local, FixedCrops(normalize(images01, normalization), masks), config)
        finally:
            torch.set_rng_state(rng_state)
    if result.steps != 1:
        raise RuntimeError(f"expected one local step, train_local took {result.steps}")
    return {name: (before[name] - result.state_dict[name]) / lr for name in before}


# --------------------------------------------------------------------------- the attack


@dataclass
class AttackConfig:
    """Settings of the gradient-inversion attack (defaults follow Geiping et al.).

    Attributes
    ----------
    iterations : int
        Adam steps per restart.
    lr : float
        Adam step size on the normalised dummy images.
    tv_weight : float
        Weight of the total-variation prior (mean absolute neighbour difference
        of the normalised image).
    restarts : int
        Independent random starts; the attacker keeps the one with the lowest
        final objective (no ground truth is used to choose).
    signed : bool
        Use the sign of the objective's gradient in Adam (as in the paper's experiments).
    lr_decay : bool
        Divide the step size by 10 at 3/8, 5/8 and 7/8 of the iterations.
    seed : int
        Seed of the random starting images.
    """

    iterations: int = 2000
    lr: float = 0.1
    tv_weight: float = 1e-2
    restarts: int = 1
    signed: bool = True
    lr_decay: bool = True
    seed: int = 0


@dataclass
class AttackResult:
    """Outcome of :func:`invert_gradients`.

    Attributes
    ----------
    images01 : Tensor
        ``(B, 3, H, W)`` reconstructions in [0, 1] RGB (the best restart).
    init01 : Tensor
        ``(B, 3, H, W)`` random starting images of that restart, in [0, 1].
    objective : float
        Final attack objective (``1 - cosine + tv_weight * TV``) of the best restart.
    cosine : float
        Cosine similarity between the reconstructions' gradient and the update.
    restart_objectives : list of float
        Final objective of every restart.
    history : list of (int, float)
        ``(iteration, objective)`` of the best restart, every 100 iterations.
    seconds : float
        Wall time of the attack.
    """

    images01: torch.Tensor
    init01: torch.Tensor
    objective: float
    cosine: float
    restart_objectives: list[float] = field(default_factory=list)
    history: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between horizontally and vertically adjacent pixels."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


def cosine_distance(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """``1 - cos`` between two gradients, each a list of per-parameter tensors (pooled over all layers)."""
    dot = sum((g * t).sum() for g, t in zip(grads, target))
    norm_g = sum(g.pow(2).sum() for g in grads).sqrt()
    norm_t = sum(t.pow(2).sum() for t in target).sqrt()
    return 1.0 - dot / (norm_g * norm_t + 1e-12)


def noise_images(shape: Sequence[int], normalization, *, seed: int) -> torch.Tensor:
    """The attack's starting images: standard normal in normalised space, boxed, as [0, 1] RGB."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=generator)
    lo, hi = _box(normalization, x.dtype)
    return _denormalize(torch.max(torch.min(x, hi), lo), normalization)


def attack_objective(
    model: nn.Module,
    x_norm: torch.Tensor,
    masks: torch.Tensor,
    target: Sequence[torch.Tensor],
    params: Sequence[nn.Parameter],
    *,
    tv_weight: float,
    loss_fn: nn.Module,
    create_graph: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(objective, cosine distance)`` of normalised dummy images ``x_norm`` against ``target``."""
    loss = loss_fn(model(x_norm), masks)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    distance = cosine_distance(grads, target)
    return distance + tv_weight * total_variation(x_norm), distance


def invert_gradients(
    model: nn.Module,
    update: dict[str, torch.Tensor],
    masks: torch.Tensor,
    *,
    normalization: tuple[Sequence[float], Sequence[float]],
    config: AttackConfig | None = None,
    loss_fn: nn.Module | None = None,
    log_every: int = 0,
    start01: torch.Tensor | None = None,
) -> AttackResult:
    """Reconstruct a client's crops from its update by cosine gradient matching.

    Parameters
    ----------
    model : nn.Module
        The global model the client started from (weights *before* the step);
        not modified.
    update : dict of str to Tensor
        Observed update by parameter name (e.g. from :func:`client_update`).
    masks : Tensor
        ``(B, H, W)`` labels of the client's crops (known to the attacker);
        their number fixes the batch size.
    normalization : (mean, std)
        Input normalisation of the model card.
    config : AttackConfig or None
    loss_fn : nn.Module or None
        Training loss the client used (default :class:`DiceCELoss`, as ``train_local``).
    log_every : int
        Print progress every this many iterations (0: silent).
    start01 : Tensor or None
        ``(B, 3, H, W)`` starting images in [0, 1] (e.g. a public mean colour: the
        attacker's best guess without the update). Default: :func:`noise_images`,
        as in Geiping et al. Restarts after the first add seeded noise of std 0.05 to it.

    Returns
    -------
    AttackResult
    """
    config = config or AttackConfig()
    loss_fn = loss_fn or DiceCELoss()
    started = time.perf_counter()
    model = copy.deepcopy(model).train()
    named = [(n, p) for n, p in model.named_parameters() if n in update]
    if len(named) != len(update):
        missing = sorted(set(update) - {n for n, _ in named})
        raise ValueError(f"update has parameters the model lacks: {missing[:5]}")
    params = [p for _, p in named]
    target = [update[n].detach().to(p.dtype) for n, p in named]
    size = masks.shape[-2:]
    shape = (len(masks), 3, *size)
    lo, hi = _box(normalization, torch.float32)

    best: AttackResult | None = None
    objectives = []
    for restart in range(config.restarts):
        if start01 is None:
            init01 = noise_images(shape, normalization, seed=config.seed + restart)
        else:
            if tuple(start01.shape) != shape:
                raise ValueError(f"start01: expected shape {shape}, received {tuple(start01.shape)}")
            init01 = start01.detach().float().clone()
            if restart:
                generator = torch.Generator().manual_seed(config.seed + restart)
                init01 = (init01 + 0.05 * torch.randn(shape, generator=generator)).clamp(0, 1)
        x = normalize(init01, normalization).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=config.lr)
        milestones = [int(config.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if config.lr_decay else []
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        history = []
        for it in range(config.iterations):
            optimizer.zero_grad(set_to_none=True)
            objective, _ = attack_objective(model, x, masks, target, params, tv_weight=config.tv_weight,
                                            loss_fn=loss_fn)
            (x.grad,) = torch.autograd.grad(objective, [x])
            if config.signed:
                x.grad.sign_()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                x.copy_(torch.max(torch.min(x, hi), lo))
            if it % 100 == 0 or it == config.iterations - 1:
                history.append((it, float(objective.detach())))
                if log_every and it % log_every == 0:
                    print(f"  restart {restart} iter {it:5d}  objective {float(objective.detach()):.4f}", flush=True)
        final, distance = attack_objective(model, x.detach(), masks, target, params,
                                           tv_weight=config.tv_weight, loss_fn=loss_fn, create_graph=False)
        objectives.append(float(final))
        if best is None or float(final) < best.objective:
            best = AttackResult(
                images01=_denormalize(x.detach(), normalization).clamp(0, 1),
                init01=init01,
                objective=float(final),
                cosine=1.0 - float(distance),
                history=history,
            )
    assert best is not None
    best.restart_objectives = objectives
    best.seconds = time.perf_counter() - started
    return best


def _box(normalization, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised values of pixel 0 and pixel 1 per channel, shape ``(1, 3, 1, 1)``."""
    zero = normalize(torch.zeros(1, 3, 1, 1, dtype=dtype), normalization)
    one = normalize(torch.ones(1, 3, 1, 1, dtype=dtype), normalization)
    return zero, one


def _denormalize(x: torch.Tensor, normalization) -> torch.Tensor:
    mean, std = (torch.as_tensor(v, dtype=x.dtype).reshape(1, -1, 1, 1) for v in normalization)
    return x * std + mean


# --------------------------------------------------------------------------- scoring


@dataclass
class Score:
    """PSNR/SSIM of reconstructions against the true crops after optimal matching.

    Attributes
    ----------
    psnr, ssim : list of float
        Per true crop ``i``: score of the reconstruction matched to it
        (``psnr`` is ``inf`` for an identical image).
    assignment : list of int
        ``assignment[i]`` is the index of the reconstruction matched to true crop ``i``.
    """

    psnr: list[float]
    ssim: list[float]
    assignment: list[int]

    @property
    def mean_psnr(self) -> float:
        return float(np.mean(self.psnr))

    @property
    def mean_ssim(self) -> float:
        return float(np.mean(self.ssim))


def _as_hwc(images) -> np.ndarray:
    """``(B, H, W, 3)`` float64 in [0, 1] from a ``(B, 3, H, W)`` tensor/array or ``(B, H, W, 3)`` array."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    array = array.astype(np.float64)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"expected a batch of RGB images, received shape {array.shape}")
    if array.shape[1] == 3 and array.shape[-1] != 3:
        array = array.transpose(0, 2, 3, 1)
    return np.clip(array, 0.0, 1.0)


def score_reconstructions(truth, reconstructions) -> Score:
    """Score reconstructions against the true crops; images in [0, 1] RGB.

    Every (true, reconstructed) pair is scored with
    :func:`skimage.metrics.peak_signal_noise_ratio` (``data_range=1``) and
    :func:`skimage.metrics.structural_similarity` (``data_range=1``, colour
    channels averaged); the one-to-one matching maximising total PSNR
    (:func:`scipy.optimize.linear_sum_assignment`) then pairs them, since a
    batch gradient does not tell the order of its samples.

    Parameters
    ----------
    truth, reconstructions : Tensor or ndarray
        Equal-length batches, ``(B, 3, H, W)`` or ``(B, H, W, 3)``.
    """
    from scipy.optimize import linear_sum_assignment
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    true_hwc, rec_hwc = _as_hwc(truth), _as_hwc(reconstructions)
    if true_hwc.shape != rec_hwc.shape:
        raise ValueError(f"shapes differ: truth {true_hwc.shape}, reconstructions {rec_hwc.shape}")
    n = len(true_hwc)
    psnr = np.empty((n, n))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # divide by zero -> inf for identical images
        for i in range(n):
            for j in range(n):
                psnr[i, j] = peak_signal_noise_ratio(true_hwc[i], rec_hwc[j], data_range=1.0)
    rows, cols = linear_sum_assignment(np.minimum(psnr, _PSNR_CAP), maximize=True)
    assignment = [int(c) for _, c in sorted(zip(rows, cols))]
    ssim = [
        float(structural_similarity(true_hwc[i], rec_hwc[j], data_range=1.0, channel_axis=-1))
        for i, j in enumerate(assignment)
    ]
    return Score(psnr=[float(psnr[i, j]) for i, j in enumerate(assignment)], ssim=ssim, assignment=assignment)

