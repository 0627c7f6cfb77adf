"""Run settings (shared by ServerApp and ClientApps) and per-lab node settings.

Flower passes two flat ``key -> bool | int | float | str`` dictionaries:

* the **run config** (``[tool.flwr.app.config]`` of the app's pyproject.toml,
  possibly overridden by ``flwr run --run-config``), identical for the
  ServerApp and every ClientApp of a run: :class:`RunSettings`;
* the **node config** of each SuperNode (``flower-supernode --node-config``),
  private to one lab: :class:`NodeSettings`.

Keys use hyphens (Flower style); attributes use underscores.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

DP_MODES = ("sample", "update", "none")


@dataclass(frozen=True)
class RunSettings:
    """Settings of one federated run.

    Attributes
    ----------
    num_rounds : int
        Federated training rounds.
    min_clients : int
        Connected SuperNodes required before a round is configured.
    min_updates : int
        Accepted (valid) updates needed to aggregate a round; with fewer the
        global model is kept and the round is recorded as skipped.
    fraction_train : float
        Fraction of connected nodes sampled per round (at least ``min_clients``).
    round_timeout : float
        Seconds to wait for replies; late nodes are left out of the round.
    node_wait_timeout : float
        Seconds to wait for ``min_clients`` nodes before failing the run.
    final_evaluation : bool
        Send the final global model to every node for a federated evaluation.
    dp_mode : {"sample", "update", "none"}
        ``sample``: DP-SGD in every lab (Opacus, per-sample clipping, each lab
        keeps its privacy ledger). ``update``: client-level DP on the updates
        (Flower's fixed clipping in the ClientApp + Gaussian noise on the
        aggregate at the server, uniform weights). ``none``: no DP (testing).
    noise_multiplier, max_grad_norm : float
        DP-SGD parameters (``sample``).
    update_noise_multiplier, update_clipping_norm : float
        Client-level DP parameters (``update``).
    target_delta : float
        Delta at which epsilon is reported.
    local_epochs, batch_size, max_steps : int
        Local training length (``max_steps`` 0 means no cap).
    learning_rate : float
    crop_size : int
        Training crop edge in pixels at the model's pixel size.
    model_depth, model_base_width, model_groups, in_channels, n_classes : int
        UNet architecture (must be identical everywhere).
    mpp : float
        Micrometres per pixel the model works at.
    source_mpp : float
        Pixel size of lab tiles without provenance.
    seed : int
        Seed of the initial global model and local generators.
    checkpoint_dir : str
        Where the ServerApp writes per-round checkpoints and ``rounds.jsonl``
        ("" disables checkpoints).
    resume_from : str
        Checkpoint (``.safetensors`` with its ``.json`` card) whose weights start
        the run; rounds are numbered on from the card's ``round``.
    model_name : str
        Model card name.
    max_examples : int
        Cap on the example count a lab reports: its FedAvg weight is
        ``min(num-examples, max-examples)``, so one lab cannot claim the whole
        average with a made-up count.
    outlier_factor : float
        With at least 3 updates in a round, an update whose distance to the
        global model exceeds ``outlier-factor`` times the median distance is
        rejected as an outlier (not used with ``dp-mode = update``).
    max_update_norm : float
        Absolute bound on the L2 norm of every update (reply minus global
        model); larger updates are scaled down to it. 0 bounds each update by the
        lower median of the round's update norms instead (not used with
        ``dp-mode = update``, where ``update-clipping-norm`` bounds updates).
    aggregation : {"mean", "median", "trimmed-mean"}
        ``mean``: weighted FedAvg. ``median`` / ``trimmed-mean``: Flower's
        coordinate-wise FedMedian / FedTrimmedAvg (unweighted) when at least 4
        updates are accepted, weighted FedAvg otherwise. Only ``mean`` with
        ``dp-mode = update`` (its noise is calibrated to a mean).
    trim_fraction : float
        Fraction cut from each tail by ``trimmed-mean``, in (0, 0.5).
    """

    num_rounds: int = 2
    min_clients: int = 2
    min_updates: int = 1
    fraction_train: float = 1.0
    round_timeout: float = 600.0
    node_wait_timeout: float = 300.0
    final_evaluation: bool = True
    dp_mode: str = "sample"
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    update_noise_multiplier: float = 1.0
    update_clipping_norm: float = 1.0
    target_delta: float = 1e-5
    local_epochs: int = 1
    batch_size: int = 4
    max_steps: int = 0
    learning_rate: float = 0.01
    crop_size: int = 64
    model_depth: int = 4
    model_base_width: int = 16
    model_groups: int = 8
    in_channels: int = 3
    n_classes: int = 2
    mpp: float = 0.5
    source_mpp: float = 0.5
    seed: int = 0
    checkpoint_dir: str = ""
    resume_from: str = ""
    model_name: str = "feddp-unet"
    max_examples: int = 10000
    outlier_factor: float = 3.0
    max_update_norm: float = 0.0
    aggregation: str = "mean"
    trim_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"dp-mode: expected one of {DP_MODES}, received {self.dp_mode!r}")
        for name in ("num_rounds", "min_clients", "min_updates", "local_epochs", "batch_size",
                     "crop_size", "model_depth", "model_base_width", "model_groups",
                     "in_channels", "n_classes"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{_key(name)}: expected a positive integer, received {value!r}")
        if self.min_updates > self.min_clients:
            raise ValueError(
                f"min-updates ({self.min_updates}) cannot exceed min-clients ({self.min_clients})"
            )
        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"fraction-train: expected (0, 1], received {self.fraction_train}")
        for name in ("round_timeout", "node_wait_timeout", "learning_rate", "max_grad_norm",
                     "update_clipping_norm", "mpp", "source_mpp"):  # fmt: skip
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{_key(name)}: expected a positive number, received {value!r}")
        for name in ("noise_multiplier", "update_noise_multiplier"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{_key(name)}: expected a number >= 0, received {value!r}")
        if self.dp_mode == "sample" and self.noise_multiplier <= 0:
            raise ValueError("noise-multiplier must be > 0 with dp-mode 'sample'")
        if not 0 < self.target_delta < 1:
            raise ValueError(f"target-delta: expected (0, 1), received {self.target_delta}")
        if self.max_steps < 0:
            raise ValueError(f"max-steps: expected >= 0, received {self.max_steps}")
        examples = self.max_examples
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise ValueError(f"max-examples: expected a positive integer, received {self.max_examples!r}")
        if not (isinstance(self.outlier_factor, (int, float)) and math.isfinite(self.outlier_factor)
                and self.outlier_factor > 1):  # fmt: skip
            raise ValueError(f"outlier-factor: expected a number > 1, received {self.outlier_factor!r}")
        if not (isinstance(self.max_update_norm, (int, float)) and math.isfinite(self.max_update_norm)
                and self.max_update_norm >= 0):  # fmt: skip
            raise ValueError(
                f"max-update-norm: expected a number >= 0 (0 = median rule), received {self.max_update_norm!r}"
            )
        aggregations = ("mean", "median", "trimmed-mean")
        if self.aggregation not in aggregations:
            raise ValueError(
                f"aggregation: expected one of {aggregations}, received {self.aggregation!r}"
            )
        if not (isinstance(self.trim_fraction, (int, float)) and 0 < self.trim_fraction < 0.5):
            raise ValueError(f"trim-fraction: expected (0, 0.5), received {self.trim_fraction!r}")
        if self.dp_mode == "update" and self.aggregation != "mean":
            # The server's Gaussian noise is calibrated to the sensitivity of a
            # mean of clipped updates; a median or trimmed mean has another one.
            raise ValueError(
                f"aggregation {self.aggregation!r} cannot be used with dp-mode 'update' "
                "(its noise calibration assumes a mean); use aggregation 'mean'"
            )
        multiple = 2 ** (self.model_depth - 1)
        if self.crop_size % multiple:
            raise ValueError(
                f"crop-size {self.crop_size} must be a multiple of {multiple} for model-depth "
                f"{self.model_depth}"
            )

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Build from a Flower run config; unknown keys are ignored."""
        return cls(**_coerce(cls, config))

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flat hyphenated dictionary for ``[tool.flwr.app.config]``."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunSettings:
        """Copy with changed attributes (validated)."""
        return dataclasses.replace(self, **changes)

    @property
    def unet_params(self) -> dict[str, Any]:
        """Keyword arguments for ``UNet``."""
        return {
            "in_channels": self.in_channels,
            "n_classes": self.n_classes,
            "depth": self.model_depth,
            "base_width": self.model_base_width,
            "groups": self.model_groups,
        }


@dataclass(frozen=True)
class NodeSettings:
    """Settings of one lab's SuperNode (its ``--node-config``).

    Attributes
    ----------
    lab : str
        Lab identifier (used for the privacy ledger, never sent to the server).
    data_dir : str
        Local dataset folder with ``images/`` and ``masks/``.
    ledger_dir : str
        Privacy ledger directory ("" = ``$FEDDP_HOME/ledger``, see
        :func:`napari_feddp.federation.local.ledger_dir`). Keep and back it up:
        it is the lab's memory of the privacy budget spent.
    max_epsilon : float
        The lab's privacy budget (default 8); 0 means no limit. A lab whose
        next round would exceed it declines the round.
    eval_dir : str
        Held-out tiles for federated evaluation ("" = ``data_dir``).
    model_store : str
        Where the final global model is kept ("" = the package's local model
        store, :func:`napari_feddp.models.store.model_store`).
    history_file : str
        Local JSON-lines file receiving this lab's per-round results (loss,
        Dice, epsilon, declines) for the Federation widget ("" = none). Never
        sent anywhere.
    train_fn : str
        Optional ``module:function`` replacing the default local trainer.
    eval_fn : str
        Optional ``module:function`` replacing the default local evaluation.
    threads : int
        Torch CPU threads for the lab's ClientApp process.
    promotion_margin : float
        Dice the federation's final model may lose against the lab's current
        default model on the lab's held-out tiles and still become the new
        default (see :mod:`napari_feddp.federation.promotion`).
    accept_dp_modes : str
        Comma-separated DP modes this lab trains under (default ``sample``:
        DP-SGD in the lab; ``update`` sends un-noised clipped updates to the
        coordinator, ``none`` sends plain updates).
    max_delta : float
        Largest delta the lab accepts (its ledger reports epsilon at this
        delta); a run must also ask for delta below 1 / (training samples).
    min_noise_multiplier : float
        Smallest DP-SGD noise multiplier the lab accepts.
    max_model_parameters : int
        Largest model (parameters) the lab builds.
    max_steps_per_round, max_local_epochs, max_crop_size, max_batch_size : int
        Limits on the local work a run may ask for.

    The lab policy (the last six, plus ``max_epsilon``) is pinned when the lab
    joins (its ``--node-config``); no run config can change it
    (:mod:`napari_feddp.federation.policy`).
    """

    lab: str = "lab"
    data_dir: str = ""
    ledger_dir: str = ""
    max_epsilon: float = 8.0
    eval_dir: str = ""
    model_store: str = ""
    history_file: str = ""
    train_fn: str = ""
    eval_fn: str = ""
    threads: int = 1
    promotion_margin: float = 0.02
    accept_dp_modes: str = "sample"
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.5
    max_model_parameters: int = 2_000_000
    max_steps_per_round: int = 2000
    max_local_epochs: int = 5
    max_crop_size: int = 512
    max_batch_size: int = 64

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> NodeSettings:
        """Build from a Flower node config; unknown keys are ignored."""
        return cls(**_coerce(cls, config))

    def to_node_config(self) -> dict[str, bool | int | float | str]:
        """Flat hyphenated dictionary for ``--node-config`` (empty values dropped)."""
        return {
            _key(f.name): getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) not in ("", None)
        }

    @property
    def epsilon_budget(self) -> float | None:
        """``max_epsilon`` or None when unlimited."""
        return float(self.max_epsilon) if self.max_epsilon and self.max_epsilon > 0 else None


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """Map hyphenated keys to fields and cast to the field's default type."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        key = _key(f.name)
        if key not in config and f.name not in config:
            continue
        value = config.get(key, config.get(f.name))
        default = f.default
        if isinstance(default, bool):
            if isinstance(value, str):
                value = value.strip().lower() in ("1", "true", "yes", "on")
            else:
                value = bool(value)
        elif isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{key}: expected an integer, received {value!r}")
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        elif isinstance(default, str):
            value = str(value)
        out[f.name] = value
    return out
