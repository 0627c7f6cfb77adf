"""Local training for one lab: datasets, augmentation, loss, metrics, DP-SGD and the privacy ledger.

No Qt here; the napari widgets call these functions.

* :class:`SegmentationDataset` - image/mask folders (PNG/TIFF) cropped at the model's
  pixel size, with flips/rotations and H&E stain jitter; deterministic
  ``"center"``/``"sliding"`` modes for evaluation.
* :func:`save_annotated_tile` - a napari region + painted Labels as a new tile with provenance.
* :func:`train_local` / :class:`TrainConfig` / :class:`TrainResult` - one local round,
  optionally DP-SGD through Opacus (Poisson sampling, per-sample clipping,
  noise multiplier or target epsilon, memory-bounded physical batches).
* :mod:`~napari_feddp.training.metrics` - pooled Dice, Jaccard, pixel accuracy.
* :class:`PrivacyLedger` - the Opacus accounting of a lab's tiles on disk (identified by
  content, not by lab name), hash-chained, with a budget ``epsilon_max`` checked before
  each round; :func:`reset_ledger` starts a dataset's budget again, deliberately and logged;
  :func:`privacy_report` reads what each tile has spent.
"""

from .annotations import SavedTile, save_annotated_tile
from .augment import Augmentation
from .dataset import (
    DEFAULT_SOURCE_MPP,
    SamplePair,
    SegmentationDataset,
    dataset_fingerprint,
    find_pairs,
    read_provenance,
)
from .errors import BudgetExceededError, DatasetError, LedgerError
from .ledger import (
    DEFAULT_DELTA,
    PrivacyLedger,
    PrivacyReport,
    ResetRecord,
    RoundRecord,
    TileSpending,
    privacy_report,
    reset_ledger,
)
from .local import RoundPlan, TrainConfig, TrainResult, evaluate, plan_round, private_gradient_sum, train_local
from .losses import DiceCELoss
from .metrics import IGNORE_INDEX, SegmentationMetrics, dice, jaccard, pixel_accuracy

__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_SOURCE_MPP",
    "IGNORE_INDEX",
    "Augmentation",
    "BudgetExceededError",
    "DatasetError",
    "DiceCELoss",
    "LedgerError",
    "PrivacyLedger",
    "PrivacyReport",
    "ResetRecord",
    "RoundPlan",
    "RoundRecord",
    "SamplePair",
    "SavedTile",
    "SegmentationDataset",
    "SegmentationMetrics",
    "TileSpending",
    "TrainConfig",
    "TrainResult",
    "dataset_fingerprint",
    "dice",
    "evaluate",
    "find_pairs",
    "jaccard",
    "pixel_accuracy",
    "plan_round",
    "privacy_report",
    "read_provenance",
    "reset_ledger",
    "save_annotated_tile",
    "train_local",
    "private_gradient_sum",
]
