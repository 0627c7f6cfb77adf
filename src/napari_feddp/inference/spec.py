"""What the engine needs to know about a model, independent of how it was built."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InferenceError

#: Weight of a contour model's contour class in the decision rule. Contours are thin
#: and their probability is split with the neighbouring classes, so a plain arg max
#: misses many and merges touching nuclei; 2.5 was chosen on a held-out training
#: hospital (docs/results.md, "Model type on the held-out hospital").
CONTOUR_WEIGHT = 2.5


@dataclass(frozen=True)
class InferenceSpec:
    """How to feed a segmentation model and read its output.

    Parameters
    ----------
    tile_size : int
        Side of the square tiles the model sees, in pixels at its resolution.
    mpp : float or None
        Micrometres per pixel the model was trained at. ``None`` means "the
        image's own resolution": level 0 is used as it is, never resampled.
    mean, std : tuple of 3 floats
        Per-channel normalisation of RGB scaled to ``[0, 1]``:
        ``x = (rgb / 255 - mean) / std``.
    n_classes : int or None
        Channels of the model output. ``None``: taken from the first batch.
        One channel means a sigmoid (binary) model; more means softmax.
    class_names : tuple of str or None
        Names of the classes, index 0 first (stored with the result).
    size_multiple : int
        ``tile_size`` must be a multiple of this (e.g. 8 for a U-Net with three
        poolings). Models exposing a ``size_multiple`` attribute are checked too.
    class_weights : tuple of float or None
        Decision rule: each class's blended probability is multiplied by its
        weight before the arg max (None: plain arg max). Contour models get
        :data:`CONTOUR_WEIGHT` for their contour class from :meth:`from_card`.
    """

    tile_size: int = 512
    mpp: float | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    n_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    size_multiple: int = 1
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_positive_int("tile_size", self.tile_size)
        _check_positive_int("size_multiple", self.size_multiple)
        if self.tile_size % self.size_multiple:
            raise InferenceError(
                f"InferenceSpec tile_size: expected a multiple of size_multiple="
                f"{self.size_multiple}, received {self.tile_size}"
            )
        if self.mpp is not None and not (_is_number(self.mpp) and self.mpp > 0 and math.isfinite(self.mpp)):
            raise InferenceError(f"InferenceSpec mpp: expected a positive number or None, received {self.mpp!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(tuple(value)) != 3 or not all(_is_number(v) and math.isfinite(v) for v in value):
                raise InferenceError(f"InferenceSpec {name}: expected 3 finite numbers (R, G, B), received {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(v <= 0 for v in self.std):
            raise InferenceError(f"InferenceSpec std: expected 3 positive numbers, received {self.std!r}")
        if self.n_classes is not None:
            _check_positive_int("n_classes", self.n_classes)
        if self.class_names is not None:
            names = tuple(str(n) for n in self.class_names)
            if self.n_classes is not None and len(names) != max(self.n_classes, 2):
                raise InferenceError(
                    f"InferenceSpec class_names: expected {max(self.n_classes, 2)} names for "
                    f"n_classes={self.n_classes}, received {len(names)}: {names}"
                )
            object.__setattr__(self, "class_names", names)
        if self.class_weights is not None:
            weights = tuple(self.class_weights)
            if (not all(_is_number(w) and w > 0 and math.isfinite(w) for w in weights)
                    or (self.n_classes is not None and len(weights) != max(self.n_classes, 2))):
                raise InferenceError(
                    f"InferenceSpec class_weights: expected one positive number per class "
                    f"(n_classes={self.n_classes}), received {self.class_weights!r}"
                )
            object.__setattr__(self, "class_weights", tuple(float(w) for w in weights))

    @classmethod
    def from_card(cls, card: Any) -> InferenceSpec:
        """Build a spec from a :class:`napari_feddp.models.ModelCard` or its dict layout
        (``input.mpp``, ``input.tile_size``, ``input.normalization.mean/std``, ``classes``).

        Means and stds given on the 0-255 scale are rescaled to 0-1.
        """

        def get(obj: Any, name: str) -> Any:
            return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)

        section = get(card, "input") or {}
        norm = get(section, "normalization") or {}
        mean, std = tuple(get(norm, "mean") or (0.0, 0.0, 0.0)), tuple(get(norm, "std") or (1.0, 1.0, 1.0))
        if max(*mean, *std) > 1.5:  # given for 0-255 pixel values
            mean, std = tuple(m / 255.0 for m in mean), tuple(v / 255.0 for v in std)
        names = tuple(c if isinstance(c, str) else get(c, "name") for c in get(card, "classes") or ()) or None
        tile = get(section, "tile_size")
        return cls(
            tile_size=int(tile) if tile is not None else 512,
            mpp=get(section, "mpp"),
            mean=mean,
            std=std,
            n_classes=len(names) if names else None,
            class_names=names,
            class_weights=tuple(CONTOUR_WEIGHT if n == "contour" else 1.0 for n in names)
            if names and "contour" in names else None,
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InferenceError(f"InferenceSpec {name}: expected a positive integer, received {value!r}")
