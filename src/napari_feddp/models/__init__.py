"""Segmentation networks, model cards and safe checkpoints (no Qt).

* :class:`UNet` - GroupNorm U-Net that Opacus can train with differential privacy.
* :class:`ModelCard` - JSON description of a checkpoint (architecture, classes,
  expected pixel size and normalisation, provenance, privacy budget).
* :func:`save_checkpoint` / :func:`load_checkpoint` - ``<stem>.safetensors`` +
  ``<stem>.json``, hash-checked, never unpickled.
"""

from .build import ARCHITECTURES, CONTOUR_CLASSES, build_model, default_card, register_architecture
from .card import (
    CARD_FORMAT_VERSION,
    DP_MODES,
    Architecture,
    ClassInfo,
    InputSpec,
    ModelCard,
    ModelCardError,
    Normalization,
    Privacy,
    Provenance,
)
from .checkpoint import (
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    read_card,
    save_checkpoint,
)
from .unet import UNet

__all__ = [
    "ARCHITECTURES",
    "CONTOUR_CLASSES",
    "CARD_FORMAT_VERSION",
    "DP_MODES",
    "Architecture",
    "CheckpointError",
    "ClassInfo",
    "InputSpec",
    "ModelCard",
    "ModelCardError",
    "Normalization",
    "Privacy",
    "Provenance",
    "UNet",
    "build_model",
    "checkpoint_paths",
    "default_card",
    "load_checkpoint",
    "read_card",
    "register_architecture",
    "save_checkpoint",
]
