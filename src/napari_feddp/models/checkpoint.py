"""Checkpoints: ``<stem>.safetensors`` (weights) next to ``<stem>.json`` (model card).

Weights are read only through ``safetensors.torch.load_file``, never through
``torch.load`` or pickle: a checkpoint downloaded from a federation partner is
untrusted data, and unpickling it would run arbitrary code.

The card records the SHA-256 of the weights file, so a card and weights that
drifted apart (one file replaced, copied from another run, or corrupted) are
detected at load time instead of silently producing wrong segmentations.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from .._atomic import write_atomic
from .build import build_model
from .card import MAX_CARD_BYTES, ModelCard, ModelCardError

WEIGHTS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"
_LISTED_NAMES = 5  # how many offending tensor names an error message shows
#: Largest weight magnitude a checkpoint may hold. Trained GroupNorm U-Nets stay within a few units
#: (the bundled model: 1.1); far larger values are corruption or forgery and overflow to NaN output.
MAX_ABS_WEIGHT = 1e4


class CheckpointError(ValueError):
    """A checkpoint cannot be saved or loaded; the message names the file and problem."""


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(weights_path, card_path)`` of a checkpoint named by either file or their common stem.

    ``run/model``, ``run/model.json`` and ``run/model.safetensors`` all give
    ``run/model.safetensors`` and ``run/model.json``; any other suffix is part of the stem
    (``model.v2`` -> ``model.v2.safetensors``).
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (WEIGHTS_SUFFIX, CARD_SUFFIX) else path
    return stem.with_name(stem.name + WEIGHTS_SUFFIX), stem.with_name(stem.name + CARD_SUFFIX)


# --- saving ----------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, card: ModelCard) -> Path:
    """Write ``model``'s weights and ``card`` as a checkpoint pair, each file atomically.

    Weights are written first: if the process dies between the two writes, the old card's
    hash no longer matches and loading fails loudly rather than mixing runs.

    Parameters
    ----------
    path : str or os.PathLike
        Checkpoint location, with ``.safetensors``, ``.json`` or no suffix; missing folders are created.
    model : torch.nn.Module
        Network matching ``card.architecture``; training wrappers (Opacus, ``DataParallel``,
        ``torch.compile``) are unwrapped.
    card : ModelCard
        Stored with ``weights_sha256`` and ``tensors`` (name -> shape) filled in; not modified.

    Returns
    -------
    pathlib.Path
        The written ``.safetensors`` file.

    Raises
    ------
    CheckpointError
        If the model does not match the card's architecture or a file cannot be written.
    """
    weights_path, card_path = checkpoint_paths(path)
    # clone(): safetensors refuses tensors that share storage with another tensor.
    state = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in _unwrap(model).state_dict().items()}
    _check_model_matches_card(state, card, weights_path)

    payload = safetensors.torch.save(state, metadata={"format": "pt"})
    stored_card = ModelCard.from_dict({
        **card.to_dict(),
        "weights_sha256": hashlib.sha256(payload).hexdigest(),
        "tensors": {name: list(tensor.shape) for name, tensor in state.items()},
    })
    try:
        write_atomic(weights_path, payload)
        write_atomic(card_path, stored_card.to_json())
    except OSError as exc:
        raise CheckpointError(f"{weights_path}: cannot write checkpoint file: {exc}") from exc
    return weights_path


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip training wrappers whose state_dict keys carry a prefix."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        else:
            # Opacus GradSampleModule keeps the network in ``_module``,
            # torch.compile's OptimizedModule in ``_orig_mod``.
            inner = getattr(model, "_module", None)
            if inner is None:
                inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _check_model_matches_card(state: Mapping[str, torch.Tensor], card: ModelCard, weights_path: Path) -> None:
    try:
        reference = build_model(card)
    except ModelCardError as exc:
        raise CheckpointError(f"{weights_path}: cannot save, the card is unusable: {exc}") from exc
    problem = _state_mismatch(_shapes(reference.state_dict()), _shapes(state))
    if problem:
        raise CheckpointError(
            f"{weights_path}: cannot save, the model does not match the card's architecture "
            f"{card.architecture.name!r} {card.architecture.params}: {problem}"
        )


# --- loading ---------------------------------------------------------------


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read and validate only the model card of a checkpoint (``path``: either half, or their stem).

    Raises
    ------
    CheckpointError
        If the card file is missing, unreadable, not JSON or not a valid card.
    """
    weights_path, card_path = checkpoint_paths(path)
    try:
        if card_path.stat().st_size > MAX_CARD_BYTES:
            raise CheckpointError(f"{card_path}: {card_path.stat().st_size:,} bytes is not a model card "
                                  f"(a card is at most {MAX_CARD_BYTES:,})")
        text = card_path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{card_path}: model card file is missing (expected next to {weights_path.name})"
        ) from exc
    except OSError as exc:
        raise CheckpointError(f"{card_path}: cannot read model card: {exc}") from exc
    try:
        return ModelCard.from_json(text)
    except ModelCardError as exc:
        raise CheckpointError(f"{card_path}: invalid model card: {exc}") from exc


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Load a checkpoint written by :func:`save_checkpoint`: the network is built from the card and
    the weights are read with ``safetensors`` only (no pickle, no code execution).

    Parameters
    ----------
    path : str or os.PathLike
        Checkpoint location, with ``.safetensors``, ``.json`` or no suffix.
    device : str or torch.device
        Where to put the model.

    Returns
    -------
    model : torch.nn.Module
        Network with the loaded weights, in eval mode, on ``device``.
    card : ModelCard
        The validated card.

    Raises
    ------
    CheckpointError
        If either file is missing, the card is invalid or describes a network larger than
        :data:`~napari_feddp.models.build.MAX_PARAMETERS`, the weights' SHA-256 differs from the
        card's, the file is corrupt, or its tensors do not match the architecture (names, shapes,
        dtypes) or are not finite.
    """
    weights_path, card_path = checkpoint_paths(path)
    card = read_card(card_path)
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: weights file is missing (the card {card_path.name} exists)")
    # Hash, then the architecture's size, before anything is built or read into memory.
    _verify_sha256(weights_path, card_path, card)
    try:
        model = build_model(card)
    except ModelCardError as exc:
        raise CheckpointError(f"{card_path}: cannot build the model: {exc}") from exc

    try:
        # Always to CPU first: a device error must not be reported as a corrupt file.
        state = safetensors.torch.load_file(weights_path, device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{weights_path}: not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    expected = model.state_dict()
    problem = _state_mismatch(_shapes(expected), _shapes(state)) or _wrong_values(expected, state)
    if problem:
        raise CheckpointError(
            f"{weights_path}: weights do not fit the architecture in {card_path.name} "
            f"({card.architecture.name!r}): {problem}"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), card


def _verify_sha256(weights_path: Path, card_path: Path, card: ModelCard) -> None:
    if card.weights_sha256 is None:
        raise CheckpointError(
            f"{card_path}: card has no weights_sha256, so {weights_path.name} cannot be "
            "verified; save the checkpoint with save_checkpoint"
        )
    found = file_sha256(weights_path).hex()
    if found != card.weights_sha256:
        raise CheckpointError(
            f"{weights_path}: card does not match weights: {card_path.name} expects "
            f"sha256 {card.weights_sha256}, the file has {found} (one of the two files "
            "was replaced or modified after saving)"
        )


def file_sha256(path: str | os.PathLike) -> bytes:
    """SHA-256 digest of a file's bytes, read in 1 MiB blocks (checkpoints, privacy-ledger tiles)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


# --- comparing tensor sets -------------------------------------------------


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_LISTED_NAMES])
    more = len(names) - _LISTED_NAMES
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def _wrong_values(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str | None:
    """Tensors of another dtype than the network's, or holding NaN or infinity; None if there are none."""
    dtypes = [f"'{name}' is {found[name].dtype}, expected {tensor.dtype}"
              for name, tensor in expected.items() if found[name].dtype != tensor.dtype]
    if dtypes:
        return f"{len(dtypes)} tensor(s) of another dtype: {'; '.join(dtypes[:_LISTED_NAMES])}"
    floating = {name: tensor for name, tensor in found.items() if tensor.is_floating_point()}
    not_finite = sorted(name for name, tensor in floating.items() if not bool(torch.isfinite(tensor).all()))
    if not_finite:
        return f"{len(not_finite)} tensor(s) hold NaN or infinite values {_listed(not_finite)}"
    too_large = sorted(name for name, tensor in floating.items() if float(tensor.abs().max()) > MAX_ABS_WEIGHT)
    if too_large:
        return f"{len(too_large)} tensor(s) hold values beyond ±{MAX_ABS_WEIGHT:g} {_listed(too_large)}"
    return None


def _state_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> str | None:
    """Describe how tensor names/shapes ``found`` differ from ``expected``, or None."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s) {_listed(unexpected)}")
    wrong_shapes = [name for name in expected if name in found and expected[name] != found[name]]
    for name in wrong_shapes[:_LISTED_NAMES]:
        problems.append(
            f"shape mismatch for '{name}': expected {list(expected[name])}, found {list(found[name])}"
        )
    if len(wrong_shapes) > _LISTED_NAMES:
        problems.append(f"... and {len(wrong_shapes) - _LISTED_NAMES} more shape mismatch(es)")
    return "; ".join(problems) or None
