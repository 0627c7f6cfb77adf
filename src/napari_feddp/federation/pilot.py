"""A whole federation on one machine: SuperLink + SuperNodes + ``flwr run``.

:class:`LocalFederation` is what ``napari-feddp federation demo`` and the tests
use; the same building blocks (:mod:`.processes`, :mod:`.flwr_cli`,
:mod:`.certs`) back ``serve``, ``join`` and ``run`` on separate machines.

Everything listens on 127.0.0.1 with OS-assigned ports, every Flower process
has a private ``FLWR_HOME`` under the work directory, and leaving the
``with`` block (normally, by exception or Ctrl-C) stops every process.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .app_bundle import write_app_dir
from .certs import NodeKeyPair, PilotPKI, create_node_keys, create_pilot_pki, load_pilot_pki, validate_lab_name
from .checkpoints import EVALUATION_FILE, SUMMARY_FILE, read_json, read_rounds
from .flwr_cli import FlowerCli, FlowerCliError
from .processes import FederationProcessError, SuperLinkProcess, SuperNodeProcess
from .settings import NodeSettings, RunSettings

if TYPE_CHECKING:
    from .coordinator import Coordinator


class FederationRunError(RuntimeError):
    """A federated run failed, timed out, or ended without completing."""


@dataclass
class LabSpec:
    """One simulated lab.

    Attributes
    ----------
    name : str
        Lab name (also its SuperNode key name).
    data_dir : path
        Folder with ``images/`` and ``masks/``.
    max_epsilon : float
        Privacy budget (0: unlimited).
    train_fn, eval_fn : str
        Optional ``module:function`` replacements of the local steps.
    extra_env : mapping, optional
        Extra environment for the lab's processes (e.g. ``PYTHONPATH``).
    register : bool
        Register the lab's public key with the SuperLink (False simulates an
        unknown lab, which the SuperLink must refuse).
    eval_dir : path, optional
        Held-out tiles for the final evaluation (default: ``data_dir``).
    policy : mapping, optional
        Lab privacy-policy fields of :class:`NodeSettings` (e.g.
        ``{"accept_dp_modes": "sample,none"}``).
    """

    name: str
    data_dir: Path
    max_epsilon: float = 0.0
    train_fn: str = ""
    eval_fn: str = ""
    extra_env: Mapping[str, str] | None = None
    register: bool = True
    eval_dir: Path | None = None
    policy: Mapping[str, object] = field(default_factory=dict)


@dataclass
class RunOutcome:
    """Result of :meth:`LocalFederation.run`."""

    run_id: int
    status: str
    rounds: list[dict]
    evaluation: dict | None
    summary: dict | None
    checkpoint_dir: Path
    seconds: float


@dataclass
class LocalFederation:
    """SuperLink and one SuperNode per lab on loopback, as a context manager.

    Parameters
    ----------
    workdir : path, optional
        Logs, Flower homes, PKI, app directory. Default: a temporary directory
        removed on exit (kept when ``keep_workdir``).
    labs : list of LabSpec
    insecure : bool
        Plain text, no node authentication (explicit opt-in, warns).
    pki_dir : path, optional
        Existing PKI from ``federation certs`` (default: created in workdir).
    ledger_dir : path, optional
        Root of the labs' privacy ledgers (default: ``workdir/ledgers``).
    threads : int
        Torch threads per ClientApp.
    ready_timeout : float
        Seconds to wait for each process to be ready.
    """

    workdir: Path | None = None
    labs: list[LabSpec] = field(default_factory=list)
    insecure: bool = False
    pki_dir: Path | None = None
    ledger_dir: Path | None = None
    threads: int = 1
    ready_timeout: float = 120.0
    keep_workdir: bool = False
    coordinator: Coordinator | None = field(default=None, init=False)
    superlink: SuperLinkProcess | None = field(default=None, init=False)
    supernodes: dict[str, SuperNodeProcess] = field(default_factory=dict, init=False)
    cli: FlowerCli | None = field(default=None, init=False)
    pki: PilotPKI | None = field(default=None, init=False)
    lab_keys: dict[str, NodeKeyPair] = field(default_factory=dict, init=False)
    _tempdir: str | None = field(default=None, init=False)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> LocalFederation:
        """Create PKI, start the coordinator, make and register lab keys, start SuperNodes."""
        from .coordinator import Coordinator

        if self.workdir is None:
            self._tempdir = tempfile.mkdtemp(prefix="feddp-federation-")
            self.workdir = Path(self._tempdir)
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        names = [validate_lab_name(lab.name) for lab in self.labs]
        if len(set(names)) != len(names):
            raise ValueError(f"lab names must be unique: {names}")
        if not self.insecure:
            self.pki = load_pilot_pki(self.pki_dir) if self.pki_dir is not None else create_pilot_pki(self.workdir / "pki")
            for lab in self.labs:
                self.lab_keys[lab.name] = self._lab_keys(lab.name)
        self.coordinator = Coordinator(
            self.workdir / "coordinator",
            self.pki,
            insecure=self.insecure,
            public_keys={lab.name: self.lab_keys[lab.name].public_key
                         for lab in self.labs if lab.register and not self.insecure},
            ready_timeout=self.ready_timeout,
        ).start()  # fmt: skip
        self.superlink, self.cli = self.coordinator.superlink, self.coordinator.cli
        for lab in self.labs:
            self.add_node(lab, wait=False, register=False)
        for node in self.supernodes.values():
            node.wait_ready(self.ready_timeout)
        return self

    def _lab_keys(self, lab: str) -> NodeKeyPair:
        """The lab's own key pair, made in the lab's folder (only the public key is registered)."""
        keys = self.workdir / "labs" / lab / "keys"
        if (keys / f"{lab}.key").exists():
            return NodeKeyPair(lab=lab, private_key=keys / f"{lab}.key", public_key=keys / f"{lab}.pub")
        return create_node_keys(keys, lab)

    def register(self, lab: str) -> int:
        """Register ``lab``'s public key (the lab makes its key pair if needed)."""
        assert self.coordinator is not None, "start() first"
        if lab not in self.lab_keys:
            self.lab_keys[lab] = self._lab_keys(lab)
        return self.coordinator.register(self.lab_keys[lab].public_key, lab)

    def add_node(
        self, lab: LabSpec, *, wait: bool = True, register: bool | None = None, **node_kwargs
    ) -> SuperNodeProcess:
        """Register (if ``lab.register``) and start the SuperNode of ``lab``.

        Parameters
        ----------
        lab : LabSpec
        wait : bool
            Wait until the SuperLink accepted the node.
        register : bool, optional
            Override ``lab.register`` (False: already registered).
        **node_kwargs
            Passed to :class:`SuperNodeProcess` (``max_retries`` ...).
        """
        assert self.superlink is not None and self.cli is not None, "start() first"
        validate_lab_name(lab.name)
        private_key = None
        if not self.insecure:
            if lab.register if register is None else register:
                self.register(lab.name)
            elif lab.name not in self.lab_keys:
                self.lab_keys[lab.name] = self._lab_keys(lab.name)
            private_key = self.lab_keys[lab.name].private_key
        node_settings = NodeSettings(
            lab=lab.name,
            data_dir=str(Path(lab.data_dir).resolve()),
            ledger_dir=str((self.ledger_dir or self.workdir / "ledgers").resolve()),
            max_epsilon=float(lab.max_epsilon),
            eval_dir=str(Path(lab.eval_dir).resolve()) if lab.eval_dir else "",
            model_store=str(self.workdir / "model-stores" / lab.name),
            history_file=str(self.workdir / "supernodes" / lab.name / "history.jsonl"),
            train_fn=lab.train_fn,
            eval_fn=lab.eval_fn,
            threads=self.threads,
            **lab.policy,
        )
        node = SuperNodeProcess(
            name=lab.name,
            workdir=self.workdir / "supernodes" / lab.name,
            superlink_address=self.superlink.fleet_address,
            root_cert=None if self.insecure else self.pki.ca.cert,
            private_key=private_key,
            node_config=node_settings.to_node_config(),
            insecure=self.insecure,
            extra_env=lab.extra_env,
            ready_timeout=self.ready_timeout,
            **node_kwargs,
        )
        self.supernodes[lab.name] = node
        node.start(wait=wait)
        return node

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink; remove a temporary workdir."""
        for node in list(self.supernodes.values()):
            with contextlib.suppress(Exception):
                node.stop(timeout=10)
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                self.coordinator.stop()
        if self._tempdir and not self.keep_workdir:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    # ------------------------------------------------------------------ runs

    def run(
        self,
        settings: RunSettings,
        *,
        timeout: float = 900.0,
        on_round: Callable[[dict], None] | None = None,
        on_poll: Callable[[], None] | None = None,
        poll: float = 0.5,
    ) -> RunOutcome:
        """Start a run with ``flwr run`` and wait for it.

        Parameters
        ----------
        settings : RunSettings
            Run config; an empty ``checkpoint_dir`` becomes ``workdir/checkpoints``.
        timeout : float
            Seconds before the run is stopped and FederationRunError raised.
        on_round : callable, optional
            Called with each new ``rounds.jsonl`` record as it appears.
        on_poll : callable, optional
            Called on every poll (tests use it to kill a node mid-round).
        poll : float
            Seconds between polls of the checkpoint directory.

        Returns
        -------
        RunOutcome

        Raises
        ------
        FederationRunError
            If the run fails, does not complete in time, or the SuperLink dies.
        """
        assert self.cli is not None and self.superlink is not None, "start() first"
        if not settings.checkpoint_dir:
            settings = settings.replace(checkpoint_dir=str(self.workdir / "checkpoints"))
        checkpoint_dir = Path(settings.checkpoint_dir).resolve()
        settings = settings.replace(checkpoint_dir=str(checkpoint_dir))
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for stale in (SUMMARY_FILE, EVALUATION_FILE, "rounds.jsonl"):
            (checkpoint_dir / stale).unlink(missing_ok=True)
        app_dir = write_app_dir(self.workdir / "app", settings)
        started = time.monotonic()
        run_id = self.cli.start_run(app_dir)
        return wait_for_run(
            self.cli,
            run_id,
            checkpoint_dir,
            timeout=timeout,
            on_round=on_round,
            on_poll=on_poll,
            poll=poll,
            started=started,
            alive=lambda: self.superlink is not None and self.superlink.is_running(),
        )


def wait_for_run(
    cli: FlowerCli,
    run_id: int,
    checkpoint_dir: Path,
    *,
    timeout: float,
    on_round: Callable[[dict], None] | None = None,
    on_poll: Callable[[], None] | None = None,
    poll: float = 0.5,
    started: float | None = None,
    alive: Callable[[], bool] | None = None,
    status_every: float = 10.0,
) -> RunOutcome:
    """Follow a run through its checkpoint directory and ``flwr list``.

    The ServerApp's ``summary.json`` is read every ``poll`` seconds (cheap);
    ``flwr list`` is asked every ``status_every`` seconds, which catches a
    ServerApp that died before writing a summary.
    """
    started = time.monotonic() if started is None else started
    deadline = started + timeout
    seen = 0
    last_status = 0.0
    status = "running"

    def emit_rounds() -> list[dict]:
        nonlocal seen
        rows = read_rounds(checkpoint_dir)
        for row in rows[seen:]:
            if on_round is not None:
                on_round(row)
        seen = len(rows)
        return rows

    try:
        while True:
            emit_rounds()
            if on_poll is not None:
                on_poll()
            summary = read_json(checkpoint_dir, SUMMARY_FILE)
            if summary and summary.get("status") in ("completed", "failed"):
                status = f"finished:{summary['status']}"
                break
            now = time.monotonic()
            if now - last_status > status_every:
                last_status = now
                info = cli.run_info(run_id)
                status = str(info.get("status", ""))
                if status.startswith("finished"):
                    time.sleep(poll)  # a summary written just before the end
                    break
            if alive is not None and not alive():
                raise FederationRunError(f"the SuperLink exited during run {run_id}")
            if now > deadline:
                cli.stop_run(run_id)
                raise FederationRunError(
                    f"run {run_id} did not finish within {timeout:.0f} s; stopped it"
                )
            time.sleep(poll)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            cli.stop_run(run_id)
        raise
    rows = emit_rounds()
    summary = read_json(checkpoint_dir, SUMMARY_FILE)
    outcome = RunOutcome(
        run_id=run_id,
        status=status,
        rounds=rows,
        evaluation=read_json(checkpoint_dir, EVALUATION_FILE),
        summary=summary,
        checkpoint_dir=checkpoint_dir,
        seconds=time.monotonic() - started,
    )
    if not (summary and summary.get("status") == "completed"):
        detail = (summary or {}).get("error") or f"flwr status {status}"
        logs = ""
        with contextlib.suppress(FlowerCliError):
            logs = cli.logs(run_id)[-3000:]
        raise FederationRunError(f"run {run_id} did not complete: {detail}\n{logs}".rstrip())
    return outcome


__all__ = [
    "FederationProcessError",
    "FederationRunError",
    "LabSpec",
    "LocalFederation",
    "RunOutcome",
    "wait_for_run",
]
