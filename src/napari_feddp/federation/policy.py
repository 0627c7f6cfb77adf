"""The lab's privacy policy: what a run may ask of this lab, decided by the lab alone.

The run config comes from the coordinator and is the same for every lab; the
policy comes from the lab's own ``--node-config`` (set when it joins, see
:class:`~napari_feddp.federation.settings.NodeSettings`), so no run can change
it. Before anything is built or trained, :func:`policy_refusal` compares the
run with the policy; a run that asks for anything else is declined with the
reason (the same idea as NVFlare's site-local privacy filters).

What the policy pins
--------------------
* DP modes the lab trains under (default only ``sample``: DP-SGD inside the
  lab, so even the coordinator never sees an un-noised update);
* the largest delta (default 1e-5; also below 1 / samples, checked when the
  dataset is known, :func:`delta_refusal`) and the smallest noise multiplier;
* the epsilon budget (``max-epsilon``, enforced by the privacy ledger);
* limits on model size (parameters, counted without allocating weights), local
  steps or epochs, crop and batch size, so that a run cannot exhaust the lab's
  memory or time;
* for updates that leave the lab without DP-SGD noise (modes ``none`` and
  ``update``, both opt-in), the smallest batch: a gradient-inversion attack
  on a one-tile update recovers the tile's layout, and secure aggregation
  alone hides it only once each lab's update mixes several tiles
  (``docs/privacy.md``).
"""

from __future__ import annotations

import math

from .settings import DP_MODES, NodeSettings, RunSettings


def accepted_dp_modes(node: NodeSettings) -> tuple[str, ...]:
    """The DP modes of the lab's policy."""
    modes = tuple(m.strip() for m in str(node.accept_dp_modes).split(",") if m.strip())
    unknown = [m for m in modes if m not in DP_MODES]
    if unknown:
        raise ValueError(f"accept-dp-modes: unknown mode(s) {unknown}; expected some of {DP_MODES}")
    return modes


def model_parameters(settings: RunSettings) -> int:
    """Parameters of the run's model, counted on the meta device (no memory used)."""
    import torch

    from ..models import UNet

    with torch.device("meta"):
        model = UNet(**settings.unet_params)
    return int(sum(p.numel() for p in model.parameters()))


def policy_refusal(settings: RunSettings, node: NodeSettings) -> str | None:
    """Why this lab (``node``, its policy included) declines the run the coordinator asks for, or None.

    The reason names the setting, what was asked and the lab's limit.
    """
    modes = accepted_dp_modes(node)
    if settings.dp_mode not in modes:
        return f"lab policy: dp-mode {settings.dp_mode!r} is not accepted (this lab accepts {', '.join(modes)})"
    if settings.dp_mode == "sample":
        if settings.target_delta > node.max_delta:
            return f"lab policy: target-delta {settings.target_delta:g} is above this lab's maximum {node.max_delta:g}"
        if settings.noise_multiplier < node.min_noise_multiplier:
            return (f"lab policy: noise-multiplier {settings.noise_multiplier:g} is below this lab's minimum "
                    f"{node.min_noise_multiplier:g}")  # fmt: skip
        if settings.dp_noise == "distributed" and settings.noise_labs > node.max_noise_split:
            return (f"lab policy: distributed noise split over {settings.noise_labs} labs; this lab accepts at most "
                    f"{node.max_noise_split}")  # fmt: skip
    elif settings.batch_size < node.min_clear_batch_size:
        return (f"lab policy: batch-size {settings.batch_size} without DP-SGD noise (dp-mode {settings.dp_mode}) is "
                f"below this lab's minimum {node.min_clear_batch_size}")  # fmt: skip
    for key, asked, limit in (("crop-size", settings.crop_size, node.max_crop_size),
                              ("batch-size", settings.batch_size, node.max_batch_size),
                              ("max-steps", settings.max_steps, node.max_steps_per_round)):
        if asked > limit:
            return f"lab policy: {key} {asked} is above this lab's limit {limit}"
    crops = settings.batch_size * settings.augmentation_multiplicity  # what one step pushes through the model
    if settings.augmentation_multiplicity > 1 and crops > node.max_batch_size:
        return (f"lab policy: batch-size {settings.batch_size} x augmentation-multiplicity "
                f"{settings.augmentation_multiplicity} = {crops} crops per step is above this lab's limit "
                f"{node.max_batch_size}")  # fmt: skip
    if settings.max_steps == 0 and settings.local_epochs > node.max_local_epochs:
        return f"lab policy: local-epochs {settings.local_epochs} is above this lab's limit {node.max_local_epochs}"
    if settings.model_depth > 8 or settings.model_base_width > 4096:
        return f"lab policy: model depth {settings.model_depth} / width {settings.model_base_width} is out of range"
    if (parameters := model_parameters(settings)) > node.max_model_parameters:
        return f"lab policy: the model has {parameters:,} parameters, above this lab's limit {node.max_model_parameters:,}"
    return None


def delta_refusal(delta: float, n_samples: int) -> str | None:
    """Why ``delta`` is too weak for a dataset of ``n_samples`` (delta must be below 1/n), or None."""
    if n_samples > 0 and not delta < 1.0 / n_samples:
        return f"lab policy: delta {delta:g} is not below 1/{n_samples} (the lab's number of training samples)"
    if not (math.isfinite(delta) and delta > 0):
        return f"lab policy: delta {delta!r} is not a positive number"
    return None


def describe_policy(node: NodeSettings) -> str:
    """One line stating the lab's privacy policy (CLI and Federation widget)."""
    budget = "unlimited" if not node.max_epsilon else f"{node.max_epsilon:g}"
    return (
        f"epsilon budget {budget} at delta <= {node.max_delta:g}; DP modes {node.accept_dp_modes}; "
        f"noise multiplier >= {node.min_noise_multiplier:g}; model <= {node.max_model_parameters:,} "
        f"parameters; <= {node.max_steps_per_round} steps per round"
    )
