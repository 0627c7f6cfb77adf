"""Model card: everything needed to rebuild, run and judge a checkpoint.

A card travels next to the weights as ``<stem>.json``. It says which
architecture to build, which classes the output channels mean and how to draw
them, which pixel size and normalisation the model expects, and where the
weights came from (federated rounds, differential-privacy budget).

Every way of making a card (constructor, :meth:`ModelCard.from_dict`,
:meth:`ModelCard.from_json`) validates it; a bad card raises
:class:`ModelCardError` naming the field, what was expected and what was found.

JSON layout (format_version 1)::

    {
      "format_version": 1,
      "name": "he-nuclei-unet",
      "description": "...",
      "architecture": {"name": "unet", "params": {"n_classes": 2, ...}},
      "classes": [{"name": "background", "color": "#000000"}, ...],
      "input": {"mpp": 0.5, "tile_size": 256,
                "normalization": {"mean": [r, g, b], "std": [r, g, b]}},
      "provenance": {"training_data": "...", "federated_rounds": 10, "round": 10,
                     "privacy": {"epsilon": 8.0, "delta": 1e-5, "dp_mode": "sample"},
                     "license_note": "..."},
      "metrics": {"dice": 0.81},
      "created": "2025-01-31T12:00:00+00:00",
      "weights_sha256": "<hex digest of the .safetensors bytes>",
      "tensors": {"head.weight": [2, 16, 1, 1], ...}
    }

``normalization`` is applied to RGB values scaled to [0, 1]:
``(pixel / 255 - mean) / std``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, NoReturn

CARD_FORMAT_VERSION = 1
DP_MODES = ("sample", "update", "none")

_COLOR_PATTERN = re.compile(r"#[0-9a-fA-F]{6}")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_MISSING = object()
# Human-first order for the JSON file: identity, then what to build, then bookkeeping.
_JSON_KEY_ORDER = (
    "format_version", "name", "description", "architecture", "classes", "input",
    "provenance", "metrics", "created", "weights_sha256", "tensors",
)


class ModelCardError(ValueError):
    """A model card is malformed or inconsistent; the message names the field."""


@dataclass
class ClassInfo:
    """One output class: its display name and colour as ``#rrggbb``."""

    name: str
    color: str


@dataclass
class Normalization:
    """Per-channel RGB mean and std, for pixels scaled to [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class InputSpec:
    """What the model expects to be fed.

    Attributes
    ----------
    mpp : float
        Microns per pixel the model was trained at; slides must be resampled to it.
    tile_size : int
        Edge length in pixels of the square tiles used for training and inference.
    normalization : Normalization
        Per-channel mean and std applied after scaling pixels to [0, 1].
    """

    mpp: float
    tile_size: int
    normalization: Normalization


@dataclass
class Privacy:
    """Differential-privacy guarantee of the weights.

    ``dp_mode`` is ``"sample"`` (DP-SGD, per-sample clipping), ``"update"``
    (client-level DP on federated updates) or ``"none"``. ``epsilon``/``delta``
    may be ``None`` with a DP mode when the budget has not been accounted yet,
    and must be ``None`` when ``dp_mode == "none"``.
    """

    epsilon: float | None = None
    delta: float | None = None
    dp_mode: str = "none"


@dataclass
class Provenance:
    """Where the weights came from."""

    training_data: str = "unspecified"
    federated_rounds: int = 0
    round: int | None = None
    privacy: Privacy = field(default_factory=Privacy)
    license_note: str = ""


@dataclass
class Architecture:
    """Registry name of the network and the keyword arguments that build it."""

    name: str
    params: dict[str, Any]


def _tuples_to_lists(value: Any) -> Any:
    # So that to_dict() equals json.loads(to_json()), not just serialises like it.
    if isinstance(value, dict):
        return {key: _tuples_to_lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tuples_to_lists(item) for item in value]
    return value


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ModelCard:
    """Description of a segmentation model checkpoint.

    Nested fields accept either their dataclass or the equivalent plain
    ``dict``/``list`` (as in the JSON layout); both are validated and stored as
    dataclasses. ``weights_sha256`` and ``tensors`` are filled by
    :func:`napari_feddp.models.save_checkpoint`.

    Raises
    ------
    ModelCardError
        If any field is missing, of the wrong type, out of range, or
        inconsistent with another field (e.g. number of classes versus the
        architecture's ``n_classes``).
    """

    name: str
    architecture: Architecture
    classes: list[ClassInfo]
    input: InputSpec
    description: str = ""
    provenance: Provenance = field(default_factory=Provenance)
    metrics: dict[str, float] = field(default_factory=dict)
    created: str = field(default_factory=_now_iso)
    weights_sha256: str | None = None
    tensors: dict[str, list[int]] = field(default_factory=dict)
    format_version: int = CARD_FORMAT_VERSION

    def __post_init__(self) -> None:
        # Validate once here so that any ModelCard in memory is a valid one.
        for name, value in _parse_card(dataclasses.asdict(self)).items():
            setattr(self, name, value)

    @property
    def n_classes(self) -> int:
        """Number of output classes, background included."""
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """Class names in output-channel order; index 0 is background."""
        return [info.name for info in self.classes]

    @property
    def class_colors(self) -> list[str]:
        """Class colours ``#rrggbb`` in output-channel order."""
        return [info.color for info in self.classes]

    def to_dict(self) -> dict[str, Any]:
        """Return the card as plain JSON-compatible types, in the documented key order."""
        as_dict = _tuples_to_lists(dataclasses.asdict(self))
        return {key: as_dict[key] for key in _JSON_KEY_ORDER}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Build a card from the JSON layout, validating every field.

        Raises
        ------
        ModelCardError
            Naming the bad field, what was expected and what was received.
        """
        return cls(**_parse_card(data))

    def to_json(self, indent: int | None = 2) -> str:
        """Serialise to JSON text (re-validated, so later in-place edits are checked)."""
        as_dict = self.to_dict()
        _parse_card(as_dict)
        return json.dumps(as_dict, indent=indent, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        """Parse JSON text written by :meth:`to_json`.

        Raises
        ------
        ModelCardError
            If the text is not JSON or the card it holds is invalid.
        """
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelCardError(f"model card is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


# --- validation ------------------------------------------------------------
# Each parser takes the raw value and its dotted field path, and returns the
# normalised value or raises ModelCardError through _fail.


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "nothing (the field is missing)"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _fail(field_path: str, expected: str, received: Any) -> NoReturn:
    raise ModelCardError(
        f"model card field '{field_path}': expected {expected}, received {_describe(received)}"
    )


def _object(value: Any, field_path: str, allowed: set[str]) -> Mapping[str, Any]:
    """Check ``value`` is a mapping without keys outside ``allowed``.

    Missing keys are reported by the caller's parser, which knows what the
    value should have been.
    """
    if not isinstance(value, Mapping):
        _fail(field_path or "<top level>", "an object", value)
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        raise ModelCardError(
            f"model card field '{field_path or '<top level>'}': expected only the keys "
            f"[{', '.join(sorted(allowed))}], received unknown key(s) {unknown}"
        )
    return value


def _string(value: Any, field_path: str, *, non_empty: bool = False) -> str:
    if not isinstance(value, str) or (non_empty and not value.strip()):
        _fail(field_path, "a non-empty string" if non_empty else "a string", value)
    return value


def _integer(value: Any, field_path: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field_path, f"an integer >= {minimum}", value)
    return value


def _number(value: Any, field_path: str, expected: str, *, low: float, high: float = math.inf,
            low_inclusive: bool = True, high_inclusive: bool = False) -> float:
    """Return ``value`` as float if it is a finite real number in the given interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field_path, expected, value)
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (above and below):
        _fail(field_path, expected, value)
    return float(value)


def _optional_number(value: Any, field_path: str, expected: str, **bounds: Any) -> float | None:
    return None if value is None else _number(value, field_path, expected, **bounds)


def _get(data: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    return data.get(key, default)


def _parse_format_version(value: Any) -> int:
    version = _integer(value, "format_version", minimum=1)
    if version > CARD_FORMAT_VERSION:
        _fail(
            "format_version",
            f"at most {CARD_FORMAT_VERSION} (the newest this napari-feddp reads; "
            "the card was written by a newer version)",
            value,
        )
    return version


def _parse_architecture(value: Any) -> Architecture:
    data = _object(value, "architecture", {"name", "params"})
    name = _string(_get(data, "name"), "architecture.name", non_empty=True)
    params = _get(data, "params")
    if not isinstance(params, Mapping) or not all(isinstance(key, str) for key in params):
        _fail("architecture.params", "an object of keyword arguments", params)
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError):
        _fail("architecture.params", "JSON-serialisable values", params)
    return Architecture(name=name, params=dict(params))


def _parse_color(value: Any, field_path: str) -> str:
    if not isinstance(value, str) or not _COLOR_PATTERN.fullmatch(value):
        _fail(field_path, "a colour written '#rrggbb'", value)
    return value.lower()


def _parse_classes(value: Any) -> list[ClassInfo]:
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        _fail("classes", "a list of at least 2 classes (class 0 is background)", value)
    classes = []
    for index, entry in enumerate(value):
        path = f"classes[{index}]"
        data = _object(entry, path, {"name", "color"})
        name = _string(_get(data, "name"), f"{path}.name", non_empty=True)
        if name in (info.name for info in classes):
            _fail(f"{path}.name", "a name not used by another class", name)
        classes.append(ClassInfo(name=name, color=_parse_color(_get(data, "color"), f"{path}.color")))
    return classes


def _parse_triplet(value: Any, field_path: str, *, positive: bool) -> tuple[float, float, float]:
    expected = "a list of 3 " + ("positive numbers" if positive else "numbers") + " (R, G, B)"
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        _fail(field_path, expected, value)
    return tuple(  # type: ignore[return-value]
        _number(item, f"{field_path}[{index}]", expected, low=0.0 if positive else -math.inf,
                low_inclusive=not positive)
        for index, item in enumerate(value)
    )


def _parse_input(value: Any) -> InputSpec:
    data = _object(value, "input", {"mpp", "tile_size", "normalization"})
    mpp = _number(_get(data, "mpp"), "input.mpp", "a positive number of microns per pixel",
                  low=0.0, low_inclusive=False)
    tile_size = _integer(_get(data, "tile_size"), "input.tile_size", minimum=1)
    norm = _object(_get(data, "normalization"), "input.normalization", {"mean", "std"})
    normalization = Normalization(
        mean=_parse_triplet(_get(norm, "mean"), "input.normalization.mean", positive=False),
        std=_parse_triplet(_get(norm, "std"), "input.normalization.std", positive=True),
    )
    return InputSpec(mpp=mpp, tile_size=tile_size, normalization=normalization)


def _parse_privacy(value: Any) -> Privacy:
    data = _object(value, "provenance.privacy", {"dp_mode", "epsilon", "delta"})
    dp_mode = _get(data, "dp_mode")
    if dp_mode not in DP_MODES:
        _fail("provenance.privacy.dp_mode", f"one of {list(DP_MODES)}", dp_mode)
    epsilon = _optional_number(_get(data, "epsilon", None), "provenance.privacy.epsilon",
                               "null or a finite number > 0", low=0.0, low_inclusive=False)
    delta = _optional_number(_get(data, "delta", None), "provenance.privacy.delta",
                             "null or a number in [0, 1)", low=0.0, high=1.0)
    if dp_mode == "none":
        # A privacy budget next to dp_mode "none" would be a claim nobody can back.
        for name, number in (("epsilon", epsilon), ("delta", delta)):
            if number is not None:
                _fail(f"provenance.privacy.{name}", "null when dp_mode is 'none'", number)
    return Privacy(epsilon=epsilon, delta=delta, dp_mode=dp_mode)


def _parse_provenance(value: Any) -> Provenance:
    keys = {"training_data", "federated_rounds", "round", "privacy", "license_note"}
    data = _object(value, "provenance", keys)
    defaults = Provenance()
    rounds = _integer(_get(data, "federated_rounds", defaults.federated_rounds),
                      "provenance.federated_rounds", minimum=0)
    current_round = _get(data, "round", None)
    if current_round is not None and (
        isinstance(current_round, bool) or not isinstance(current_round, int)
        or not 0 <= current_round <= rounds
    ):
        _fail("provenance.round", f"null or an integer in [0, federated_rounds={rounds}]",
              current_round)
    privacy = _get(data, "privacy", None)
    return Provenance(
        training_data=_string(_get(data, "training_data", defaults.training_data),
                              "provenance.training_data"),
        federated_rounds=rounds,
        round=current_round,
        privacy=Privacy() if privacy is None else _parse_privacy(privacy),
        license_note=_string(_get(data, "license_note", defaults.license_note),
                             "provenance.license_note"),
    )


def _parse_metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        _fail("metrics", "an object mapping metric names to numbers", value)
    metrics = {}
    for name, number in value.items():
        if not isinstance(name, str):
            _fail("metrics", "string metric names", name)
        metrics[name] = _number(number, f"metrics.{name}", "a finite number", low=-math.inf)
    return metrics


def _parse_created(value: Any) -> str:
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value)
            return value
        except ValueError:
            pass
    _fail("created", "an ISO 8601 timestamp such as '2025-01-31T12:00:00+00:00'", value)


def _parse_sha256(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256_PATTERN.fullmatch(value.lower()):
        _fail("weights_sha256", "null or 64 hexadecimal characters", value)
    return value.lower()


def _parse_tensors(value: Any) -> dict[str, list[int]]:
    if not isinstance(value, Mapping):
        _fail("tensors", "an object mapping tensor names to shapes", value)
    tensors = {}
    for name, shape in value.items():
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
        ):
            _fail(f"tensors.{name}", "a list of non-negative integers (a shape)", shape)
        tensors[str(name)] = list(shape)
    return tensors


def _check_consistency(architecture: Architecture, classes: list[ClassInfo], input_spec: InputSpec) -> None:
    """Cross-field checks: the card must describe the network it claims to."""
    n_classes = architecture.params.get("n_classes", _MISSING)
    if n_classes != len(classes) or isinstance(n_classes, bool):
        _fail(
            "architecture.params.n_classes",
            f"{len(classes)} to match the {len(classes)} entries of 'classes' "
            f"({', '.join(info.name for info in classes)})",
            n_classes,
        )
    in_channels = architecture.params.get("in_channels", 3)
    n_norm = len(input_spec.normalization.mean)
    if in_channels != n_norm or isinstance(in_channels, bool):
        _fail("architecture.params.in_channels",
              f"{n_norm} to match input.normalization.mean", in_channels)


def _parse_card(data: Any) -> dict[str, Any]:
    """Validate the JSON layout and return ModelCard constructor arguments."""
    # Required: format_version, name, architecture, classes, input, created.
    data = _object(data, "", set(_JSON_KEY_ORDER))
    format_version = _parse_format_version(_get(data, "format_version"))
    architecture = _parse_architecture(_get(data, "architecture"))
    classes = _parse_classes(_get(data, "classes"))
    input_spec = _parse_input(_get(data, "input"))
    _check_consistency(architecture, classes, input_spec)
    provenance = _get(data, "provenance", None)
    return {
        "format_version": format_version,
        "name": _string(_get(data, "name"), "name", non_empty=True),
        "description": _string(_get(data, "description", ""), "description"),
        "architecture": architecture,
        "classes": classes,
        "input": input_spec,
        "provenance": Provenance() if provenance is None else _parse_provenance(provenance),
        "metrics": _parse_metrics(_get(data, "metrics", {})),
        "created": _parse_created(_get(data, "created")),
        "weights_sha256": _parse_sha256(_get(data, "weights_sha256", None)),
        "tensors": _parse_tensors(_get(data, "tensors", {})),
    }
