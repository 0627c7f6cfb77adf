"""Privacy ledger: the Opacus accountant of a (lab, dataset), persisted across rounds and runs.

Files
-----
``PATH_DIR/<lab_id>/<ledger_id>.jsonl``
    One JSON object per line: a ``genesis`` record (lab, accountant mechanism,
    delta), then one ``round`` record per local training round with the round's
    accountant history ``[(noise_multiplier, sample_rate, steps), ...]``, the
    cumulative accountant ``state_dict()`` after it, epsilon of the round and
    cumulative epsilon at the ledger's delta, the dataset fingerprint and the
    budget in force. Every record carries ``prev`` (hash of the previous
    record) and ``hash`` (SHA-256 of its own canonical JSON): a hash chain.
    The file is rewritten atomically (temporary file + ``os.replace``).
``DATASET_DIR/.feddp/ledger-<lab_id>.json``
    Marker written into the dataset folder after every recorded round: ledger
    id, number of rounds, head hash and epsilon. It makes the dataset remember
    that it has trained, so a ledger that is deleted, truncated, edited or
    replaced by an older copy raises :class:`LedgerError` instead of starting
    again from epsilon = 0.

Identity: a dataset folder with a marker keeps its ledger even when tiles are
added (its fingerprint changes; each round records the fingerprint it used).
Without a marker, the ledger is found by fingerprint among the lab's ledgers.

Threat model: this detects accidents and casual edits. Someone who can rewrite
both the ledger directory and the dataset folder consistently can still forge
history; for that, the federation server should also keep the epsilon each
client reports per round.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import re
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from ._io import write_atomic
from .errors import BudgetExceededError, LedgerError

LEDGER_FORMAT = 1
DEFAULT_DELTA = 1e-5
ACCOUNTANTS = ("rdp", "prv")
MARKER_DIR = ".feddp"
_GENESIS_PREV = "0" * 64
_LAB_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

History = list[tuple[float, float, int]]


@dataclass(frozen=True)
class RoundRecord:
    """One recorded local training round.

    Attributes
    ----------
    index : int
        1-based position in the ledger.
    round_id : int, str or None
        Caller's label, e.g. the federated server round.
    fingerprint : str
        Dataset fingerprint the round trained on.
    noise_multiplier, sample_rate : float
        DP-SGD parameters of the round (of its first history entry).
    steps : int
        Noisy optimizer steps in the round.
    history : list of (float, float, int)
        The round's accountant history.
    epsilon_round : float
        Epsilon of this round alone.
    epsilon : float
        Cumulative epsilon after this round, at ``delta``.
    delta : float
        The ledger's delta.
    epsilon_max : float or None
        Budget in force when the round was recorded.
    n_examples : int or None
        Dataset size (DP samples) of the round.
    timestamp : str
        UTC time of recording, ISO 8601.
    meta : dict
        Caller's extra JSON data.
    hash : str
        This record's chain hash.
    """

    index: int
    round_id: Any
    fingerprint: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    history: History
    epsilon_round: float
    epsilon: float
    delta: float
    epsilon_max: float | None
    n_examples: int | None
    timestamp: str
    meta: dict[str, Any] = field(default_factory=dict)
    hash: str = ""


# --------------------------------------------------------------------------- accounting helpers


def compose(history: Sequence[Sequence[float]], more: Sequence[Sequence[float]]) -> History:
    """Concatenate accountant histories, merging equal consecutive (sigma, q) entries as Opacus does."""
    out: History = [(float(s), float(q), int(n)) for s, q, n in history]
    for sigma, rate, steps in more:
        if out and out[-1][0] == float(sigma) and out[-1][1] == float(rate):
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(steps))
        else:
            out.append((float(sigma), float(rate), int(steps)))
    return out


def make_accountant(mechanism: str, history: Sequence[Sequence[float]] = ()) -> Any:
    """A fresh Opacus accountant (``"rdp"`` or ``"prv"``) loaded with ``history``."""
    from opacus.accountants import create_accountant

    if mechanism not in ACCOUNTANTS:
        raise ValueError(f"accountant: expected one of {ACCOUNTANTS}, received {mechanism!r}")
    accountant = create_accountant(mechanism=mechanism)
    state = accountant.state_dict()
    state["history"] = [tuple(entry) for entry in compose([], history)]
    accountant.load_state_dict(state)
    return accountant


def epsilon_of(mechanism: str, history: Sequence[Sequence[float]], delta: float) -> float:
    """Epsilon at ``delta`` of an accountant history (0.0 for an empty history)."""
    key = tuple((float(s), float(q), int(n)) for s, q, n in compose([], history) if int(n) > 0)
    return _cached_epsilon(mechanism, key, float(delta))


@functools.lru_cache(maxsize=256)
def _cached_epsilon(mechanism: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    if not history:
        return 0.0
    accountant = make_accountant(mechanism, history)
    if mechanism == "prv":
        return float(accountant.get_epsilon(delta=delta, eps_error=0.01))
    return float(accountant.get_epsilon(delta=delta))


def _check_step_args(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier: expected a positive finite number, received {noise_multiplier!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate: expected a number in (0, 1], received {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, received {steps!r}")


# --------------------------------------------------------------------------- ledger


class PrivacyLedger:
    """Persistent privacy accounting of one lab's dataset across rounds and runs.

    Parameters
    ----------
    path_dir : str or Path
        The lab's ledger directory (kept outside the dataset; back it up).
    lab_id : str
        Identifier of the lab (letters, digits, ``.``, ``_``, ``-``).
    dataset_fingerprint : str
        :func:`~napari_feddp.training.dataset_fingerprint` of the dataset now.
    dataset_dir : str, Path or None
        The dataset folder, which receives the ``.feddp`` marker. Strongly
        recommended: without it a deleted ledger cannot be detected.
    delta : float or None
        Delta at which epsilon is reported. ``None``: the ledger's recorded
        delta, or :data:`DEFAULT_DELTA` for a new ledger. A value different from
        the recorded one raises :class:`LedgerError`.
    accountant : {"rdp", "prv"} or None
        Opacus accounting mechanism; ``None``: recorded one, or ``"rdp"``.

    Raises
    ------
    LedgerError
        If the marker says the dataset has trained but the ledger is missing,
        if the ledger's hash chain is broken, if the ledger and the marker
        disagree (ledger truncated or restored from an old copy), or if delta or
        accountant differ from the recorded ones.
    """

    def __init__(
        self,
        path_dir: str | Path,
        lab_id: str,
        dataset_fingerprint: str,
        *,
        dataset_dir: str | Path | None = None,
        delta: float | None = None,
        accountant: str | None = None,
    ) -> None:
        if not isinstance(lab_id, str) or not _LAB_PATTERN.match(lab_id):
            raise ValueError(
                f"lab_id: expected 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                f"received {lab_id!r}"
            )
        if not isinstance(dataset_fingerprint, str) or not dataset_fingerprint:
            raise ValueError(f"dataset_fingerprint: expected a non-empty string, received {dataset_fingerprint!r}")
        if delta is not None and not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta: expected a number in (0, 1), received {delta!r}")
        self.lab_dir = Path(path_dir) / lab_id
        self.lab_id = lab_id
        self.fingerprint = dataset_fingerprint
        self.dataset_dir = Path(dataset_dir) if dataset_dir is not None else None
        self._records: list[dict[str, Any]] = []
        self.ledger_id, repair_marker = self._resolve()
        self._settle_parameters(delta, accountant)
        if repair_marker:
            self._write_marker()

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        """The ledger file (may not exist before the first round)."""
        return self.lab_dir / f"{self.ledger_id}.jsonl"

    @property
    def marker_path(self) -> Path | None:
        """The marker in the dataset folder, or ``None`` without ``dataset_dir``."""
        if self.dataset_dir is None:
            return None
        return self.dataset_dir / MARKER_DIR / f"ledger-{self.lab_id}.json"

    @property
    def rounds(self) -> list[RoundRecord]:
        """All recorded rounds, oldest first."""
        return [_round_from_dict(r) for r in self._records[1:]]

    @property
    def n_rounds(self) -> int:
        """Number of recorded rounds."""
        return max(len(self._records) - 1, 0)

    @property
    def has_trained(self) -> bool:
        """True once a round has been recorded."""
        return self.n_rounds > 0

    @property
    def total_steps(self) -> int:
        """Noisy optimizer steps over all rounds."""
        return sum(n for _, _, n in self.history)

    @property
    def history(self) -> History:
        """Cumulative accountant history (what ``accountant.history`` holds)."""
        if not self.has_trained:
            return []
        return [tuple(e) for e in self._records[-1]["accountant_state"]["history"]]  # type: ignore[misc]

    @property
    def epsilon(self) -> float:
        """Cumulative epsilon at :attr:`delta`, recomputed from the stored history."""
        return epsilon_of(self.mechanism, self.history, self.delta)

    @property
    def fingerprint_changed(self) -> bool:
        """True if the dataset's fingerprint differs from the one of the last round."""
        return self.has_trained and self._records[-1]["fingerprint"] != self.fingerprint

    # ------------------------------------------------------------------ accounting

    def state_dict(self) -> dict[str, Any]:
        """Cumulative Opacus accountant ``state_dict()`` (``history`` and ``mechanism``)."""
        return {"history": self.history, "mechanism": self.mechanism}

    def accountant(self) -> Any:
        """A fresh Opacus accountant holding the cumulative history (a copy: changing it changes nothing here)."""
        return make_accountant(self.mechanism, self.history)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Cumulative epsilon if a round of ``steps`` DP-SGD steps at these parameters were added."""
        _check_step_args(noise_multiplier, sample_rate, steps)
        more = [(noise_multiplier, sample_rate, steps)] if steps else []
        return epsilon_of(self.mechanism, compose(self.history, more), self.delta)

    def would_exceed(self, noise_multiplier: float, sample_rate: float, steps: int, epsilon_max: float | None) -> bool:
        """True if the next round would take cumulative epsilon above ``epsilon_max`` (``None``: no budget)."""
        if epsilon_max is None:
            return False
        return self.epsilon_after(noise_multiplier, sample_rate, steps) > epsilon_max

    def check_budget(self, noise_multiplier: float, sample_rate: float, steps: int, epsilon_max: float | None) -> float:
        """Predicted cumulative epsilon after the next round; raise if it exceeds the budget.

        Raises
        ------
        BudgetExceededError
            With a message saying that this lab declines to train, and why.
        """
        after = self.epsilon_after(noise_multiplier, sample_rate, steps)
        if epsilon_max is not None and after > epsilon_max:
            spent = self.epsilon
            raise BudgetExceededError(
                f"lab {self.lab_id!r} declines to train: the next round ({steps} steps, noise multiplier "
                f"{noise_multiplier:.3g}, sample rate {sample_rate:.3g}) would raise epsilon from {spent:.3f} "
                f"to {after:.3f} at delta={self.delta:g}, above the budget epsilon_max={epsilon_max:g} "
                f"(ledger {self.path})",
                epsilon_spent=spent,
                epsilon_next=after,
                epsilon_max=float(epsilon_max),
            )
        return after

    # ------------------------------------------------------------------ recording

    def record_round(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        history: Sequence[Sequence[float]] | None = None,
        n_examples: int | None = None,
        round_id: Any = None,
        epsilon_max: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> RoundRecord:
        """Append a round to the ledger (atomically) and update the dataset marker.

        Parameters
        ----------
        noise_multiplier, sample_rate, steps
            DP-SGD parameters and number of noisy steps of the round.
        history : sequence of (sigma, q, steps) or None
            The round's own accountant history (e.g. ``privacy_engine.accountant.history``
            of a fresh engine); default ``[(noise_multiplier, sample_rate, steps)]``.
            Its step count must equal ``steps``.
        n_examples, round_id, epsilon_max, meta
            Stored for the record; ``meta`` must be JSON-serialisable.

        Returns
        -------
        RoundRecord
            The stored record, with cumulative ``epsilon``.

        Raises
        ------
        LedgerError
            If the ledger file changed on disk since it was loaded.
        """
        _check_step_args(noise_multiplier, sample_rate, steps)
        round_history = compose([], history if history is not None else [(noise_multiplier, sample_rate, steps)])
        if sum(n for _, _, n in round_history) != steps:
            raise ValueError(f"history: expected {steps} steps in total to match 'steps', received {round_history}")
        with _locked(self.lab_dir / ".lock"):
            self._check_unchanged_on_disk()
            records = self._records or [self._genesis()]
            record = self._round_record(records, round_history, noise_multiplier, sample_rate, steps,
                                        n_examples, round_id, epsilon_max, meta)
            records = records + [record]
            write_atomic(self.path, "".join(_canonical(r) + "\n" for r in records).encode("utf-8"))
            self._records = records
            self._write_marker()
        return _round_from_dict(record)

    # ------------------------------------------------------------------ internals: records

    def _genesis(self) -> dict[str, Any]:
        return _seal({
            "format": LEDGER_FORMAT, "kind": "genesis", "lab_id": self.lab_id, "ledger_id": self.ledger_id,
            "accountant": self.mechanism, "delta": self.delta, "created": _now(), "prev": _GENESIS_PREV,
        })

    def _round_record(self, records, round_history, noise_multiplier, sample_rate, steps,
                      n_examples, round_id, epsilon_max, meta) -> dict[str, Any]:
        cumulative = compose(self.history, round_history)
        payload = {
            "format": LEDGER_FORMAT, "kind": "round", "index": len(records), "round_id": round_id,
            "fingerprint": self.fingerprint, "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate), "steps": int(steps), "history": round_history,
            "accountant_state": {"mechanism": self.mechanism, "history": cumulative},
            "epsilon_round": epsilon_of(self.mechanism, round_history, self.delta),
            "epsilon": epsilon_of(self.mechanism, cumulative, self.delta), "delta": self.delta,
            "epsilon_max": None if epsilon_max is None else float(epsilon_max),
            "n_examples": n_examples, "timestamp": _now(), "meta": meta or {}, "prev": records[-1]["hash"],
        }
        try:
            return _seal(json.loads(json.dumps(payload, allow_nan=False)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"round record: expected JSON-serialisable round_id and meta, {exc}") from exc

    def _check_unchanged_on_disk(self) -> None:
        if not self._records and (self._read_marker() is not None or self._find_by_fingerprint() is not None):
            raise LedgerError(
                f"another process recorded the first round of this dataset (lab {self.lab_id!r}) after this "
                f"ledger was opened; reopen the ledger so both rounds are counted"
            )
        on_disk = _load_ledger(self.path) if self.path.exists() else []
        if [r["hash"] for r in on_disk] != [r["hash"] for r in self._records]:
            raise LedgerError(
                f"ledger {self.path} changed on disk since it was opened ({len(on_disk) - 1 if on_disk else 0} "
                f"rounds there, {self.n_rounds} here): another process is training on this dataset, "
                f"or the file was edited; reopen the ledger"
            )

    # ------------------------------------------------------------------ internals: resolution

    def _resolve(self) -> tuple[str, bool]:
        """Find and load this dataset's ledger (via marker, else fingerprint).

        Returns the ledger id and whether the marker must be (re)written.
        """
        marker = self._read_marker()
        if marker is not None:
            return self._load_via_marker(marker)
        found = self._find_by_fingerprint()
        if found is None:
            return uuid.uuid4().hex[:16], False
        ledger_id, records = found
        self._records = records
        if self.marker_path is None:
            return ledger_id, False
        warnings.warn(
            f"dataset {self.dataset_dir} has trained before under ledger {self.lab_dir / ledger_id}.jsonl "
            f"but its marker {self.marker_path} is missing; continuing that ledger and restoring the marker",
            stacklevel=3,
        )
        return ledger_id, True

    def _read_marker(self) -> dict[str, Any] | None:
        path = self.marker_path
        if path is None or not path.exists():
            return None
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(marker, dict) or not isinstance(marker.get("ledger_id"), str):
                raise ValueError("no 'ledger_id'")
            if not re.fullmatch(r"[0-9a-f]{16}", marker["ledger_id"]):
                raise ValueError(f"ledger_id {marker['ledger_id']!r} is not 16 hex digits")
            int(marker["rounds"]), str(marker["head"])
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise LedgerError(f"ledger marker {path} is unreadable or was edited ({exc}); restore it from a backup") from exc
        if marker.get("lab_id") != self.lab_id:
            raise LedgerError(f"ledger marker {path} belongs to lab {marker.get('lab_id')!r}, expected {self.lab_id!r}")
        return marker

    def _load_via_marker(self, marker: dict[str, Any]) -> tuple[str, bool]:
        ledger_id, rounds, head = marker["ledger_id"], int(marker["rounds"]), str(marker["head"])
        path = self.lab_dir / f"{ledger_id}.jsonl"
        if not path.exists():
            raise LedgerError(
                f"privacy ledger {path} is missing, but dataset {self.dataset_dir} has trained {rounds} round(s) "
                f"(epsilon {marker.get('epsilon')}) according to {self.marker_path}; restore the ledger from a "
                f"backup - privacy accounting is never restarted from zero"
            )
        records = _load_ledger(path)
        n_rounds = len(records) - 1
        if n_rounds < rounds or records[rounds]["hash"] != head:
            raise LedgerError(
                f"privacy ledger {path} does not match marker {self.marker_path}: the marker records {rounds} "
                f"round(s) ending in {head[:12]}, the ledger has {n_rounds} round(s) ending in "
                f"{records[-1]['hash'][:12]}; the ledger was truncated, edited or replaced by an older copy"
            )
        self._records = records
        if n_rounds > rounds:
            warnings.warn(
                f"privacy ledger {path} has {n_rounds} rounds, marker {self.marker_path} only {rounds} "
                f"(interrupted write?); keeping the ledger (more privacy spent) and updating the marker",
                stacklevel=3,
            )
        return ledger_id, n_rounds > rounds

    def _find_by_fingerprint(self) -> tuple[str, list[dict[str, Any]]] | None:
        if not self.lab_dir.is_dir():
            return None
        for path in sorted(self.lab_dir.glob("*.jsonl")):
            records = _load_ledger(path)
            if any(r.get("fingerprint") == self.fingerprint for r in records[1:]):
                return path.stem, records
        return None

    def _settle_parameters(self, delta: float | None, accountant: str | None) -> None:
        if self._records:
            genesis = self._records[0]
            recorded_delta, recorded_mech = float(genesis["delta"]), str(genesis["accountant"])
            if delta is not None and float(delta) != recorded_delta:
                raise LedgerError(
                    f"ledger {self.path} reports epsilon at delta={recorded_delta:g}; received delta={delta:g}. "
                    f"Delta is fixed for the life of a ledger"
                )
            if accountant is not None and accountant != recorded_mech:
                raise LedgerError(
                    f"ledger {self.path} uses the {recorded_mech!r} accountant; received {accountant!r}"
                )
            self.delta, self.mechanism = recorded_delta, recorded_mech
            return
        if accountant is not None and accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant: expected one of {ACCOUNTANTS}, received {accountant!r}")
        self.delta = float(delta) if delta is not None else DEFAULT_DELTA
        self.mechanism = accountant or "rdp"

    def _write_marker(self) -> None:
        if self.marker_path is None or not self.has_trained:
            return
        marker = {
            "format": LEDGER_FORMAT, "lab_id": self.lab_id, "ledger_id": self.ledger_id,
            "ledger_file": self.path.name, "rounds": self.n_rounds, "head": self._records[-1]["hash"],
            "epsilon": self._records[-1]["epsilon"], "delta": self.delta, "updated": _now(),
        }
        write_atomic(self.marker_path, (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------- file format


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


def _seal(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "hash": _digest(record)}


def _load_ledger(path: Path) -> list[dict[str, Any]]:
    """Parse and verify a ledger file; raise :class:`LedgerError` naming the first bad line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"privacy ledger {path} is unreadable ({exc})") from exc
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        records.append(_verify_line(path, number, line, records))
    if not records:
        raise LedgerError(f"privacy ledger {path} is empty; expected a genesis record")
    return records


def _verify_line(path: Path, number: int, line: str, previous: list[dict[str, Any]]) -> dict[str, Any]:
    where = f"privacy ledger {path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LedgerError(f"{where}: not valid JSON ({exc}); the ledger was edited or damaged") from exc
    if not isinstance(record, dict) or record.get("hash") != _digest(record):
        raise LedgerError(f"{where}: hash mismatch; the record was edited after it was written")
    expected_prev = previous[-1]["hash"] if previous else _GENESIS_PREV
    expected_kind = "round" if previous else "genesis"
    if record.get("prev") != expected_prev or record.get("kind") != expected_kind:
        raise LedgerError(f"{where}: broken chain (expected a {expected_kind} record after the previous one); "
                          f"records were removed, reordered or inserted")
    if previous and record.get("index") != len(previous):
        raise LedgerError(f"{where}: expected round index {len(previous)}, found {record.get('index')}")
    return record


def _round_from_dict(record: dict[str, Any]) -> RoundRecord:
    return RoundRecord(
        index=record["index"], round_id=record["round_id"], fingerprint=record["fingerprint"],
        noise_multiplier=record["noise_multiplier"], sample_rate=record["sample_rate"], steps=record["steps"],
        history=[tuple(e) for e in record["history"]], epsilon_round=record["epsilon_round"],
        epsilon=record["epsilon"], delta=record["delta"], epsilon_max=record["epsilon_max"],
        n_examples=record["n_examples"], timestamp=record["timestamp"], meta=record["meta"], hash=record["hash"],
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX ``flock``) around a ledger update; no-op elsewhere."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
