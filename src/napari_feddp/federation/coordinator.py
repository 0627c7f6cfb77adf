"""The coordinator side: a SuperLink that only registered labs may join, and runs on it.

``napari-feddp federation serve`` keeps a :class:`Coordinator` running;
``napari-feddp federation run`` calls :func:`submit_run` against its address.
The coordinator writes ``connection.json`` (address, CA certificate, Flower
home) into its work directory so that ``run`` can find it with
``--connection DIR``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .._atomic import write_atomic
from .app_bundle import write_app_dir
from .certs import PilotPKI
from .checkpoints import EVALUATION_FILE, ROUNDS_FILE, SUMMARY_FILE, read_json, read_jsonl
from .flwr_cli import FlowerCli, write_flower_config
from .processes import (
    ADDRESS_IN_USE,
    LOOPBACK,
    FederationProcessError,
    ManagedProcess,
    absolute,
    find_free_port,
    flower_env,
    flower_executable,
    superexec_argv,
    warn_insecure,
    write_secret,
)
from .settings import RunSettings

CONNECTION_FILE = "connection.json"


class FederationRunError(RuntimeError):
    """A federated run failed, timed out, or ended without completing."""


@dataclass
class RunOutcome:
    """A finished run: its id, Flower status, round records, evaluation and summary."""

    run_id: int
    status: str
    rounds: list[dict]
    evaluation: dict | None
    summary: dict | None
    checkpoint_dir: Path
    seconds: float


def superlink_argv(port: int, pki: PilotPKI | None, *, superexec_secret: str | Path) -> list[str]:
    """Command line of ``flower-superlink`` (Flower 1.42), bound to loopback.

    One HTTP(S) port serves the Fleet, Control and Runtime APIs, so it never
    leaves loopback: labs reach the Fleet API through the gateway
    (:mod:`.gateway`). ``--isolation process`` with a SuperExec secret: only
    the coordinator's own SuperExec can pick up a ServerApp. ``pki=None``
    means ``--insecure`` (and no SuperNode authentication, which needs TLS).
    Apps use this environment: runtime dependency installation is disabled.
    """
    argv = [flower_executable("flower-superlink"), "--host", LOOPBACK, "--port", str(port)]
    if pki is None:
        argv.append("--insecure")
    else:
        argv += ["--ssl-ca-certfile", absolute(pki.ca.cert), "--ssl-certfile", absolute(pki.server.cert),
                 "--ssl-keyfile", absolute(pki.server.key), "--enable-supernode-auth"]  # fmt: skip
    return argv + ["--isolation", "process", "--superexec-auth-secret-file", absolute(superexec_secret),
                   "--disable-runtime-dependency-installation"]  # fmt: skip


@dataclass(eq=False)
class Coordinator:
    """SuperLink (loopback), its SuperExec and the Fleet gateway, plus a ``flwr`` home.

    * ``flower-superlink`` listens on ``127.0.0.1`` only (Fleet, Control and
      Runtime API share its port); :attr:`address` is for the coordinator's
      own ``flwr`` commands (:attr:`cli`).
    * ``flower-superexec`` runs the ServerApp; it authenticates to the
      SuperLink's Runtime API with a shared secret (mode 0600, new at every
      start), so no other process can take the task.
    * the gateway (:mod:`.gateway`) listens on ``host:port`` (port None: a free
      one) and forwards the Fleet API only; :attr:`fleet_address` is what labs
      dial, which the certificate of ``pki`` must name.

    ``workdir`` receives ``superlink/`` (logs, the secret, the SuperLink's
    Flower home), ``cli-home/`` and ``connection.json``. ``public_keys``
    (``{lab: public key path}``, keys the labs made with ``federation keys``)
    are registered at start. ``insecure``: plain text, no node authentication
    (explicit opt-in, warns). ``ready_timeout``: seconds to wait for each process.
    """

    workdir: Path
    pki: PilotPKI | None
    insecure: bool = False
    host: str = LOOPBACK
    port: int | None = None
    public_keys: dict[str, Path] = field(default_factory=dict)
    ready_timeout: float = 60.0
    superlink: ManagedProcess | None = field(default=None, init=False)
    superexec: ManagedProcess | None = field(default=None, init=False)
    gateway: ManagedProcess | None = field(default=None, init=False)
    internal_port: int | None = field(default=None, init=False)
    cli: FlowerCli | None = field(default=None, init=False)
    registered: dict[str, int] = field(default_factory=dict, init=False)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the SuperLink itself (Control API; this machine only)."""
        return f"{LOOPBACK}:{self.internal_port}"

    @property
    def fleet_address(self) -> str:
        """``HOST:PORT`` labs dial (the gateway; Fleet API only)."""
        return f"{LOOPBACK if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

    def start(self) -> Coordinator:
        """Start SuperLink, SuperExec and gateway, write the CLI config, register every known lab."""
        from .gateway import gateway_argv

        self.workdir = Path(self.workdir).resolve()
        if self.pki is None and not self.insecure:
            raise ValueError("a PKI (federation certs) is required unless insecure=True")
        if self.insecure:
            warn_insecure("SuperLink")
        pki = None if self.insecure else self.pki
        ca = None if pki is None else pki.ca.cert
        secret = write_secret(self.workdir / "superlink" / "secrets" / "superexec.secret")
        env = flower_env(self.workdir / "superlink" / "flwr-home")
        self.superlink, self.internal_port = self._start_listening(
            "superlink", "superlink.log", lambda port: superlink_argv(port, pki, superexec_secret=secret), env, LOOPBACK)
        self.superexec = ManagedProcess("superexec (serverapp)", superexec_argv(self.address, root_cert=ca, secret=secret),
                                        self.workdir / "superlink" / "superexec.log", env, self.workdir).start()
        tls = {} if pki is None else {"certfile": pki.server.cert, "keyfile": pki.server.key, "ca_cert": ca}
        self.gateway, self.port = self._start_listening(
            "fleet gateway", "gateway.log", lambda port: gateway_argv(self.host, port, self.address, **tls),
            flower_env(), self.host or LOOPBACK, fixed_port=self.port)  # fmt: skip
        self.cli = FlowerCli(self.workdir / "cli-home")
        write_flower_config(self.cli.flwr_home, self.address, root_cert=ca, insecure=self.insecure)
        if pki is not None and self.public_keys:
            # Each registration is a `flwr` process: run them side by side.
            with ThreadPoolExecutor(max_workers=min(4, len(self.public_keys))) as pool:
                list(pool.map(lambda item: self.register(item[1], item[0]), self.public_keys.items()))
        connection = {"fleet_address": self.fleet_address, "control_address": self.address,
                      "ca": None if ca is None else str(ca), "insecure": self.insecure,
                      "flwr_home": str(self.cli.flwr_home), "labs": self.registered}  # fmt: skip
        write_atomic(self.workdir / CONNECTION_FILE, json.dumps(connection, indent=2) + "\n")
        return self

    def _start_listening(self, name: str, log: str, argv: Callable[[int], list[str]], env: dict, host: str,
                         fixed_port: int | None = None) -> tuple[ManagedProcess, int]:
        """Start a process that listens on ``host:PORT``; on "address already in use" try another free port."""
        for attempt in range(4):
            port = fixed_port or find_free_port(host)
            process = ManagedProcess(name, argv(port), self.workdir / "superlink" / log, env, self.workdir).start()
            try:
                process.wait_port(LOOPBACK if host == "0.0.0.0" else host, port, self.ready_timeout)
                return process, port
            except FederationProcessError:
                clash = ADDRESS_IN_USE.search(process.log_tail(40))
                process.stop(5)
                if fixed_port or not clash or attempt == 3:
                    raise
        raise FederationProcessError(f"{name}: no free port")

    def register(self, public_key: str | Path, name: str) -> int:
        """Register a lab's public key; return its SuperNode id."""
        assert self.cli is not None, "start() first"
        self.registered[name] = self.cli.register_node(public_key, name=name)
        return self.registered[name]

    def is_running(self) -> bool:
        """True while SuperLink and gateway both run."""
        return all(p is not None and p.is_running() for p in (self.superlink, self.gateway))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the gateway, the SuperExec (and any ServerApp), then the SuperLink."""
        for process in filter(None, (self.gateway, self.superexec, self.superlink)):
            process.stop(timeout)


def read_connection(directory: str | Path) -> dict:
    """``connection.json`` written by :meth:`Coordinator.start`."""
    path = Path(directory) / CONNECTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONNECTION_FILE} in {directory}: is 'federation serve' running there?")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- runs


def submit_run(cli: FlowerCli, settings: RunSettings, app_dir: str | Path, *, follow: bool = True,
               **follow_options) -> RunOutcome | int:
    """Start the FedDP run with ``flwr run``; return its id, or with ``follow`` its :class:`RunOutcome`.

    ``settings.checkpoint_dir`` (on the SuperLink's machine; readable from
    here to follow) loses the files of an earlier run. The generated Flower
    App (pyproject.toml) is written to ``app_dir``. ``follow_options`` go to
    :func:`wait_for_run`.
    """
    checkpoint_dir = Path(settings.checkpoint_dir).resolve()
    settings = settings.replace(checkpoint_dir=str(checkpoint_dir))
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for stale in (SUMMARY_FILE, EVALUATION_FILE, ROUNDS_FILE):
        (checkpoint_dir / stale).unlink(missing_ok=True)
    started = time.monotonic()
    run_id = cli.start_run(write_app_dir(app_dir, settings))
    if not follow:
        return run_id
    return wait_for_run(cli, run_id, checkpoint_dir, started=started, **follow_options)


def wait_for_run(
    cli: FlowerCli,
    run_id: int,
    checkpoint_dir: Path,
    *,
    timeout: float = 24 * 3600,
    on_round: Callable[[dict], None] | None = None,
    on_poll: Callable[[], None] | None = None,
    alive: Callable[[], bool] | None = None,
    poll: float = 0.5,
    started: float | None = None,
) -> RunOutcome:
    """Follow a run through its checkpoint directory and ``flwr list`` until it ends.

    The ServerApp's ``summary.json`` is read every ``poll`` seconds (cheap);
    ``flwr list`` is asked every 10 s, which catches a ServerApp that died
    before writing a summary. ``on_round`` is called with each new
    ``rounds.jsonl`` record, ``on_poll`` on every poll (tests kill a node
    mid-round with it); ``alive`` returns False when the SuperLink is gone;
    ``started`` is the ``time.monotonic()`` of the submission.

    Raises
    ------
    FederationRunError
        If the run fails, does not finish within ``timeout`` seconds (it is
        then stopped), or the SuperLink dies. Ctrl-C stops the run before it propagates.
    """
    started = time.monotonic() if started is None else started
    seen, last_status, status = 0, 0.0, "running"

    def emit_rounds() -> list[dict]:
        nonlocal seen
        rows = read_jsonl(checkpoint_dir / ROUNDS_FILE)
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
            if now - last_status > 10.0:
                last_status = now
                status = str(cli.run_info(run_id).get("status", ""))
                if status.startswith("finished"):
                    time.sleep(poll)  # a summary written just before the end
                    break
            if alive is not None and not alive():
                raise FederationRunError(f"the SuperLink exited during run {run_id}")
            if now > started + timeout:
                cli.stop_run(run_id)
                raise FederationRunError(f"run {run_id} did not finish within {timeout:.0f} s; stopped it")
            time.sleep(poll)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            cli.stop_run(run_id)
        raise
    summary = read_json(checkpoint_dir, SUMMARY_FILE)
    outcome = RunOutcome(run_id=run_id, status=status, rounds=emit_rounds(),
                         evaluation=read_json(checkpoint_dir, EVALUATION_FILE), summary=summary,
                         checkpoint_dir=checkpoint_dir, seconds=time.monotonic() - started)  # fmt: skip
    if not (summary and summary.get("status") == "completed"):
        detail = (summary or {}).get("error") or f"flwr status {status}"
        raise FederationRunError(f"run {run_id} did not complete: {detail}\n{cli.logs(run_id)[-3000:]}".rstrip())
    return outcome
