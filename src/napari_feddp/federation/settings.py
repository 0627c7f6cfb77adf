"""Run settings (shared by ServerApp and ClientApps) and per-lab node settings: the one settings schema.

Flower passes two flat ``key -> bool | int | float | str`` dictionaries:

* the **run config** (``[tool.flwr.app.config]`` of the app's pyproject.toml,
  possibly overridden by ``flwr run --run-config``), identical for the
  ServerApp and every ClientApp of a run: :class:`RunSettings`;
* the **node config** of each SuperNode (``flower-supernode --node-config``),
  private to one lab: :class:`NodeSettings`.

Every setting is declared once, as a pydantic field with its default, bounds
and description. Keys use hyphens (Flower style, the fields' aliases);
attributes use underscores. From the fields come the run and node configs
(:meth:`RunSettings.to_run_config`, :meth:`NodeSettings.to_node_config`), the
training configuration of a lab's round (:meth:`RunSettings.train_config`) and
the command-line options (:func:`add_options`: a field's ``cli`` names its
flag, ``True`` for ``--<key>``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

if TYPE_CHECKING:
    from ..training import TrainConfig

DpMode = Literal["sample", "update", "none"]
DP_MODES = get_args(DpMode)


def _key(name: str) -> str:
    return name.replace("_", "-")


def _setting(default: Any, description: str, *, cli: str | bool = False, cli_default: Any = None,
             **bounds: Any) -> Any:
    """A field: its default, its bounds, the command-line flag it is given as (``cli``) and that flag's
    default when it differs (``cli_default``: what a coordinator typing the command wants)."""
    extra = {"cli": cli, "cli_default": default if cli_default is None else cli_default} if cli else None
    return Field(default, description=description, json_schema_extra=extra, **bounds)


class SettingsError(ValueError):
    """Invalid settings: one ``key: problem`` line per problem (``problems``: the ``(key, problem)`` pairs)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("\n".join(f"{key}: {problem}" if key else problem for key, problem in problems))
        self.problems = problems


class _FlatConfig(BaseModel):
    """Flat, frozen settings read from hyphenated ``key -> bool | int | float | str`` configs.

    Attributes or keys name the fields; unknown keys are ignored; numbers of
    the other kind are converted (Flower may hand ``3.0`` for ``3``), booleans
    are not numbers. Invalid values raise :class:`SettingsError` naming the key.
    """

    model_config = ConfigDict(frozen=True, alias_generator=_key, allow_inf_nan=False, coerce_numbers_to_str=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**{_key(name): value for name, value in values.items()})
        except ValidationError as exc:
            raise SettingsError([(".".join(map(str, e["loc"])), _problem(e)) for e in exc.errors()]) from None

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError("only on/off settings take a boolean")
        return value

    def replace(self, **changes: Any):
        """Copy with changed attributes (validated)."""
        return type(self)(**{**self.model_dump(), **changes})


def _problem(error: Mapping[str, Any]) -> str:
    message = error["msg"].removeprefix("Value error, ")
    return f"{message}, received {error['input']!r}" if error["loc"] else message


class RunSettings(_FlatConfig):
    """Settings of one federated run (see the fields' descriptions)."""

    num_rounds: int = _setting(2, "federated rounds", cli="--rounds", cli_default=10, ge=1)
    min_clients: int = _setting(2, "labs that must be connected before a round starts", cli=True, ge=1)
    min_updates: int = _setting(
        1, "valid updates needed to aggregate a round (else the model is kept and the round recorded as skipped)",
        cli=True, ge=1)
    fraction_train: float = _setting(1.0, "fraction of connected labs sampled per round (at least min-clients)",
                                     cli=True, gt=0, le=1)
    round_timeout: float = _setting(600.0, "seconds to wait for a round's replies (late labs are left out)",
                                    cli=True, cli_default=1800.0, gt=0)
    node_wait_timeout: float = _setting(300.0, "seconds to wait for min-clients labs before giving up",
                                        cli=True, cli_default=600.0, gt=0)
    final_evaluation: bool = _setting(True, "federated evaluation of the final model on every lab", cli=True)
    dp_mode: DpMode = _setting(
        "sample", "sample: DP-SGD in each lab (Opacus, per-sample clipping, each lab keeps its privacy ledger); "
        "update: client-level DP (each lab clips its update, the server adds Gaussian noise to the mean); "
        "none: no DP (testing only)", cli=True)
    noise_multiplier: float = _setting(1.0, "DP-SGD noise multiplier (sample mode)", cli=True, ge=0)
    max_grad_norm: float = _setting(1.0, "DP-SGD per-sample clipping norm (sample mode)", cli=True, gt=0)
    dp_noise: Literal["local", "distributed"] = _setting(
        "local", "sample mode: local: each lab adds the full DP-SGD noise to its own update; distributed: one "
        "DP-SGD step per round (max-steps 1), each lab adds its share of the noise, secure aggregation sums the "
        "shares and the server applies the step", cli=True)
    noise_split: int = _setting(
        0, "distributed noise: labs the noise is split over, each adding noise-multiplier / sqrt(this); the "
        "epsilon labs record assumes at least this many honest labs in every sum (0: min-clients)", cli=True, ge=0)
    augmentation_multiplicity: int = _setting(
        1, "sample mode: each tile's gradient is the mean over this many augmented crops of it, before clipping "
        "(same privacy accounting, this many times the compute)", cli=True, ge=1, le=32)
    update_noise_multiplier: float = _setting(1.0, "noise multiplier on the aggregate (update mode)", cli=True, ge=0)
    update_clipping_norm: float = _setting(1.0, "clipping norm of each lab's update (update mode)", cli=True, gt=0)
    target_delta: float = _setting(1e-5, "delta of the reported epsilon", cli="--delta", gt=0, lt=1)
    local_epochs: int = _setting(1, "local epochs per round (when max-steps is 0)", cli=True, ge=1)
    batch_size: int = _setting(4, "local batch size", cli=True, ge=1)
    max_steps: int = _setting(0, "cap on local optimizer steps per round (0: epochs decide)", cli=True, ge=0)
    learning_rate: float = _setting(0.01, "local learning rate", cli="--lr", cli_default=0.001, gt=0)
    crop_size: int = _setting(64, "training crop edge in pixels at the model's pixel size", cli=True, ge=1)
    model_depth: int = _setting(4, "UNet depth", cli="--depth", ge=1)
    model_base_width: int = _setting(16, "UNet channels at level 0", cli="--base-width", ge=1)
    model_groups: int = _setting(8, "GroupNorm groups of the UNet", ge=1)
    in_channels: int = _setting(3, "input channels of the UNet", ge=1)
    n_classes: int = _setting(2, "output classes of the UNet, background included", ge=1)
    rim_fraction: float = _setting(
        0.0, "contour models (3 classes): the contour class is each nucleus's rim, the pixels nearer its edge "
        "than this fraction of its largest inner distance (0: the one-pixel outline)", cli=True, ge=0, lt=1)
    mpp: float = _setting(0.5, "model pixel size (µm/px)", cli=True, gt=0)
    source_mpp: float = _setting(0.5, "pixel size of lab tiles without provenance (MoNuSeg: 0.25)",
                                 cli=True, cli_default=0.25, gt=0)
    seed: int = _setting(0, "seed of the initial global model and of local generators", cli=True)
    checkpoint_dir: str = _setting(
        "", "where the ServerApp writes per-round checkpoints and rounds.jsonl ('' disables checkpoints)")
    resume_from: str = _setting(
        "", "start from this checkpoint (.safetensors with its .json card); rounds are numbered on from its "
        "card's round", cli=True)
    model_name: str = _setting("feddp-unet", "model card name", cli=True)
    max_examples: int = _setting(
        10000, "cap on the example count a lab reports: its FedAvg weight is min(num-examples, max-examples)",
        cli=True, ge=1)
    outlier_factor: float = _setting(
        3.0, "with 3 or more updates, an update farther from the global model than this times the median "
        "distance is rejected (not with dp-mode update)", cli=True, gt=1)
    max_update_norm: float = _setting(
        0.0, "bound on the L2 norm of every update, larger ones are scaled down (0: the lower median of the "
        "round's norms; not with dp-mode update)", cli=True, ge=0)
    aggregation: Literal["mean", "median", "trimmed-mean"] = _setting(
        "mean", "mean: weighted FedAvg; median / trimmed-mean: coordinate-wise (unweighted) with 4 or more "
        "updates, else FedAvg; only mean with dp-mode update", cli=True)
    trim_fraction: float = _setting(0.25, "fraction cut from each tail by trimmed-mean", cli=True, gt=0, lt=0.5)
    average_last: int = _setting(
        0, "the final model is the mean of the last N rounds' global models (post-processing of what was "
        "released: no privacy cost); 0 or 1 keeps the last", cli=True, ge=0)
    secure_aggregation: Literal["auto", "on", "off"] = _setting(
        "auto", "SecAgg+: the coordinator learns only the sum of the labs' updates; auto: on with min-clients 3 "
        "or more and aggregation mean", cli=True)
    secure_clipping_range: float = _setting(
        1.0, "secure aggregation: bound on every coordinate of a lab's weighted update before quantization",
        cli=True, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> RunSettings:
        if self.min_updates > self.min_clients:
            raise ValueError(f"min-updates ({self.min_updates}) cannot exceed min-clients ({self.min_clients})")
        if self.dp_mode == "sample" and self.noise_multiplier <= 0:
            raise ValueError("noise-multiplier must be > 0 with dp-mode 'sample'")
        if self.augmentation_multiplicity > 1 and self.dp_mode != "sample":
            raise ValueError(f"augmentation-multiplicity {self.augmentation_multiplicity} needs dp-mode 'sample' "
                             "(it averages per-sample gradients before DP-SGD's clipping)")
        if self.dp_mode == "update" and self.aggregation != "mean":
            # The server's Gaussian noise is calibrated to the sensitivity of a
            # mean of clipped updates; a median or trimmed mean has another one.
            raise ValueError(f"aggregation {self.aggregation!r} cannot be used with dp-mode 'update' "
                             "(its noise calibration assumes a mean); use aggregation 'mean'")
        if self.secure_aggregation == "on":
            if self.min_clients < 3:
                raise ValueError(f"secure-aggregation 'on' needs min-clients 3 or more, received {self.min_clients}: "
                                 "in a sum of two updates each lab can subtract its own and read the other's")
            if self.aggregation != "mean":
                raise ValueError(f"aggregation {self.aggregation!r} cannot be used with secure-aggregation 'on' "
                                 "(the coordinator only learns a sum); use aggregation 'mean'")
        if self.dp_noise == "distributed":
            secure = self.secure_aggregation == "on" or (
                self.secure_aggregation == "auto" and self.min_clients >= 3 and self.aggregation == "mean")
            if self.dp_mode != "sample" or not secure or self.max_steps != 1:
                raise ValueError("dp-noise 'distributed' needs dp-mode 'sample', secure aggregation (min-clients 3 or "
                                 f"more) and max-steps 1; received dp-mode {self.dp_mode!r}, min-clients "
                                 f"{self.min_clients}, secure-aggregation {self.secure_aggregation!r}, max-steps "
                                 f"{self.max_steps}")
            if self.noise_split > self.min_clients:
                raise ValueError(f"noise-split {self.noise_split} cannot exceed min-clients {self.min_clients}: a sum "
                                 "of fewer labs would carry less noise than the labs account for")
        multiple = 2 ** (self.model_depth - 1)
        if self.crop_size % multiple:
            raise ValueError(f"crop-size {self.crop_size} must be a multiple of {multiple} for model-depth "
                             f"{self.model_depth}")
        return self

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Build from a Flower run config; unknown keys are ignored."""
        return cls(**config)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flat hyphenated dictionary for ``[tool.flwr.app.config]``."""
        return self.model_dump(by_alias=True)

    @property
    def noise_labs(self) -> int:
        """Labs the DP-SGD noise is split over in distributed mode (``noise-split``, or ``min-clients``)."""
        return self.noise_split or self.min_clients

    @property
    def noise_share(self) -> float:
        """Noise multiplier each lab adds: the whole in local mode, ``1 / sqrt(noise_labs)`` of it when distributed."""
        if self.dp_noise == "distributed":
            return self.noise_multiplier / self.noise_labs**0.5
        return self.noise_multiplier

    @property
    def unet_params(self) -> dict[str, Any]:
        """Keyword arguments for ``UNet``."""
        return {"in_channels": self.in_channels, "n_classes": self.n_classes, "depth": self.model_depth,
                "base_width": self.model_base_width, "groups": self.model_groups}

    def train_config(self, node: NodeSettings, learning_rate: float | None = None) -> TrainConfig:
        """The local round this run asks of ``node``'s lab.

        ``sample`` mode: DP-SGD accounted at the lab's own delta (``max-delta``)
        against its budget (``max-epsilon``). Other modes train without
        per-sample noise. ``learning_rate`` overrides the run's (the server's
        per-round config). Fresh noise and sampling every round (no seed).
        """
        from ..training import TrainConfig

        private = self.dp_mode == "sample"
        steps = self.max_steps or None
        return TrainConfig(
            epochs=None if steps else self.local_epochs, steps=steps,
            lr=float(self.learning_rate if learning_rate is None else learning_rate),
            batch_size=self.batch_size, max_physical_batch_size=self.batch_size, crop_size=self.crop_size,
            dp_mode="sample" if private else "none", max_grad_norm=self.max_grad_norm,
            noise_multiplier=self.noise_multiplier if private else None, delta=node.max_delta,
            epsilon_max=node.epsilon_budget if private else None, seed=None,
            augmentation_multiplicity=self.augmentation_multiplicity if private else 1,
        )


class NodeSettings(_FlatConfig):
    """Settings of one lab's SuperNode (its ``--node-config``).

    The lab policy (``max-epsilon`` and the fields after ``accept-dp-modes``)
    is pinned when the lab joins; no run config can change it
    (:mod:`napari_feddp.federation.policy`).
    """

    lab: str = _setting("lab", "lab identifier (names the privacy ledger, never sent to the server)")
    data_dir: str = _setting("", "local dataset folder with images/ and masks/")
    ledger_dir: str = _setting(
        "", "privacy ledger folder ('': $FEDDP_HOME/ledger); keep and back it up: it is the lab's memory of "
        "the privacy budget spent")
    max_epsilon: float = _setting(
        8.0, "privacy budget: a round that would exceed it is declined (0: unlimited, with a warning)",
        cli="--epsilon-budget", ge=0)
    eval_dir: str = _setting("", "held-out tiles for federated evaluation and promotion ('': data-dir)")
    model_store: str = _setting("", "where the final global model is kept ('': the local model store)")
    history_file: str = _setting(
        "", "local JSON-lines file of this lab's per-round results for the Federation widget ('': none)")
    train_fn: str = _setting("", "optional module:function replacing the default local trainer")
    eval_fn: str = _setting("", "optional module:function replacing the default local evaluation")
    threads: int = _setting(1, "torch CPU threads of the lab's ClientApp process", ge=1)
    promotion_margin: float = _setting(
        0.02, "Dice the final model may lose against the lab's current default model on the held-out tiles "
        "and still become the new default", ge=0)
    accept_dp_modes: str = _setting(
        "sample", "comma-separated DP modes this lab trains under (update sends un-noised clipped updates to the "
        "coordinator, none plain updates)", cli=True)
    max_delta: float = _setting(
        1e-5, "largest delta accepted; the ledger reports epsilon at it (a run must also ask for delta below "
        "1 / training samples)", cli=True, gt=0, lt=1)
    min_noise_multiplier: float = _setting(0.5, "smallest DP-SGD noise multiplier accepted", cli=True, ge=0)
    max_model_parameters: int = _setting(2_000_000, "largest model (parameters) accepted", cli=True, ge=0)
    max_steps_per_round: int = _setting(2000, "most local steps a round may ask for", cli=True, ge=0)
    max_local_epochs: int = _setting(5, "most local epochs a round may ask for", cli=True, ge=0)
    max_crop_size: int = _setting(512, "largest training crop a run may ask for", cli=True, ge=0)
    max_batch_size: int = _setting(64, "largest batch a run may ask for", cli=True, ge=0)
    min_clear_batch_size: int = _setting(
        4, "smallest batch a run may ask for when this lab's update leaves it without DP-SGD noise (dp-mode none or "
        "update): the fewer tiles an update holds, the easier it is to invert", cli=True, ge=1)
    max_noise_split: int = _setting(
        1, "distributed noise: the most labs this lab lets the DP-SGD noise be split over, i.e. the most other labs "
        "it relies on to add theirs (1: distributed-noise runs are declined)", cli=True, ge=1)
    require_secure_aggregation: bool = _setting(
        False, "decline rounds that would send this lab's update to the coordinator in the clear (not inside a "
        "SecAgg+ sum of 3 or more labs)", cli=True)

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> NodeSettings:
        """Build from a Flower node config; unknown keys are ignored."""
        return cls(**config)

    def to_node_config(self) -> dict[str, bool | int | float | str]:
        """Flat hyphenated dictionary for ``--node-config`` (empty values dropped)."""
        return {key: value for key, value in self.model_dump(by_alias=True).items() if value not in ("", None)}

    @property
    def epsilon_budget(self) -> float | None:
        """``max_epsilon`` or None when unlimited."""
        return float(self.max_epsilon) if self.max_epsilon > 0 else None


# --------------------------------------------------------------------------- command line


def _flags(schema: type[_FlatConfig]) -> dict[str, str]:
    """Field name -> command-line flag, for the fields that have one."""
    flags = {}
    for name, info in schema.model_fields.items():
        cli = (info.json_schema_extra or {}).get("cli")
        if cli:
            flags[name] = cli if isinstance(cli, str) else f"--{_key(name)}"
    return flags


def add_options(group, schema: type[_FlatConfig]) -> None:
    """Add an argparse option for every field of ``schema`` that has a flag: type, default and help from the field."""
    for name, flag in _flags(schema).items():
        info = schema.model_fields[name]
        default = info.json_schema_extra["cli_default"]
        shown = "" if default == "" else " (default %(default)s)"
        kwargs: dict[str, Any] = {"default": default, "help": info.description.replace("%", "%%") + shown}
        if info.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_args(info.annotation):
            kwargs["choices"] = get_args(info.annotation)
        else:
            kwargs["type"] = info.annotation
        group.add_argument(flag, **kwargs)


def options_of(schema: type[_FlatConfig], args: argparse.Namespace) -> dict[str, Any]:
    """Field name -> value of the options :func:`add_options` added, as parsed into ``args``."""
    return {name: getattr(args, flag.lstrip("-").replace("-", "_")) for name, flag in _flags(schema).items()}


def option_errors(schema: type[_FlatConfig], error: SettingsError) -> str:
    """``error`` in the command line's terms: each problem under the flag of its key."""
    flags = {_key(name): flag for name, flag in _flags(schema).items()}
    return "\n".join(f"{flags.get(key, key)}: {problem}" if key else problem for key, problem in error.problems)
