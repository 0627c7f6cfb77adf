"""Turn a model card into a network, and the default card for nuclei segmentation."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .card import CARD_FORMAT_VERSION, ClassInfo, ModelCard, ModelCardError, now_iso
from .unet import UNet

# Registry name -> factory taking the card's architecture.params as kwargs.
# Checkpoints store only this name, so a renamed entry breaks old checkpoints.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"unet": UNet}

# ImageNet statistics: a neutral default until a model is trained on its own
# H&E statistics; the card records whatever a trained model actually used.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NUCLEI_CLASSES = (
    ClassInfo(name="background", color="#000000"),
    # Green stands out against the pink and purple of H&E stain.
    ClassInfo(name="nucleus", color="#00ff7f"),
)

#: Classes of a model that separates touching nuclei: each nucleus's one-pixel
#: outline is its own class, so the interiors of touching nuclei never touch
#: (see :func:`napari_feddp.inference.instances.nuclei_from_contours`).
CONTOUR_CLASSES = NUCLEI_CLASSES + (ClassInfo(name="contour", color="#ff00ff"),)


#: Largest network a card may describe (HoVer-Net has about 38 million parameters). Counted on
#: PyTorch's meta device, so a card that asks for more is refused before any memory is allocated.
MAX_PARAMETERS = 50_000_000


def register_architecture(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``factory`` buildable from cards whose ``architecture.name`` is ``name``.

    Raises
    ------
    ValueError
        If ``name`` is already registered to a different factory.
    """
    existing = ARCHITECTURES.get(name)
    if existing is not None and existing is not factory:
        raise ValueError(f"architecture {name!r} is already registered to {existing!r}")
    ARCHITECTURES[name] = factory


def build_model(card: ModelCard) -> nn.Module:
    """The untrained network (train mode, CPU) that ``card.architecture`` describes.

    Raises
    ------
    ModelCardError
        If the architecture is unknown, its params are rejected by the factory,
        it has more than :data:`MAX_PARAMETERS` parameters, or ``input.tile_size``
        is not a size the network accepts.
    """
    count = parameter_count(card)
    if count > MAX_PARAMETERS:
        raise ModelCardError(
            f"model card field 'architecture.params': {card.architecture.params!r} describes a network of "
            f"{count:,} parameters, more than the {MAX_PARAMETERS:,} a model may have"
        )
    model = _construct(card)
    _check_tile_size(model, card.input.tile_size)
    return model


def parameter_count(card: ModelCard) -> int:
    """Parameters of the network ``card`` describes, counted without allocating it (meta device)."""
    with torch.device("meta"):
        model = _construct(card)
    return int(sum(p.numel() for p in model.parameters()))


def _construct(card: ModelCard) -> nn.Module:
    factory = ARCHITECTURES.get(card.architecture.name)
    if factory is None:
        raise ModelCardError(
            f"model card field 'architecture.name': expected one of {sorted(ARCHITECTURES)}, "
            f"received {card.architecture.name!r}"
        )
    try:
        return factory(**card.architecture.params)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelCardError(
            f"model card field 'architecture.params': expected arguments accepted by "
            f"{card.architecture.name!r}, received {card.architecture.params!r} ({exc})"
        ) from exc


def _check_tile_size(model: nn.Module, tile_size: int) -> None:
    # Checked here rather than at the first forward pass, deep inside inference.
    multiple = getattr(model, "size_multiple", 1)
    if tile_size % multiple:
        raise ModelCardError(
            f"model card field 'input.tile_size': expected a multiple of {multiple} "
            f"(the input sizes this {type(model).__name__} accepts), received {tile_size}"
        )


def default_card(
    name: str = "he-nuclei-unet",
    *,
    mpp: float = 0.5,
    tile_size: int = 256,
    description: str = "U-Net for nuclei segmentation in H&E tiles (background / nucleus).",
    training_data: str = "unspecified",
    contours: bool | None = None,
    federated_rounds: int = 0,
    round: int | None = None,
    privacy: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    **unet_params: Any,
) -> ModelCard:
    """Card for a nuclei :class:`UNet` on H&E at 0.5 µm/px: the one place cards are made.

    Parameters
    ----------
    name, description, training_data : str
    mpp : float
        Microns per pixel the model expects (0.5 ≈ 20x objective).
    tile_size : int
        Square tile edge in pixels; must suit the UNet depth.
    contours : bool, optional
        Three classes (background, nucleus, contour: :data:`CONTOUR_CLASSES`), so
        touching nuclei are told apart, or two (background, nucleus). Default:
        three when ``n_classes=3`` is passed, else two.
    federated_rounds, round : int
        Provenance: rounds of the federated run, and the round of these weights.
    privacy : mapping, optional
        ``dp_mode``, ``epsilon``, ``delta`` (:class:`Privacy`); default no DP claim.
    metrics : mapping, optional
        Metric name -> finite number.
    **unet_params
        Overrides of :class:`UNet` arguments (``depth``, ``base_width``, ...).

    Returns
    -------
    ModelCard
        Valid card with ImageNet normalisation and no weights hash (filled by ``save_checkpoint``).

    Raises
    ------
    ModelCardError
        If ``unet_params`` holds an argument UNet does not have, or the
        resulting card is invalid (e.g. ``n_classes`` other than the classes' count).
    """
    if contours is None:
        contours = unet_params.get("n_classes") == len(CONTOUR_CLASSES)
    classes = CONTOUR_CLASSES if contours else NUCLEI_CLASSES
    unet_params = {"n_classes": len(classes), **unet_params}
    try:
        bound = inspect.signature(UNet).bind(**unet_params)
    except TypeError as exc:
        raise ModelCardError(
            f"default_card unet_params: expected UNet arguments, received {sorted(unet_params)} ({exc})"
        ) from exc
    bound.apply_defaults()
    return ModelCard.from_dict({
        "format_version": CARD_FORMAT_VERSION, "name": name, "description": description,
        "architecture": {"name": "unet", "params": dict(bound.arguments)},
        "classes": [dataclasses.asdict(info) for info in classes],
        "input": {"mpp": mpp, "tile_size": tile_size, "normalization": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}},
        "provenance": {"training_data": training_data, "federated_rounds": federated_rounds, "round": round,
                       "privacy": dict(privacy or {})},
        "metrics": dict(metrics or {}), "created": now_iso(),
    })
