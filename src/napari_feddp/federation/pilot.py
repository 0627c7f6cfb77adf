"""A whole federation on one machine: a :class:`Coordinator` and one :class:`LabNode` per lab.

:class:`LocalFederation` is what ``napari-feddp federation demo`` and the tests
use; it composes the same :class:`~.coordinator.Coordinator` that ``serve``
runs and the same :class:`~.lab.LabNode` that ``join`` runs, with the same
TLS, SuperNode authentication, SuperExec secrets and app pin.

Everything listens on 127.0.0.1 with OS-assigned ports, every Flower process
has a private ``FLWR_HOME`` under the work directory, and leaving the
``with`` block (normally, by exception or Ctrl-C) stops every process.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .certs import NodeKeyPair, PilotPKI, create_node_keys, create_pilot_pki, load_pilot_pki, validate_lab_name
from .coordinator import Coordinator, FederationRunError, RunOutcome, submit_run
from .flwr_cli import FlowerCli
from .lab import LabNode
from .processes import FederationProcessError
from .settings import RunSettings


@dataclass
class LabSpec:
    """One simulated lab: the :class:`~.lab.LabNode` options of a lab named ``name``.

    ``data_dir`` holds ``images/`` and ``masks/``; ``eval_dir`` the held-out
    tiles (default: ``data_dir``); ``max_epsilon`` is its privacy budget (0:
    unlimited) and ``policy`` the other policy fields of
    :class:`~.settings.NodeSettings` (e.g. ``{"accept_dp_modes": "sample,none"}``).
    ``register=False`` leaves its public key unregistered: an unknown lab,
    which the SuperLink must refuse.
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
class LocalFederation:
    """A coordinator and one lab node per :class:`LabSpec` on loopback, as a context manager.

    ``workdir`` (default: a temporary directory, removed on exit unless
    ``keep_workdir``) holds logs, Flower homes, the PKI (unless ``pki_dir``
    names one from ``federation certs``), the labs' ledgers (unless
    ``ledger_dir``) and the lab nodes (:attr:`supernodes`, by lab name).
    ``insecure``: plain text, no node authentication (explicit opt-in, warns).
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
    supernodes: dict[str, LabNode] = field(default_factory=dict, init=False)
    pki: PilotPKI | None = field(default=None, init=False)
    lab_keys: dict[str, NodeKeyPair] = field(default_factory=dict, init=False)
    _tempdir: str | None = field(default=None, init=False)

    @property
    def cli(self) -> FlowerCli:
        """The coordinator's ``flwr`` commands."""
        return self.coordinator.cli

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
        """Create the PKI and lab keys, start the coordinator (registering the labs), then every lab's node."""
        if self.workdir is None:
            self._tempdir = tempfile.mkdtemp(prefix="feddp-federation-")
        self.workdir = Path(self.workdir or self._tempdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        names = [validate_lab_name(lab.name) for lab in self.labs]
        if len(set(names)) != len(names):
            raise ValueError(f"lab names must be unique: {names}")
        if not self.insecure:
            self.pki = load_pilot_pki(self.pki_dir) if self.pki_dir is not None else create_pilot_pki(self.workdir / "pki")
        self.coordinator = Coordinator(
            self.workdir / "coordinator", self.pki, insecure=self.insecure, ready_timeout=self.ready_timeout,
            public_keys={lab.name: self._lab_keys(lab.name).public_key for lab in self.labs
                         if lab.register and not self.insecure},
        ).start()  # fmt: skip
        for lab in self.labs:
            self.add_node(lab, wait=False, register=False)
        for node in self.supernodes.values():
            node.wait_joined(self.ready_timeout)
        return self

    def _lab_keys(self, lab: str) -> NodeKeyPair:
        """The lab's own key pair, made in the lab's folder (only the public key is registered)."""
        if lab not in self.lab_keys:
            keys = self.workdir / "labs" / lab / "keys"
            self.lab_keys[lab] = (NodeKeyPair(lab, keys / f"{lab}.key", keys / f"{lab}.pub")
                                  if (keys / f"{lab}.key").exists() else create_node_keys(keys, lab))  # fmt: skip
        return self.lab_keys[lab]

    def register(self, lab: str) -> int:
        """Register ``lab``'s public key (the lab makes its key pair if needed); return its node id."""
        return self.coordinator.register(self._lab_keys(lab).public_key, lab)

    def add_node(self, lab: LabSpec, *, wait: bool = True, register: bool | None = None) -> LabNode:
        """Register (if ``lab.register``, unless ``register`` says otherwise) and start the node of ``lab``.

        With ``wait`` until the coordinator accepted the node
        (:class:`FederationProcessError` if it refuses it).
        """
        validate_lab_name(lab.name)
        key = None
        if not self.insecure:
            if lab.register if register is None else register:
                self.register(lab.name)
            key = self._lab_keys(lab.name).private_key
        node = LabNode(
            superlink=self.coordinator.fleet_address, ca=None if self.insecure else self.pki.ca.cert, key=key,
            dataset=Path(lab.data_dir), lab=lab.name, epsilon_budget=float(lab.max_epsilon), policy=dict(lab.policy),
            ledger_dir=str(self.ledger_dir or self.workdir / "ledgers"), eval_dataset=str(lab.eval_dir or ""),
            model_store=str(self.workdir / "model-stores" / lab.name), workdir=self.workdir / "supernodes" / lab.name,
            insecure=self.insecure, threads=self.threads, connect_timeout=self.ready_timeout,
            train_fn=lab.train_fn, eval_fn=lab.eval_fn, extra_env=lab.extra_env,
        )  # fmt: skip
        self.supernodes[lab.name] = node
        return node.start(wait=wait)

    def stop(self) -> None:
        """Stop every lab node, then the coordinator; remove a temporary workdir."""
        for node in self.supernodes.values():
            with contextlib.suppress(Exception):
                node.stop()
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                self.coordinator.stop()
        if self._tempdir and not self.keep_workdir:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def run(self, settings: RunSettings, *, timeout: float = 900.0, on_round: Callable[[dict], None] | None = None,
            on_poll: Callable[[], None] | None = None) -> RunOutcome:
        """Start a run with ``flwr run`` and follow it (:func:`~.coordinator.wait_for_run`).

        An empty ``settings.checkpoint_dir`` becomes ``workdir/checkpoints``.
        FederationRunError if the run fails, does not complete in time, or the SuperLink dies.
        """
        if not settings.checkpoint_dir:
            settings = settings.replace(checkpoint_dir=str(self.workdir / "checkpoints"))
        return submit_run(self.cli, settings, self.workdir / "app", timeout=timeout, on_round=on_round,
                          on_poll=on_poll, alive=self.coordinator.is_running)  # fmt: skip


__all__ = ["FederationProcessError", "FederationRunError", "LabSpec", "LocalFederation", "RunOutcome"]
