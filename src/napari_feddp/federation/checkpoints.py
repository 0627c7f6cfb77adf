"""Global-model checkpoints and the round log the ServerApp writes; JSON-lines logs.

Layout of ``checkpoint-dir``::

    round-000.safetensors / .json   initial global model (+ model card)
    round-001.safetensors / .json   global model after round 1
    ...
    final.safetensors / .json       last global model
    rounds.jsonl                    one JSON object per round (RoundReport)
    evaluation.json                 final federated evaluation
    summary.json                    status of the run ("running", "completed", "failed")

Checkpoints go through :func:`napari_feddp.models.save_checkpoint`
(safetensors weights + JSON model card, hash-checked). Figures that come from
labs (epsilon, metrics) never stop a run: a value the card cannot carry is left
out and the problem recorded in :attr:`CheckpointWriter.problems`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .._atomic import write_atomic

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
EVALUATION_FILE = "evaluation.json"


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append ``row`` to a JSON-lines file (its folder is created)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, default=str) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file, oldest first (none if it is missing; a line being written is skipped)."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def read_json(directory, name: str) -> dict | None:
    """A JSON file of the checkpoint directory, or None."""
    try:
        return json.loads((Path(directory) / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class CheckpointWriter:
    """Write checkpoints and logs into ``directory`` (None or "": every method is a no-op).

    ``settings`` (RunSettings) builds the model and its card. :attr:`problems`
    maps each checkpoint whose card needed a correction or could not be
    written to the reason.
    """

    def __init__(self, directory, settings) -> None:
        self.directory = Path(directory) if directory else None
        self.settings = settings
        self.problems: dict[str, str] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / ROUNDS_FILE).unlink(missing_ok=True)

    def save_model(self, name: str, arrays: ArrayRecord, *, strict: bool = False, **provenance) -> Path | None:
        """Save ``arrays`` as ``<name>.safetensors`` + ``<name>.json``; return the ``.safetensors`` file.

        ``provenance`` (``round``, ``federated_rounds``, ``epsilon``, ``metrics``)
        goes into the card (:func:`napari_feddp.federation.local.model_card`);
        an epsilon that is not a valid privacy claim (finite, in ``(0, 1e6]``)
        is left out and recorded in :attr:`problems`. A card or checkpoint
        that cannot be written is recorded there too and None returned, unless
        ``strict`` (checkpoints without lab-reported figures, where a failure
        is a configuration error): then CheckpointError or ModelCardError is raised.
        """
        if self.directory is None:
            return None
        from ..models import save_checkpoint
        from ..models.card import ModelCardError
        from ..models.checkpoint import CheckpointError
        from .local import build_model, model_card
        from .strategy import valid_epsilon

        epsilon = provenance.get("epsilon")
        if epsilon is not None and valid_epsilon(epsilon) is None:
            self.problems[name] = f"epsilon {epsilon!r} is not a valid privacy claim; card written without epsilon"
            provenance["epsilon"] = None
        try:
            model = build_model(self.settings)
            model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
            return save_checkpoint(self.directory / name, model, model_card(self.settings, **provenance))
        except (ModelCardError, CheckpointError) as exc:
            if strict:
                raise
            self.problems[name] = f"checkpoint not written: {exc}"[:500]
            return None

    def append_round(self, report: dict) -> None:
        """Append one round record to ``rounds.jsonl``."""
        if self.directory is not None:
            append_jsonl(self.directory / ROUNDS_FILE, report)

    def write_evaluation(self, evaluation: dict | None) -> None:
        """Write ``evaluation.json``."""
        if self.directory is not None and evaluation is not None:
            write_atomic(self.directory / EVALUATION_FILE, json.dumps(evaluation, indent=2, default=str) + "\n")

    def write_summary(self, status: str, **fields) -> None:
        """Write ``summary.json`` (status plus any fields)."""
        if self.directory is not None:
            summary = {"status": status, "updated": time.time(), **fields}
            write_atomic(self.directory / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")


def average_arrays(records: list) -> object:
    """The mean of ArrayRecords with the same arrays (floating-point arrays averaged, others from the last)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    last = records[-1]
    averaged = {}
    for name in last:
        value = last[name].numpy()
        if value.dtype.kind == "f":
            value = np.mean([r[name].numpy().astype(np.float64) for r in records], axis=0).astype(value.dtype)
        averaged[name] = Array(np.ascontiguousarray(value))
    return ArrayRecord(averaged)
