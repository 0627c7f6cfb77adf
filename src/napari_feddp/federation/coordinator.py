"""The coordinator side: a SuperLink that only registered labs may join, and runs on it.

``napari-feddp federation serve`` keeps a :class:`Coordinator` running;
``napari-feddp federation run`` calls :func:`submit_run` against its address.
The coordinator writes ``connection.json`` (address, CA certificate, Flower
home) into its work directory so that ``run`` can find it with
``--connection DIR``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .app_bundle import write_app_dir
from .certs import PilotPKI
from .flwr_cli import FlowerCli, write_flower_config
from .pilot import RunOutcome, wait_for_run
from .processes import LOOPBACK, SuperLinkProcess, TlsFiles
from .settings import RunSettings

CONNECTION_FILE = "connection.json"


@dataclass(eq=False)
class Coordinator:
    """SuperLink (loopback), its SuperExec and the Fleet gateway, plus a ``flwr`` home.

    Labs reach only the gateway (:attr:`fleet_address`, Fleet API); the
    Control and Runtime APIs stay on this machine's loopback, where only the
    coordinator's ``flwr`` commands (:attr:`cli`) and its own SuperExec (with
    the shared secret) use them.

    Parameters
    ----------
    workdir : path
        Logs, the SuperLink's Flower home, the CLI's Flower home, ``connection.json``.
    pki : PilotPKI or None
        CA and SuperLink certificate (no lab keys).
    insecure : bool
        Plain text, no node authentication (explicit opt-in, warns).
    host, port : str, int
        Public address of the gateway (port None: a free one).
    public_keys : dict
        ``{lab name: public key path}`` registered at start (keys the labs
        made themselves with ``federation keys``).
    ready_timeout : float
        Seconds to wait for each process.
    """

    workdir: Path
    pki: PilotPKI | None
    insecure: bool = False
    host: str = LOOPBACK
    port: int | None = None
    public_keys: dict[str, Path] = field(default_factory=dict)
    ready_timeout: float = 60.0
    superlink: SuperLinkProcess | None = field(default=None, init=False)
    cli: FlowerCli | None = field(default=None, init=False)
    registered: dict[str, int] = field(default_factory=dict, init=False)

    @property
    def fleet_address(self) -> str:
        """``HOST:PORT`` labs dial."""
        assert self.superlink is not None, "start() first"
        return self.superlink.fleet_address

    def start(self) -> Coordinator:
        """Start the SuperLink, write the CLI config, register every known lab."""
        self.workdir = Path(self.workdir).resolve()
        if self.pki is None and not self.insecure:
            raise ValueError("a PKI (federation certs) is required unless insecure=True")
        tls = None
        if self.pki is not None and not self.insecure:
            tls = TlsFiles(self.pki.ca.cert, self.pki.server.cert, self.pki.server.key)
        self.superlink = SuperLinkProcess(
            self.workdir / "superlink", tls, insecure=self.insecure, port=self.port, host=self.host,
            ready_timeout=self.ready_timeout,
        ).start()
        self.cli = FlowerCli(self.workdir / "cli-home")
        ca = None if self.insecure else self.pki.ca.cert
        write_flower_config(self.cli.flwr_home, self.superlink.address, root_cert=ca, insecure=self.insecure)
        if not self.insecure and self.public_keys:
            # Each registration is a `flwr` process: run them side by side.
            from concurrent.futures import ThreadPoolExecutor

            items = list(self.public_keys.items())
            with ThreadPoolExecutor(max_workers=max(1, min(4, len(items)))) as pool:
                list(pool.map(lambda item: self.register(item[1], item[0]), items))
        self.write_connection()
        return self

    def write_connection(self) -> Path:
        """Write ``connection.json`` (addresses, CA, Flower home, registered labs)."""
        assert self.superlink is not None and self.cli is not None, "start() first"
        path = self.workdir / CONNECTION_FILE
        path.write_text(
            json.dumps(
                {
                    "fleet_address": self.superlink.fleet_address,
                    "control_address": self.superlink.address,
                    "ca": None if self.insecure else str(self.pki.ca.cert),
                    "insecure": self.insecure,
                    "flwr_home": str(self.cli.flwr_home),
                    "labs": self.registered,
                },
                indent=2,
            )
            + "\n"
        )
        return path

    def register(self, public_key: str | Path, name: str) -> int:
        """Register a lab's public key; return its SuperNode id."""
        assert self.cli is not None, "start() first"
        node_id = self.cli.register_node(public_key, name=name)
        self.registered[name] = node_id
        return node_id

    def stop(self) -> None:
        """Stop the gateway, SuperExec (and any ServerApp) and SuperLink."""
        if self.superlink is not None:
            self.superlink.stop()

    def __enter__(self) -> Coordinator:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def submit_run(
    cli: FlowerCli,
    settings: RunSettings,
    app_dir: str | Path,
    *,
    follow: bool = True,
    timeout: float = 24 * 3600,
    on_round=None,
) -> RunOutcome | int:
    """Start the FedDP run with ``flwr run``; optionally follow it to the end.

    Parameters
    ----------
    cli : FlowerCli
        Connection to the SuperLink.
    settings : RunSettings
        Must have ``checkpoint_dir`` (absolute, on the SuperLink's machine).
    app_dir : path
        Where the generated Flower App (pyproject.toml) is written.
    follow : bool
        Wait and report rounds (needs ``checkpoint_dir`` readable from here).
    timeout : float
        Seconds when following.
    on_round : callable, optional
        Called with each round record.

    Returns
    -------
    RunOutcome, or the run id when not following.
    """
    app = write_app_dir(app_dir, settings)
    checkpoint_dir = Path(settings.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("summary.json", "evaluation.json", "rounds.jsonl"):
        (checkpoint_dir / stale).unlink(missing_ok=True)
    run_id = cli.start_run(app)
    if not follow:
        return run_id
    return wait_for_run(cli, run_id, checkpoint_dir, timeout=timeout, on_round=on_round)


def read_connection(directory: str | Path) -> dict:
    """``connection.json`` written by :meth:`Coordinator.start`."""
    path = Path(directory) / CONNECTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONNECTION_FILE} in {directory}: is 'federation serve' running there?")
    return json.loads(path.read_text())
