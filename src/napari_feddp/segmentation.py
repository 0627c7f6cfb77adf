"""Segment a slide with a checkpoint and export the result: the service behind the
Segment widget and ``napari-feddp segment`` (no Qt here)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import torch

from .inference import InferenceSpec, Progress, SegmentationResult, segment_slide
from .models import ModelCard, load_checkpoint
from .models.store import resolve_checkpoint


@dataclass
class LoadedModel:
    """A model ready for inference with what the engine and the viewer need."""

    model: torch.nn.Module
    card: ModelCard
    spec: InferenceSpec
    path: Path

    @property
    def class_colors(self) -> list[str]:
        return [c.color for c in self.card.classes]


def spec_from_card(card: ModelCard, model: torch.nn.Module | None = None) -> InferenceSpec:
    """Engine settings from a model card, checked against the model's size multiple."""
    spec = InferenceSpec.from_card(card)
    if model is not None and getattr(model, "size_multiple", 1) != spec.size_multiple:
        spec = dataclasses.replace(spec, size_multiple=int(model.size_multiple))
    return spec


def load_model(choice: str | os.PathLike | None = None, device: str = "cpu") -> LoadedModel:
    """Resolve ``choice`` (see :func:`~napari_feddp.models.store.resolve_checkpoint`) and load it."""
    path = resolve_checkpoint(choice)
    model, card = load_checkpoint(path, device=device)
    return LoadedModel(model=model, card=card, spec=spec_from_card(card, model), path=path)


def run_segmentation(
    image,
    loaded: LoadedModel,
    **engine_options,
) -> Generator[Progress, None, SegmentationResult]:
    """:func:`~napari_feddp.inference.segment_slide` with the loaded model's settings."""
    return segment_slide(image, loaded.model, loaded.spec, **engine_options)


def region_from_xywh(text: str) -> tuple[int, int, int, int]:
    """Parse ``"X,Y,W,H"`` (level-0 pixels) into the engine's ``(y0, x0, y1, x1)``."""
    try:
        x, y, w, h = (int(float(v)) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--region: expected X,Y,W,H as four numbers, received {text!r}") from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise ValueError(f"--region: expected X,Y >= 0 and W,H > 0, received {text!r}")
    return (y, x, y + h, x + w)
