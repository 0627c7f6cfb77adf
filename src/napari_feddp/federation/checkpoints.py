"""Global-model checkpoints and the round log the ServerApp writes.

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

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord

from .._atomic import write_atomic

ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
EVALUATION_FILE = "evaluation.json"


class CheckpointWriter:
    """Write checkpoints and logs into one directory.

    Parameters
    ----------
    directory : path or None
        None (or "") disables writing; all methods become no-ops.
    settings : RunSettings
        For model construction and the model card.

    Attributes
    ----------
    problems : dict
        ``{checkpoint name: message}`` for every checkpoint whose card needed a
        correction or could not be written.
    """

    def __init__(self, directory, settings) -> None:
        self.directory = Path(directory) if directory else None
        self.settings = settings
        self.problems: dict[str, str] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            rounds = self.directory / ROUNDS_FILE
            if rounds.exists():
                rounds.unlink()

    @property
    def enabled(self) -> bool:
        """True if a directory was given."""
        return self.directory is not None

    def save_model(
        self, name: str, arrays: ArrayRecord, *, strict: bool = False, **provenance
    ) -> Path | None:
        """Save ``arrays`` as ``<name>.safetensors`` + ``<name>.json``.

        Parameters
        ----------
        name : str
            File name without suffix.
        arrays : ArrayRecord
            Global model weights.
        strict : bool
            Raise when the card or checkpoint cannot be written, instead of
            recording the problem and returning None. For checkpoints that carry
            no lab-reported figures, where a failure is a configuration error.
        **provenance
            ``round``, ``federated_rounds``, ``epsilon``, ``metrics`` (see
            :func:`napari_feddp.federation.local.model_card`). An epsilon that is
            not a valid privacy claim (finite, in ``(0, 1e6]``) is left out of
            the card and recorded in :attr:`problems`.

        Returns
        -------
        pathlib.Path or None
            The ``.safetensors`` file; None if writing is disabled or failed.

        Raises
        ------
        napari_feddp.models.CheckpointError, napari_feddp.models.ModelCardError
            Only with ``strict``.
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
            self.problems[name] = (
                f"epsilon {epsilon!r} is not a valid privacy claim; card written without epsilon"
            )
            provenance["epsilon"] = None
        try:
            model = build_model(self.settings)
            model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
            card = model_card(self.settings, **provenance)
            return save_checkpoint(self.directory / name, model, card)
        except (ModelCardError, CheckpointError) as exc:
            if strict:
                raise
            self.problems[name] = f"checkpoint not written: {exc}"[:500]
            return None

    def append_round(self, report: dict) -> None:
        """Append one round record to ``rounds.jsonl``."""
        if self.directory is None:
            return
        with open(self.directory / ROUNDS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(report, default=str) + "\n")
            handle.flush()

    def write_evaluation(self, evaluation: dict | None) -> None:
        """Write ``evaluation.json``."""
        if self.directory is not None and evaluation is not None:
            write_atomic(self.directory / EVALUATION_FILE, json.dumps(evaluation, indent=2, default=str) + "\n")

    def write_summary(self, status: str, **fields) -> None:
        """Write ``summary.json`` (status plus any fields)."""
        if self.directory is not None:
            summary = {"status": status, "updated": time.time(), **fields}
            write_atomic(self.directory / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")


def read_rounds(directory) -> list[dict]:
    """Round records written so far (empty if none)."""
    path = Path(directory) / ROUNDS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line being written
    return rows


def read_json(directory, name: str) -> dict | None:
    """A JSON file of the checkpoint directory, or None."""
    path = Path(directory) / name
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
