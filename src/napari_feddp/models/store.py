"""Where models come from: a file the user picks, the federation's latest, or the bundled default.

The lab's model store (``$FEDDP_HOME/models``) receives the federation's global model after each
run; the newest one is the default, then the model bundled with the package. A global model that
fails the lab's check (:mod:`napari_feddp.federation.promotion`) is kept under
``<store>/refused/``, where it is never a default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from importlib.resources import files
from pathlib import Path

import platformdirs

from .checkpoint import CheckpointError, checkpoint_paths, read_card

#: Stem of the checkpoint shipped inside the package (data/models/<stem>.safetensors).
BUNDLED_STEM = "feddp-nuclei"
#: Sub-folder of a model store holding refused global models (kept for inspection only).
REFUSED_FOLDER = "refused"


class NoModelError(CheckpointError):
    """No model was given and none is bundled or received from a federation."""


def feddp_home() -> Path:
    """Per-user data folder: ``$FEDDP_HOME``, else the platform's (``$XDG_DATA_HOME/napari-feddp`` on Linux)."""
    if os.environ.get("FEDDP_HOME"):
        return Path(os.environ["FEDDP_HOME"]).expanduser()
    return platformdirs.user_data_path("napari-feddp", appauthor=False)


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
    return next(iter(_received(store or model_store())), None)


def _received(store: Path) -> list[Path]:
    """Complete checkpoints (weights + card) in the store's own folder, newest first."""
    complete = [p for p in store.glob("*.safetensors") if p.with_suffix(".json").is_file()] if store.is_dir() else []
    return sorted(complete, key=lambda p: p.stat().st_mtime, reverse=True)


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
        When ``choice`` is a folder, names no existing file, or names a file
        whose other half (card or weights) is missing.
    """
    if choice not in (None, "latest", "bundled", "default"):
        if Path(choice).is_dir():
            raise CheckpointError(
                f"{choice} is a folder, not a model checkpoint: give a .safetensors file "
                "(with its .json model card next to it)"
            )
        weights, card = checkpoint_paths(choice)
        if not weights.exists() and not card.exists():
            # Neither half exists: the path is wrong, which says more than "card missing".
            looked = "" if Path(choice) == weights else f" (looked for {weights} and its card {card.name})"
            raise CheckpointError(f"model file not found: {choice}{looked}")
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


@dataclass(frozen=True)
class ModelInfo:
    """A model the user can choose, with what its card says about it.

    ``source`` is ``"received"`` (the lab's store), ``"bundled"`` or ``"file"``; ``name``,
    ``created``, ``epsilon``, ``delta``, ``dp_mode`` and ``metrics`` (``test_*``: held-out
    scores) come from the card, and ``problem`` says why the card cannot be read (the model
    then cannot be used).
    """

    path: Path
    source: str
    name: str | None = None
    created: str | None = None
    epsilon: float | None = None
    delta: float | None = None
    dp_mode: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    problem: str | None = None

    @property
    def date(self) -> str:
        """Creation date ``YYYY-MM-DD`` (empty when unknown)."""
        if not self.created:
            return ""
        try:
            return datetime.fromisoformat(self.created).date().isoformat()
        except ValueError:
            return self.created[:10]

    @property
    def privacy_text(self) -> str:
        """``"ε 7.92"``, ``"no DP"`` or ``"ε not accounted"``."""
        if self.dp_mode == "none":
            return "no DP"
        if self.epsilon is None:
            return "ε not accounted"
        return f"ε {self.epsilon:.3g}"

    @property
    def metrics_text(self) -> str:
        """Held-out test scores (``test_*`` keys), else the card's other metrics, else ''."""
        tests = {key[len("test_"):]: value for key, value in self.metrics.items() if key.startswith("test_")}
        shown, prefix = (tests, "test ") if tests else (self.metrics, "")
        return prefix + ", ".join(f"{key} {value:.3f}" for key, value in shown.items()) if shown else ""

    @property
    def title(self) -> str:
        """The file's stem, and the card's name when it differs."""
        stem = self.path.stem
        return stem if self.name in (None, stem) else f"{stem} ({self.name})"

    @property
    def description(self) -> str:
        """One line naming the model: file, card name, source, date, epsilon, test metrics."""
        if self.problem is not None:
            return f"{self.title} · {self.source} · unusable: {self.problem}"
        parts = [self.title, self.source, self.date, self.privacy_text, self.metrics_text]
        return " · ".join(part for part in parts if part)


def describe_model(path: str | os.PathLike, source: str | None = None) -> ModelInfo:
    """What a checkpoint's card says (``problem`` set instead of raising when it cannot be read).

    ``path`` is either half of the pair; ``source`` is worked out from its folder unless given.
    """
    weights, card_path = checkpoint_paths(path)
    if source is None:
        bundled = bundled_checkpoint()
        if bundled is not None and weights.resolve() == bundled.resolve():
            source = "bundled"
        elif weights.parent.resolve() == model_store().resolve():
            source = "received"
        else:
            source = "file"
    try:
        card = read_card(card_path)
    except CheckpointError as exc:
        return ModelInfo(path=weights, source=source, problem=str(exc))
    privacy = card.provenance.privacy
    return ModelInfo(
        path=weights, source=source, name=card.name, created=card.created,
        epsilon=privacy.epsilon, delta=privacy.delta, dp_mode=privacy.dp_mode,
        metrics=dict(card.metrics),
    )


def available_models(store: Path | None = None) -> list[ModelInfo]:
    """Every model a user can choose without browsing for a file.

    The complete checkpoints in the store's own folder (default :func:`model_store`), newest
    first, then the bundled model: the first entry is what :func:`resolve_checkpoint` picks when
    given nothing. Models under ``<store>/refused/`` are not listed.
    """
    models = [describe_model(path, "received") for path in _received(store or model_store())]
    bundled = bundled_checkpoint()
    if bundled is not None:
        models.append(describe_model(bundled, "bundled"))
    return models
