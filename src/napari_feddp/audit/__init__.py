"""Privacy audits of what a lab sends to the federation server (no Qt).

* :mod:`~napari_feddp.audit.gradient_inversion` - gradient-inversion attack
  (Geiping et al., cosine gradient matching + total-variation prior) against
  one client update, with and without DP-SGD, and PSNR/SSIM scoring.
"""

from .gradient_inversion import (
    AttackConfig,
    AttackResult,
    FixedCrops,
    Score,
    attack_objective,
    client_update,
    cosine_distance,
    invert_gradients,
    noise_images,
    normalize,
    score_reconstructions,
    total_variation,
)

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
