"""Privacy audits of what a lab sends to the federation server (no Qt).

* :mod:`~napari_feddp.audit.gradient_inversion` - gradient-inversion attack
  (Geiping et al., cosine gradient matching + total-variation prior) against
  one client update, with and without DP-SGD, and PSNR/SSIM scoring.
"""

from . import gradient_inversion
from .gradient_inversion import *  # noqa: F403 - the public API is gradient_inversion.__all__

__all__ = list(gradient_inversion.__all__)
