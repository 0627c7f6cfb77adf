"""Where models come from: a file the user picks, the federation's latest, or the bundled default.

The lab's local model store (``$FEDDP_HOME/models``, default
``~/.local/share/napari-feddp/models``) receives the federation's global model
after each run; the Segment widget and ``napari-feddp segment`` use the newest
one by default, then the model bundled with the package. A global model that
fails the lab's own check (:mod:`napari_feddp.federation.promotion`) is kept
under ``<store>/refused/`` instead, where it is never a default.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from .checkpoint import CheckpointError, checkpoint_paths, read_card

#: Stem of the checkpoint shipped inside the package (data/models/<stem>.safetensors).
BUNDLED_STEM = "feddp-nuclei"
#: Sub-folder of a model store holding refused global models (kept for inspection only).
REFUSED_FOLDER = "refused"


class NoModelError(CheckpointError):
    """No model was given and none is bundled or received from a federation."""


def feddp_home() -> Path:
    """Per-user data folder (``$FEDDP_HOME``, else ``$XDG_DATA_HOME/napari-feddp``)."""
    if os.environ.get("FEDDP_HOME"):
        return Path(os.environ["FEDDP_HOME"]).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "napari-feddp"


def model_store() -> Path:
    """Folder holding the global models received from federations."""
    return feddp_home() / "models"


def bundled_checkpoint() -> Path | None:
    """The default model shipped with the package, if this version has one."""
    weights = Path(str(files("napari_feddp") / "data" / "models" / f"{BUNDLED_STEM}.safetensors"))
    return weights if weights.is_file() and weights.with_suffix(".json").is_file() else None


def latest_federated_checkpoint(store: Path | None = None) -> Path | None:
    """Newest complete checkpoint (weights + card) in the local model store.

    Only the store's own folder is searched, so models kept under
    ``<store>/refused/`` (see :data:`REFUSED_FOLDER`) never become the default.
    """
    store = store or model_store()
    if not store.is_dir():
        return None
    complete = [p for p in store.glob("*.safetensors") if p.with_suffix(".json").is_file()]
    return max(complete, key=lambda p: p.stat().st_mtime, default=None)


def resolve_checkpoint(choice: str | os.PathLike | None = None) -> Path:
    """Path of the checkpoint to use.

    Parameters
    ----------
    choice : path, ``"latest"``, ``"bundled"`` or None
        A checkpoint file (either half of the pair); ``"latest"`` for the
        federation's newest model; ``"bundled"`` for the packaged default;
        None for the first of latest, bundled.

    Raises
    ------
    NoModelError
        When nothing suitable exists, with what to do about it.
    CheckpointError
        When ``choice`` names a file whose other half (card or weights) is missing.
    """
    if choice not in (None, "latest", "bundled", "default"):
        weights, card = checkpoint_paths(choice)
        read_card(card)  # fails early, naming the file, if the card is missing or invalid
        if not weights.is_file():
            raise CheckpointError(f"model weights not found: {weights} (next to card {card.name})")
        return weights
    if choice in (None, "latest"):
        latest = latest_federated_checkpoint()
        if latest is not None:
            return latest
        if choice == "latest":
            raise NoModelError(f"no federated model received yet (looked in {model_store()})")
    bundled = bundled_checkpoint()
    if bundled is not None:
        return bundled
    raise NoModelError(
        "no model is bundled with this version of napari-feddp and no federated model has been "
        f"received (looked in {model_store()}); pass a checkpoint with --model CKPT.safetensors"
    )
