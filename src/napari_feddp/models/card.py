"""Model card: everything needed to rebuild, run and judge a checkpoint.

A card travels next to the weights as ``<stem>.json``. It says which
architecture to build, which classes the output channels mean and how to draw
them, which pixel size and normalisation the model expects, and where the
weights came from (federated rounds, differential-privacy budget).

The card classes are pydantic dataclasses: constructing one validates it, and
:meth:`ModelCard.from_dict` / :meth:`ModelCard.from_json` (the ways untrusted
cards are read) raise :class:`ModelCardError` naming the field, what was
expected and what was found.

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
import re
from collections.abc import Callable, Mapping
from dataclasses import field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

CARD_FORMAT_VERSION = 1
DP_MODES = ("sample", "update", "none")

# Unknown keys are refused and no scalar is coerced: "256" is not a tile size, true is not 1.
_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
# Required when reading a card, though the constructor fills them in.
_REQUIRED_ON_DISK = ("format_version", "created")


class ModelCardError(ValueError):
    """A model card is malformed or inconsistent; the message names the field."""


class _Invalid(ValueError):
    """A failed card check: what was expected and received, at ``where`` below the checked value."""

    def __init__(self, expected: str, received: Any, where: tuple[str | int, ...] = ()) -> None:
        super().__init__(expected)
        self.expected, self.received, self.where = expected, received, where


def _check(predicate: Callable[[Any], bool], expected: str, convert: Callable[[Any], Any] = lambda v: v):
    def validate(value: Any) -> Any:
        if not predicate(value):
            raise _Invalid(expected, value)
        return convert(value)

    return AfterValidator(validate)


def _is_timestamp(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _json_serialisable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _unique_names(classes: list[ClassInfo]) -> list[ClassInfo]:
    names = [info.name for info in classes]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise _Invalid("a name not used by another class", name, (index, "name"))
    return classes


_Str = Annotated[str, Field(strict=True)]
_Int = Annotated[int, Field(strict=True)]
_Finite = Annotated[float, Field(strict=True)]  # ints are numbers too; bools and strings are not
_Text = Annotated[_Str, _check(str.strip, "a non-empty string")]
_Positive = Annotated[_Finite, Field(gt=0)]
_Sha256 = Annotated[_Str, _check(re.compile(r"[0-9a-fA-F]{64}").fullmatch, "null or 64 hexadecimal characters",
                                  str.lower)]
_Null = BeforeValidator(lambda value: {} if value is None else value)  # JSON null: the default


@dataclass(config=_CONFIG)
class ClassInfo:
    """One output class: its display name and colour as ``#rrggbb``."""

    name: _Text
    color: Annotated[_Str, _check(re.compile(r"#[0-9a-fA-F]{6}").fullmatch, "a colour written '#rrggbb'", str.lower)]


@dataclass(config=_CONFIG)
class Normalization:
    """Per-channel RGB mean and std, for pixels scaled to [0, 1]."""

    mean: Annotated[tuple[_Finite, ...], Field(min_length=3, max_length=3)]
    std: Annotated[tuple[_Positive, ...], Field(min_length=3, max_length=3)]


@dataclass(config=_CONFIG)
class InputSpec:
    """What the model expects: µm per pixel (slides are resampled to it), square tile edge in
    pixels, and the normalisation applied after scaling pixels to [0, 1]."""

    mpp: _Positive
    tile_size: Annotated[_Int, Field(ge=1)]
    normalization: Normalization


@dataclass(config=_CONFIG)
class Privacy:
    """Differential-privacy guarantee of the weights.

    ``dp_mode`` is ``"sample"`` (DP-SGD, per-sample clipping), ``"update"`` (client-level DP on
    federated updates) or ``"none"`` (then ``epsilon`` and ``delta`` must be None; with a DP
    mode they are None until the budget is accounted).
    """

    epsilon: _Positive | None = None
    delta: Annotated[_Finite, Field(ge=0, lt=1)] | None = None
    dp_mode: Literal["sample", "update", "none"] = "none"

    @model_validator(mode="after")
    def _no_claim_without_dp(self) -> Privacy:
        # A privacy budget next to dp_mode "none" would be a claim nobody can back.
        for name in ("epsilon", "delta"):
            if self.dp_mode == "none" and getattr(self, name) is not None:
                raise _Invalid("null when dp_mode is 'none'", getattr(self, name), (name,))
        return self


@dataclass(config=_CONFIG)
class Provenance:
    """Where the weights came from."""

    training_data: _Str = "unspecified"
    federated_rounds: Annotated[_Int, Field(ge=0)] = 0
    round: _Int | None = None
    privacy: Annotated[Privacy, _Null] = field(default_factory=Privacy)
    license_note: _Str = ""

    @model_validator(mode="after")
    def _round_within_rounds(self) -> Provenance:
        if self.round is not None and not 0 <= self.round <= self.federated_rounds:
            expected = f"null or an integer in [0, federated_rounds={self.federated_rounds}]"
            raise _Invalid(expected, self.round, ("round",))
        return self


@dataclass(config=_CONFIG)
class Architecture:
    """Registry name of the network and the keyword arguments that build it."""

    name: _Text
    params: Annotated[dict[_Str, Any], _check(_json_serialisable, "JSON-serialisable values")]


def now_iso() -> str:
    """The current UTC time as a card's ``created`` value."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(config=_CONFIG, kw_only=True)
class ModelCard:
    """Description of a segmentation model checkpoint, fields in the order of the JSON file.

    Nested fields accept their dataclass or the plain ``dict``/``list`` of the JSON layout.
    ``weights_sha256`` and ``tensors`` are filled by :func:`napari_feddp.models.save_checkpoint`.
    A bad field raises ``pydantic.ValidationError`` (a ``ValueError``); :meth:`from_dict` and
    :meth:`from_json` raise :class:`ModelCardError` instead.
    """

    format_version: Annotated[_Int, Field(ge=1), _check(
        lambda version: version <= CARD_FORMAT_VERSION,
        f"at most {CARD_FORMAT_VERSION} (the newest this napari-feddp reads; the card was written by a newer version)",
    )] = CARD_FORMAT_VERSION
    name: _Text
    description: _Str = ""
    architecture: Architecture
    classes: Annotated[list[ClassInfo], Field(min_length=2), AfterValidator(_unique_names)]
    input: InputSpec
    provenance: Annotated[Provenance, _Null] = field(default_factory=Provenance)
    metrics: dict[_Str, _Finite] = field(default_factory=dict)
    created: Annotated[_Str, _check(_is_timestamp, "an ISO 8601 timestamp such as '2025-01-31T12:00:00+00:00'")] = \
        field(default_factory=now_iso)
    weights_sha256: _Sha256 | None = None
    tensors: dict[_Str, list[Annotated[_Int, Field(ge=0)]]] = field(default_factory=dict)

    @model_validator(mode="after")
    def _describes_its_network(self) -> ModelCard:
        """The card must describe the network it claims to."""
        n_classes = self.architecture.params.get("n_classes")
        if isinstance(n_classes, bool) or n_classes != len(self.classes):
            names = ", ".join(info.name for info in self.classes)
            raise _Invalid(f"{len(self.classes)} to match the {len(self.classes)} entries of 'classes' ({names})",
                           n_classes, ("architecture", "params", "n_classes"))
        in_channels = self.architecture.params.get("in_channels", 3)
        if isinstance(in_channels, bool) or in_channels != len(self.input.normalization.mean):
            raise _Invalid(f"{len(self.input.normalization.mean)} to match input.normalization.mean", in_channels,
                           ("architecture", "params", "in_channels"))
        return self

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
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Build a card from the JSON layout, validating every field.

        Raises
        ------
        ModelCardError
            Naming the bad field, what was expected and what was received.
        """
        if isinstance(data, Mapping):
            for key in _REQUIRED_ON_DISK:
                if key not in data:
                    raise ModelCardError(f"model card field '{key}': expected a value, {_received(_MISSING)}")
        try:
            return _ADAPTER.validate_python(data)
        except ValidationError as exc:
            raise ModelCardError(_describe(exc.errors()[0])) from None

    def to_json(self, indent: int | None = 2) -> str:
        """Serialise to JSON text (re-validated, so later in-place edits are checked)."""
        as_dict = self.to_dict()
        ModelCard.from_dict(as_dict)
        return json.dumps(as_dict, indent=indent, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        """Parse JSON text written by :meth:`to_json`.

        Raises
        ------
        ModelCardError
            If the text is not JSON or the card it holds is invalid.
        """
        if len(text) > MAX_CARD_BYTES:
            raise ModelCardError(f"model card is {len(text):,} bytes; a card is at most {MAX_CARD_BYTES:,}")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelCardError(f"model card is not valid JSON: {exc}") from exc
        except RecursionError:
            raise ModelCardError("model card is not a card: its JSON is nested too deeply") from None
        return cls.from_dict(data)


_ADAPTER = TypeAdapter(ModelCard)
#: A card is a few kilobytes; anything far larger is not one.
MAX_CARD_BYTES = 1 << 20
_MISSING = object()


def _received(value: Any) -> str:
    if value is _MISSING:
        return "received nothing (the field is missing)"
    text = repr(value)
    return f"received {text if len(text) <= 80 else text[:77] + '...'} ({type(value).__name__})"


def _describe(error: Mapping[str, Any]) -> str:
    """One pydantic error as 'model card field <path>: expected ..., received ...'."""
    cause = error.get("ctx", {}).get("error")
    location = error["loc"] + (cause.where if isinstance(cause, _Invalid) else ())
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
    where = f"model card field '{path or '<top level>'}'"
    if isinstance(cause, _Invalid):
        return f"{where}: expected {cause.expected}, {_received(cause.received)}"
    if error["type"] == "missing":
        return f"{where}: expected a value, {_received(_MISSING)}"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{where}: unknown key, not part of the model card format"
    return f"{where}: {error['msg']}, {_received(error['input'])}"
