"""Privacy ledger: the Opacus accounting of a lab's tiles, persisted across rounds, runs and lab names.

Files
-----
``LEDGER_DIR/<label>/<ledger_id>.jsonl``
    Hash-chained ledger, one JSON object per line: a ``genesis`` record (lab label, accountant
    mechanism, delta), then one ``round`` record per local training round (accountant history,
    hashes of the tiles and images it trained on, dataset fingerprint, epsilon of the round and
    worst-case epsilon after it, budget in force). Every record carries ``prev`` (hash of the
    previous record) and ``hash`` (SHA-256 of its canonical JSON); files are rewritten atomically.
``LEDGER_DIR/resets.jsonl``
    Hash-chained log of deliberate resets (:func:`reset_ledger`).
``DATASET_DIR/.feddp/ledger.json``
    Marker written after every recorded round: the ledger file that continues this dataset, its
    number of rounds and head hash. A ledger file that is deleted, truncated, edited or replaced
    by an older copy then raises :class:`LedgerError` instead of starting again from epsilon = 0.
    A folder without a marker whose tiles have trained before continues the ledger file of their
    latest round (with a warning); folders sharing tiles may thus share a ledger file.

Updates hold an exclusive lock on ``LEDGER_DIR/.lock`` and check that nothing counting for the
dataset changed since it was opened.

Identity and epsilon
--------------------
Privacy is spent by tiles, so tiles, not lab names or folders, carry it. A tile's hash is the
SHA-256 of the SHA-256 digests of its image and mask files; rounds also store the image hashes
alone, so that re-painting a mask does not make an image fresh. Every ledger file under
``LEDGER_DIR`` counts, whatever lab label it was written under: a round counts for a tile now
present if it trained on that tile or its image, unless a reset released it for that tile.
Rounds recorded without a dataset folder count for every tile of a dataset with the same
fingerprint. A tile's privacy loss composes the histories of all rounds that included it; the
dataset's epsilon is the maximum over its tiles, and a budget check adds the next round to each.
Renaming the lab, re-keying, adding tiles or deleting ``.feddp`` therefore never lowers the
epsilon of trained tiles; starting again is :func:`reset_ledger`, which is logged.

Threat model: this detects accidents and casual edits. Someone who can rewrite both the ledger
directory and the dataset folder consistently can still forge history; for that, the federation
server should also keep the epsilon each client reports per round.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from .._atomic import write_atomic
from ..models.checkpoint import file_sha256
from .dataset import dataset_fingerprint, find_pairs
from .errors import BudgetExceededError, LedgerError

LEDGER_FORMAT = 2
DEFAULT_DELTA = 1e-5
ACCOUNTANTS = ("rdp", "prv")
MARKER_DIR = ".feddp"
MARKER_FILE = "ledger.json"
RESETS_FILE = "resets.jsonl"
_GENESIS_PREV = "0" * 64
_LAB_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LEDGER_FILE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}/[0-9a-f]{16}\.jsonl$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

History = list[tuple[float, float, int]]


@dataclass(frozen=True)
class RoundRecord:
    """One recorded local training round (see :meth:`PrivacyLedger.record_round`).

    ``index`` is its 1-based position in its ledger file, ``round_id`` the caller's label (e.g.
    the server round); ``noise_multiplier`` and ``sample_rate`` are those of the first entry of
    the round's accountant ``history``. ``epsilon_round`` is the epsilon of this round alone,
    ``epsilon`` the worst case over the dataset's tiles after it, both at ``delta``;
    ``epsilon_max`` the budget in force, ``n_examples`` the dataset size, ``lab_id`` the label it
    was recorded under (informational), ``tiles`` the content hashes of the tiles it trained on
    (empty without a dataset folder), ``hash`` its chain hash.
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
    lab_id: str = ""
    tiles: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResetRecord:
    """One deliberate reset (see :func:`reset_ledger`): the content hashes of the ``tiles`` released,
    the hashes of the ``rounds`` released for them, and the worst-case ``epsilon`` they had spent.
    """

    index: int
    timestamp: str
    reason: str
    operator: str
    dataset: str
    tiles: tuple[str, ...]
    rounds: tuple[str, ...]
    epsilon: float
    delta: float
    accountant: str
    hash: str


@dataclass(frozen=True)
class TileSpending:
    """Privacy spent by one tile: file stem, content hash, rounds that count, their composed epsilon."""

    name: str
    hash: str
    n_rounds: int
    epsilon: float


@dataclass(frozen=True)
class PrivacyReport:
    """What a dataset has spent (see :func:`privacy_report`): ``epsilon`` is the worst case over the
    ``tiles``; ``rounds`` count for at least one tile (oldest first); ``resets`` released some of them.
    """

    ledger_dir: Path
    dataset_dir: Path
    epsilon: float
    delta: float
    accountant: str
    rounds: list[RoundRecord]
    tiles: list[TileSpending]
    resets: list[ResetRecord]
    ledger_file: Path | None


def compose(history: Sequence[Sequence[float]], more: Sequence[Sequence[float]]) -> History:
    """Concatenate accountant histories, merging equal consecutive (sigma, q) entries as Opacus does."""
    out: History = [(float(s), float(q), int(n)) for s, q, n in history]
    for sigma, rate, steps in more:
        if out and out[-1][0] == float(sigma) and out[-1][1] == float(rate):
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(steps))
        else:
            out.append((float(sigma), float(rate), int(steps)))
    return out


def epsilon_of(mechanism: str, history: Sequence[Sequence[float]], delta: float) -> float:
    """Epsilon at ``delta`` of an accountant history (0.0 for an empty history)."""
    key = tuple((float(s), float(q), int(n)) for s, q, n in compose([], history) if int(n) > 0)
    return _cached_epsilon(mechanism, key, float(delta))


@functools.lru_cache(maxsize=256)
def _cached_epsilon(mechanism: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(history)
    if mechanism == "prv":
        return float(accountant.get_epsilon(delta=delta, eps_error=0.01))
    return float(accountant.get_epsilon(delta=delta))


def _check_delta(delta: float | None) -> None:
    if delta is not None and not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta: expected a number in (0, 1), received {delta!r}")


def _check_step_args(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier: expected a positive finite number, received {noise_multiplier!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate: expected a number in (0, 1], received {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, received {steps!r}")


def tile_hashes(dataset_dir: str | Path) -> dict[str, tuple[str, str]]:
    """Tile name -> ``(tile_hash, image_hash)`` of a dataset folder (raises like :func:`find_pairs`).

    ``image_hash`` is the SHA-256 of the image file, ``tile_hash`` the SHA-256 of the image's and
    the mask's SHA-256 digests; file names do not count.
    """
    out: dict[str, tuple[str, str]] = {}
    for pair in find_pairs(dataset_dir):
        image, mask = file_sha256(pair.image_path), file_sha256(pair.mask_path)
        out[pair.name] = (hashlib.sha256(image + mask).hexdigest(), image.hex())
    return out


class _Unit(NamedTuple):
    """What DP protects: one tile, or the whole dataset when no folder is known."""

    name: str
    hash: str
    keys: frozenset[str]


def _dataset_units(dataset_dir: Path | None, fingerprint: str) -> tuple[_Unit, ...]:
    if dataset_dir is None:
        return (_Unit("dataset", fingerprint, frozenset({f"fingerprint:{fingerprint}"})),)
    return tuple(_Unit(name, tile, frozenset({f"tile:{tile}", f"image:{image}"}))
                 for name, (tile, image) in tile_hashes(dataset_dir).items())


def _unit_fields(units: Sequence[_Unit]) -> dict[str, list[str]]:
    """The ``tiles``/``images`` lists stored in round and reset records."""
    keys = set().union(*(u.keys for u in units))
    return {"tiles": sorted(k.removeprefix("tile:") for k in keys if k.startswith("tile:")),
            "images": sorted(k.removeprefix("image:") for k in keys if k.startswith("image:"))}


def _record_keys(record: dict[str, Any]) -> frozenset[str]:
    return frozenset([f"tile:{t}" for t in record.get("tiles", ())]
                     + [f"image:{i}" for i in record.get("images", ())]
                     + [f"fingerprint:{record.get('fingerprint')}"])


class _Store(NamedTuple):
    """Everything read (and verified) from a ledger directory."""

    ledgers: dict[str, list[dict[str, Any]]]
    resets: list[dict[str, Any]]


def _read_store(ledger_dir: Path) -> _Store:
    ledgers: dict[str, list[dict[str, Any]]] = {}
    if ledger_dir.is_dir():
        for path in sorted(ledger_dir.glob("*/*.jsonl")):
            if not path.name.startswith("."):
                ledgers[path.relative_to(ledger_dir).as_posix()] = _load_chain(path, resets=False)
    resets_path = ledger_dir / RESETS_FILE
    return _Store(ledgers, _load_chain(resets_path, resets=True) if resets_path.exists() else [])


class _Spending(NamedTuple):
    """The rounds that count for each unit of a dataset: ``(ledger file, record)`` and indices per unit."""

    rounds: tuple[tuple[str, dict[str, Any]], ...]
    per_unit: tuple[tuple[int, ...], ...]

    def signature(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(self.rounds[i][1]["hash"] for i in members) for members in self.per_unit)

    def history(self, members: Sequence[int]) -> History:
        return compose([], [entry for i in sorted(members) for entry in self.rounds[i][1]["history"]])

    def worst(self, mechanism: str, delta: float, more: Sequence[Sequence[float]] = ()) -> tuple[float, History]:
        """Largest epsilon over the units (with ``more`` added to each) and the history behind it."""
        # Composition only grows epsilon, so a unit whose rounds are a subset of another's cannot be the worst.
        kept: list[frozenset[int]] = []
        for members in sorted({frozenset(m) for m in self.per_unit}, key=lambda m: (-len(m), sorted(m))):
            if not any(members <= other for other in kept):
                kept.append(members)
        histories = [compose(self.history(members), more) for members in kept]
        epsilon, history = max(((epsilon_of(mechanism, h, delta), h) for h in histories), key=lambda e: e[0],
                               default=(0.0, []))
        return max(epsilon, 0.0), history


def _spending(units: tuple[_Unit, ...], store: _Store, fingerprint: str) -> _Spending:
    released = [set().union(*(r["rounds"] for r in store.resets if unit.keys & _record_keys(r))) for unit in units]
    candidates = sorted(((record["timestamp"], name, record["index"], record)
                         for name, records in store.ledgers.items() for record in records[1:]),
                        key=lambda entry: entry[:3])
    rounds: list[tuple[str, dict[str, Any]]] = []
    per_unit: list[list[int]] = [[] for _ in units]
    seen: set[str] = set()
    for _, name, _, record in candidates:
        # A copy of a ledger file kept in the directory (a backup) holds the same records: count each once.
        if record["hash"] in seen:
            continue
        seen.add(record["hash"])
        keys = _record_keys(record)
        untiled = not record.get("tiles") and record.get("fingerprint") == fingerprint
        hits = [i for i, unit in enumerate(units) if (untiled or unit.keys & keys) and record["hash"] not in released[i]]
        for i in hits:
            per_unit[i].append(len(rounds))
        if hits:
            rounds.append((name, record))
    return _Spending(tuple(rounds), tuple(tuple(m) for m in per_unit))


class _Opened(NamedTuple):
    store: _Store
    spending: _Spending
    chain: str | None
    repair_marker: bool


def _open_dataset(ledger_dir: Path, units: tuple[_Unit, ...], fingerprint: str, dataset_dir: Path | None, *,
                  warn: bool) -> _Opened:
    """Read the ledger directory for a dataset, find the ledger file that continues it, check its marker."""
    store = _read_store(ledger_dir)
    spending = _spending(units, store, fingerprint)
    marker_path = _marker_path(dataset_dir)
    marker = _read_marker(marker_path)
    if marker is None:
        if not spending.rounds:
            return _Opened(store, spending, None, False)
        chain = spending.rounds[-1][0]
        if marker_path is not None and warn:
            warnings.warn(
                f"dataset {dataset_dir} holds tiles that trained before ({len(spending.rounds)} round(s), latest in "
                f"ledger {ledger_dir / chain}) but has no marker {marker_path} (deleted, or tiles copied from another "
                f"folder); continuing that ledger and writing the marker",
                stacklevel=3,
            )
        return _Opened(store, spending, chain, marker_path is not None)
    chain, rounds, head = marker["ledger_file"], int(marker["rounds"]), str(marker["head"])
    path = ledger_dir / chain
    if chain not in store.ledgers:
        raise LedgerError(
            f"privacy ledger {path} is missing, but dataset {dataset_dir} has trained {rounds} round(s) "
            f"(epsilon {marker.get('epsilon')}) according to {marker_path}; restore the ledger from a "
            f"backup - privacy accounting is never restarted from zero"
        )
    records = store.ledgers[chain]
    n_rounds = len(records) - 1
    if n_rounds < rounds or records[rounds]["hash"] != head:
        raise LedgerError(
            f"privacy ledger {path} does not match marker {marker_path}: the marker records {rounds} "
            f"round(s) ending in {head[:12]}, the ledger has {n_rounds} round(s) ending in "
            f"{records[-1]['hash'][:12]}; the ledger was truncated, edited or replaced by an older copy"
        )
    counted = {record["hash"] for _, record in spending.rounds}
    # Rounds another folder appended for tiles this dataset no longer holds are no news to this dataset.
    if warn and any(record["hash"] in counted for record in records[rounds + 1:]):
        warnings.warn(
            f"privacy ledger {path} has {n_rounds} rounds, marker {marker_path} only {rounds} (an interrupted "
            f"write, or rounds recorded from another folder holding some of these tiles); keeping the ledger "
            f"(more privacy spent) and updating the marker",
            stacklevel=3,
        )
    return _Opened(store, spending, chain, n_rounds > rounds)


def _marker_path(dataset_dir: Path | None) -> Path | None:
    return None if dataset_dir is None else dataset_dir / MARKER_DIR / MARKER_FILE


def _read_marker(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(marker, dict) or not _LEDGER_FILE_PATTERN.match(str(marker.get("ledger_file"))):
            raise ValueError(f"ledger_file {marker['ledger_file']!r} is not '<lab>/<16 hex digits>.jsonl'")
        int(marker["rounds"]), str(marker["head"])
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise LedgerError(f"ledger marker {path} is unreadable or was edited ({exc}); restore it from a backup") from exc
    return marker


def _parameters(opened: _Opened, delta: float | None, accountant: str | None) -> tuple[float, str]:
    """Delta and mechanism: given ones, else those of the dataset's ledger file, else the defaults."""
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant: expected one of {ACCOUNTANTS}, received {accountant!r}")
    genesis = opened.store.ledgers[opened.chain][0] if opened.chain else {}
    return (float(delta) if delta is not None else float(genesis.get("delta", DEFAULT_DELTA)),
            accountant or str(genesis.get("accountant", "rdp")))


class PrivacyLedger:
    """Persistent privacy accounting of a lab's dataset, tile by tile, across rounds, runs and lab names.

    Parameters
    ----------
    path_dir : str or Path
        The lab's ledger directory (outside the dataset; back it up). Every ledger file in it
        counts, whatever lab label it was written under.
    lab_id : str
        Label of the lab (letters, digits, ``.``, ``_``, ``-``): names the folder of a new ledger
        file and is stored with each round; it does not decide which rounds count.
    dataset_fingerprint : str
        :func:`~napari_feddp.training.dataset_fingerprint` of the dataset now.
    dataset_dir : str, Path or None
        The dataset folder: its tiles are hashed and it receives the ``.feddp`` marker. Without
        it the whole dataset is one unit identified by its fingerprint, and a deleted ledger
        cannot be detected.
    delta, accountant : float, {"rdp", "prv"} or None
        Delta at which epsilon is reported and Opacus mechanism; default those of the dataset's
        ledger file, else :data:`DEFAULT_DELTA` and ``"rdp"``. Both are fixed for a ledger's life.

    Raises
    ------
    LedgerError
        If the dataset's ledger file is missing, a hash chain is broken, the ledger and the marker
        disagree, or delta or accountant differ from the recorded ones.
    DatasetError
        If ``dataset_dir`` is not a valid dataset folder.
    """

    def __init__(self, path_dir: str | Path, lab_id: str, dataset_fingerprint: str, *,
                 dataset_dir: str | Path | None = None, delta: float | None = None,
                 accountant: str | None = None) -> None:
        if not isinstance(lab_id, str) or not _LAB_PATTERN.match(lab_id):
            raise ValueError(f"lab_id: expected 1-64 letters, digits, '.', '_' or '-' (starting with a letter or "
                             f"digit), received {lab_id!r}")
        if not isinstance(dataset_fingerprint, str) or not dataset_fingerprint:
            raise ValueError(f"dataset_fingerprint: expected a non-empty string, received {dataset_fingerprint!r}")
        _check_delta(delta)
        self.ledger_dir = Path(path_dir)
        self.lab_id = lab_id
        self.fingerprint = dataset_fingerprint
        self.dataset_dir = Path(dataset_dir) if dataset_dir is not None else None
        self._units = _dataset_units(self.dataset_dir, dataset_fingerprint)
        opened = _open_dataset(self.ledger_dir, self._units, self.fingerprint, self.dataset_dir, warn=True)
        self._chain = opened.chain or f"{lab_id}/{uuid.uuid4().hex[:16]}.jsonl"
        self._records: list[dict[str, Any]] = opened.store.ledgers.get(self._chain, [])
        self._spending = opened.spending
        genesis = self._records[0] if self._records else {}
        if genesis and delta is not None and float(delta) != float(genesis["delta"]):
            raise LedgerError(
                f"ledger {self.path} reports epsilon at delta={genesis['delta']:g}; received delta={delta:g}. "
                f"Delta is fixed for the life of a ledger"
            )
        if genesis and accountant is not None and accountant != genesis["accountant"]:
            raise LedgerError(f"ledger {self.path} uses the {genesis['accountant']!r} accountant; received {accountant!r}")
        self.delta, self.mechanism = _parameters(opened, delta, accountant)
        if opened.repair_marker:
            self._write_marker()

    @property
    def ledger_id(self) -> str:
        """Id of the ledger file this dataset's rounds are appended to."""
        return Path(self._chain).stem

    @property
    def path(self) -> Path:
        """The ledger file new rounds go to (may not exist before the first round)."""
        return self.ledger_dir / self._chain

    @property
    def marker_path(self) -> Path | None:
        """The marker in the dataset folder, or ``None`` without ``dataset_dir``."""
        return _marker_path(self.dataset_dir)

    @property
    def n_rounds(self) -> int:
        """Number of rounds that count for at least one tile."""
        return len(self._spending.rounds)

    @property
    def epsilon(self) -> float:
        """Worst-case epsilon over the dataset's tiles at :attr:`delta`, recomputed from the stored histories."""
        return self._spending.worst(self.mechanism, self.delta)[0]

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Worst-case epsilon over the tiles if a round of ``steps`` DP-SGD steps at these parameters were added."""
        _check_step_args(noise_multiplier, sample_rate, steps)
        more = [(noise_multiplier, sample_rate, steps)] if steps else []
        return self._spending.worst(self.mechanism, self.delta, more)[0]

    def check_budget(self, noise_multiplier: float, sample_rate: float, steps: int, epsilon_max: float | None) -> float:
        """Predicted worst-case epsilon after the next round; raise if it exceeds the budget.

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
                f"to {after:.3f} at delta={self.delta:g} (worst case over {len(self._units)} tile(s), "
                f"{self.n_rounds} earlier round(s)), above the budget epsilon_max={epsilon_max:g} "
                f"(ledgers in {self.ledger_dir})",
                epsilon_spent=spent, epsilon_next=after, epsilon_max=float(epsilon_max),
            )
        return after

    def record_round(self, *, noise_multiplier: float, sample_rate: float, steps: int,
                     history: Sequence[Sequence[float]] | None = None, n_examples: int | None = None,
                     round_id: Any = None, epsilon_max: float | None = None,
                     meta: dict[str, Any] | None = None) -> RoundRecord:
        """Append a round on every tile of the dataset to the ledger (atomically) and update the marker.

        Parameters
        ----------
        noise_multiplier, sample_rate, steps
            DP-SGD parameters and number of noisy steps of the round.
        history : sequence of (sigma, q, steps) or None
            The round's own accountant history (e.g. that of a fresh Opacus engine); default
            ``[(noise_multiplier, sample_rate, steps)]``. Its step count must equal ``steps``.
        n_examples, round_id, epsilon_max, meta
            Stored with the record; ``meta`` must be JSON-serialisable.

        Returns
        -------
        RoundRecord
            The stored record, with the worst-case ``epsilon`` after it.

        Raises
        ------
        LedgerError
            If a ledger holding rounds of these tiles changed on disk since this one was opened.
        """
        _check_step_args(noise_multiplier, sample_rate, steps)
        round_history = compose([], history if history is not None else [(noise_multiplier, sample_rate, steps)])
        if sum(n for _, _, n in round_history) != steps:
            raise ValueError(f"history: expected {steps} steps in total to match 'steps', received {round_history}")
        with _locked(self.ledger_dir / ".lock"):
            store = self._check_unchanged_on_disk()
            records = self._records or [_seal({
                "format": LEDGER_FORMAT, "kind": "genesis", "lab_id": self.lab_id, "ledger_id": self.ledger_id,
                "accountant": self.mechanism, "delta": self.delta, "created": _now(), "prev": _GENESIS_PREV,
            })]
            epsilon, worst_history = self._spending.worst(self.mechanism, self.delta, round_history)
            payload = {
                "format": LEDGER_FORMAT, "kind": "round", "index": len(records), "round_id": round_id,
                "lab_id": self.lab_id, "fingerprint": self.fingerprint, **_unit_fields(self._units),
                "noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate), "steps": int(steps),
                "history": round_history, "accountant_state": {"mechanism": self.mechanism, "history": worst_history},
                "epsilon_round": epsilon_of(self.mechanism, round_history, self.delta), "epsilon": epsilon,
                "delta": self.delta, "epsilon_max": None if epsilon_max is None else float(epsilon_max),
                "n_examples": n_examples, "timestamp": _now(), "meta": meta or {}, "prev": records[-1]["hash"],
            }
            try:
                record = _seal(json.loads(json.dumps(payload, allow_nan=False)))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"round record: expected JSON-serialisable round_id and meta, {exc}") from exc
            records = records + [record]
            write_atomic(self.path, "".join(_canonical(r) + "\n" for r in records))
            self._records = records
            self._spending = _spending(self._units, _Store({**store.ledgers, self._chain: records}, store.resets),
                                       self.fingerprint)
            self._write_marker()
        return _round_from_dict(record)

    def _check_unchanged_on_disk(self) -> _Store:
        store = _read_store(self.ledger_dir)
        now = _spending(self._units, store, self.fingerprint)
        if not self._records and (_read_marker(self.marker_path) is not None or now.rounds):
            raise LedgerError(
                f"another process recorded the first round of this dataset (lab {self.lab_id!r}) after this "
                f"ledger was opened; reopen the ledger so both rounds are counted"
            )
        on_disk = [r["hash"] for r in store.ledgers.get(self._chain, [])]
        if on_disk != [r["hash"] for r in self._records] or now.signature() != self._spending.signature():
            raise LedgerError(
                f"ledger {self.path} changed on disk since it was opened ({len(now.rounds)} round(s) of these tiles "
                f"there, {self.n_rounds} here): another process is training on these tiles, a reset was "
                f"recorded, or a file was edited; reopen the ledger"
            )
        return store

    def _write_marker(self) -> None:
        if self.marker_path is None or len(self._records) < 2:
            return
        marker = {
            "format": LEDGER_FORMAT, "lab_id": self.lab_id, "ledger_id": self.ledger_id,
            "ledger_file": self._chain, "rounds": len(self._records) - 1, "head": self._records[-1]["hash"],
            "epsilon": self.epsilon, "delta": self.delta, "updated": _now(),
        }
        write_atomic(self.marker_path, json.dumps(marker, indent=2, sort_keys=True) + "\n")


def privacy_report(ledger_dir: str | Path, dataset_dir: str | Path, *, delta: float | None = None,
                   accountant: str | None = None) -> PrivacyReport:
    """What a dataset's tiles have spent, read from a ledger directory without writing anything.

    ``delta`` and ``accountant`` default to those of the dataset's ledger file, else
    :data:`DEFAULT_DELTA` and ``"rdp"``. Raises :class:`LedgerError` as :class:`PrivacyLedger`
    does for missing or tampered ledgers, ``DatasetError`` for an invalid dataset folder.
    """
    ledger_dir, dataset_dir = Path(ledger_dir), Path(dataset_dir)
    _check_delta(delta)
    fingerprint = dataset_fingerprint(dataset_dir)
    units = _dataset_units(dataset_dir, fingerprint)
    opened = _open_dataset(ledger_dir, units, fingerprint, dataset_dir, warn=False)
    delta, mechanism = _parameters(opened, delta, accountant)
    spending = opened.spending
    tiles = [TileSpending(unit.name, unit.hash, len(members), epsilon_of(mechanism, spending.history(members), delta))
             for unit, members in zip(units, spending.per_unit)]
    unit_keys = frozenset().union(*(u.keys for u in units))
    return PrivacyReport(
        ledger_dir=ledger_dir, dataset_dir=dataset_dir, epsilon=spending.worst(mechanism, delta)[0], delta=delta,
        accountant=mechanism, rounds=[_round_from_dict(r) for _, r in spending.rounds], tiles=tiles,
        resets=[_reset_from_dict(r) for r in opened.store.resets if _record_keys(r) & unit_keys],
        ledger_file=ledger_dir / opened.chain if opened.chain else None,
    )


def reset_ledger(ledger_dir: str | Path, dataset_dir: str | Path, *, reason: str, operator: str = "") -> ResetRecord:
    """Deliberately start the privacy budget of a dataset's tiles again from zero, and log it.

    Appends a ``reset`` record (time, ``reason``, ``operator``, the tiles released, the rounds
    released for them and the epsilon they had spent) to ``LEDGER_DIR/resets.jsonl``. Later
    ledgers opened on these tiles no longer count those rounds. Nothing is deleted, so the
    history remains auditable.

    Raises
    ------
    ValueError
        If ``reason`` is empty, or the dataset has spent nothing.
    LedgerError
        If the ledgers are missing or tampered with (a reset does not repair them).
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"reason: expected a non-empty explanation of why the privacy budget starts again, "
                         f"received {reason!r}")
    if not isinstance(operator, str):
        raise ValueError(f"operator: expected a string, received {operator!r}")
    ledger_dir, dataset_dir = Path(ledger_dir), Path(dataset_dir)
    fingerprint = dataset_fingerprint(dataset_dir)
    units = _dataset_units(dataset_dir, fingerprint)
    with _locked(ledger_dir / ".lock"):
        opened = _open_dataset(ledger_dir, units, fingerprint, dataset_dir, warn=False)
        spending = opened.spending
        if not spending.rounds:
            raise ValueError(f"dataset {dataset_dir} has spent no privacy budget in {ledger_dir}: nothing to reset")
        delta, mechanism = _parameters(opened, None, None)
        trained = [unit for unit, members in zip(units, spending.per_unit) if members]
        released = sorted(record["hash"] for _, record in spending.rounds)
        previous = opened.store.resets
        record = _seal({
            "format": LEDGER_FORMAT, "kind": "reset", "index": len(previous) + 1, "timestamp": _now(),
            "reason": reason.strip(), "operator": operator.strip(), "dataset": str(dataset_dir.resolve()),
            "fingerprint": fingerprint, **_unit_fields(trained), "rounds": released,
            "epsilon": spending.worst(mechanism, delta)[0], "delta": delta, "accountant": mechanism,
            "prev": previous[-1]["hash"] if previous else _GENESIS_PREV,
        })
        write_atomic(ledger_dir / RESETS_FILE, "".join(_canonical(r) + "\n" for r in [*previous, record]))
    return _reset_from_dict(record)


# --------------------------------------------------------------------------- file format


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


def _seal(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "hash": _digest(record)}


def _load_chain(path: Path, *, resets: bool) -> list[dict[str, Any]]:
    """Parse and verify a ledger file or the reset log; raise :class:`LedgerError` naming the first bad line."""
    what = "reset log" if resets else "privacy ledger"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{what} {path} is unreadable ({exc})") from exc
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        where = f"{what} {path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LedgerError(f"{where}: not valid JSON ({exc}); the file was edited or damaged") from exc
        if not isinstance(record, dict) or record.get("hash") != _digest(record):
            raise LedgerError(f"{where}: hash mismatch; the record was edited after it was written")
        kind = "reset" if resets else ("round" if records else "genesis")
        if record.get("prev") != (records[-1]["hash"] if records else _GENESIS_PREV) or record.get("kind") != kind:
            raise LedgerError(f"{where}: broken chain (expected a {kind} record after the previous one); "
                              f"records were removed, reordered or inserted")
        index = len(records) + 1 if resets else len(records)
        if kind != "genesis" and record.get("index") != index:
            raise LedgerError(f"{where}: expected index {index}, found {record.get('index')}")
        if kind != "genesis" and not _well_formed(record, resets):
            raise LedgerError(f"{where}: malformed {kind} record (tile hashes, rounds or history)")
        records.append(record)
    if not records and not resets:
        raise LedgerError(f"privacy ledger {path} is empty; expected a genesis record")
    return records


def _well_formed(record: dict[str, Any], resets: bool) -> bool:
    hashes = [*record.get("tiles", []), *record.get("images", []), *(record.get("rounds", []) if resets else [])]
    if not all(isinstance(h, str) and _HEX64.match(h) for h in hashes) or not isinstance(record.get("timestamp"), str):
        return False
    if resets:
        return isinstance(record.get("rounds"), list)
    history = record.get("history")
    return isinstance(history, list) and all(isinstance(e, list) and len(e) == 3 for e in history)


def _round_from_dict(record: dict[str, Any]) -> RoundRecord:
    return _from_dict(RoundRecord, record, history=[tuple(e) for e in record["history"]],
                      lab_id=str(record.get("lab_id", "")), tiles=tuple(record.get("tiles", ())))


def _reset_from_dict(record: dict[str, Any]) -> ResetRecord:
    return _from_dict(ResetRecord, record, tiles=tuple(record["tiles"]), rounds=tuple(record["rounds"]))


def _from_dict(cls: type, record: dict[str, Any], **converted: Any) -> Any:
    """``cls`` from a verified record: its fields as stored, except the ``converted`` ones."""
    return cls(**{f.name: record[f.name] for f in fields(cls) if f.name not in converted}, **converted)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


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
