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
        Side, in pixels at the model's resolution, of the square tiles the model sees.
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
        """Build a spec from a :class:`napari_feddp.models.ModelCard` (or its dict layout).

        Reads ``input.mpp``, ``input.tile_size``, ``input.normalization.mean/std``
        and the class names; the same keys at the top level are accepted too.
        Means and stds given on the 0-255 scale are rescaled to 0-1.
        """
        top = _getter(card)
        section = top("input")
        inner = _getter(section) if section is not None else top
        norm = inner("normalization", "normalisation") or top("normalization", "normalisation")
        norm_get = _getter(norm) if norm is not None else top
        mean = norm_get("mean")
        std = norm_get("std")
        mean = tuple(mean) if mean is not None else (0.0, 0.0, 0.0)
        std = tuple(std) if std is not None else (1.0, 1.0, 1.0)
        if max(max(mean), max(std)) > 1.5:  # given for 0-255 pixel values
            mean = tuple(m / 255.0 for m in mean)
            std = tuple(v / 255.0 for v in std)
        names = top("class_names")
        if names is None and top("classes") is not None:
            names = [c if isinstance(c, str) else _getter(c)("name") for c in top("classes")]
        tile = inner("tile_size") or top("tile_size")
        weights = None
        if names and "contour" in names:
            weights = tuple(CONTOUR_WEIGHT if name == "contour" else 1.0 for name in names)
        return cls(
            tile_size=int(tile) if tile is not None else 512,
            mpp=inner("mpp") or top("mpp"),
            mean=mean,
            std=std,
            n_classes=len(names) if names else None,
            class_names=tuple(names) if names else None,
            class_weights=weights,
        )


def _getter(obj: Any):
    def get(*names: str) -> Any:
        for name in names:
            if isinstance(obj, dict):
                if obj.get(name) is not None:
                    return obj[name]
            elif getattr(obj, name, None) is not None:
                return getattr(obj, name)
        return None

    return get


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InferenceError(f"InferenceSpec {name}: expected a positive integer, received {value!r}")
