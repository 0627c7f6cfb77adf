"""The lab side: this lab's SuperNode and its SuperExec as child processes, and their status.

Used by ``napari-feddp federation join``, the napari Federation widget and
:class:`~napari_feddp.federation.pilot.LocalFederation`. Flower never runs in
the caller's process (the SuperNode installs signal handlers and blocks):
:class:`LabNode` starts ``flower-supernode`` and the ``flower-superexec`` that
runs its ClientApps, each through the app pin (:mod:`.app_pin`).
:meth:`LabNode.status` reads the lab's local history (``history.jsonl``,
written by the ClientApps and the app pin). Nothing here needs Qt.
"""

from __future__ import annotations

import itertools
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from .._atomic import write_atomic
from .checkpoints import append_jsonl, read_jsonl
from .processes import (
    LOOPBACK,
    FederationProcessError,
    ManagedProcess,
    absolute,
    find_free_port,
    flower_env,
    flower_executable,
    superexec_argv,
    tls_args,
    warn_insecure,
    write_secret,
)
from .settings import NodeSettings

#: Seconds a lab waits for the coordinator to accept its SuperNode before giving up.
CONNECT_TIMEOUT = 60.0

# Flower colours its log even with NO_COLOR set; nothing shown to a user keeps the escapes.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# SuperNode log lines that say why a connection failed.
_FAILURE = re.compile(r"attempt failed|error|refused|certificate|handshake", re.IGNORECASE)
# Flower's (and Uvicorn's) "LEVEL :   text" prefix.
_LEVEL = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*")
_ERROR = re.compile(r"^(?:ERROR|CRITICAL)\s*:")
_NODE_ID = re.compile(r"SuperNode ID:\s*(\d+)")
#: History events that end a run for this lab: the verdict on the final model.
_VERDICTS = ("model-promoted", "model-refused", "store-failed")


def _log_lines(log: str) -> list[str]:
    """Non-empty lines of a Flower log without colour codes or the command line it starts with."""
    return [line.rstrip() for line in _ANSI.sub("", log).splitlines() if line.strip() and not line.startswith("$ ")]


def log_excerpt(log: str, lines: int = 6) -> str:
    """What a Flower log says went wrong, in at most ``lines`` lines without Flower's level prefixes.

    The last ``ERROR`` entry with its continuation lines (Flower explains an
    exit code over several lines, then logs its shutdown), else the last lines.
    """
    rows = _log_lines(log)
    if errors := [i for i, line in enumerate(rows) if _ERROR.match(line)]:
        after = itertools.takewhile(lambda line: not _LEVEL.match(line), rows[errors[-1] + 1:])
        rows = [rows[errors[-1]], *after][:lines]
    return "\n".join(_LEVEL.sub("", line).strip() for line in rows[-lines:])


class CoordinatorUnreachable(FederationProcessError):
    """The SuperNode could not connect to the coordinator within the timeout."""


@dataclass
class LabStatus:
    """What the lab's SuperNode is doing: ``state``, the ``round`` of the last message and a ``message``.

    ``state`` is ``stopped``, ``connecting``, ``unreachable`` (no connection to
    the coordinator within the connect timeout), ``waiting``, ``training``,
    ``evaluating``, ``declined``, ``refused`` (a run's app bundle was not this
    lab's napari-feddp), ``finished`` (the run's final evaluation is done) or ``error``.
    """

    state: str
    round: int | None = None
    message: str = ""

    #: States in which the lab's SuperNode no longer runs (or should be stopped).
    FINAL = ("stopped", "unreachable", "error")

    def describe(self) -> str:
        """One line for a person, e.g. ``"round 4: declined - next round would reach epsilon 9.0 > budget 8.0"``."""
        at, detail = "" if self.round is None else f"round {self.round}: ", self.message
        return {
            "connecting": "connecting to the coordinator…",
            "unreachable": detail or "cannot reach the coordinator",
            "waiting": "waiting for the next round" + ("" if self.round is None else f" (last: round {self.round})"),
            "training": f"{at}training",
            "evaluating": f"{at}evaluating",
            "declined": f"{at}declined - {detail or 'outside this lab policy'}",
            "refused": f"refused a run: its app bundle is not this lab's napari-feddp ({detail})",
            "finished": "run finished" + ("" if self.round is None else f" (round {self.round})")
                        + (f"; {detail}" if detail else ""),
            "error": f"error: {detail}" if detail else "error",
        }.get(self.state, self.state + (f": {detail}" if detail else ""))  # fmt: skip


def supernode_argv(superlink: str, runtime_port: int, *, root_cert: str | os.PathLike | None,
                   private_key: str | os.PathLike | None, superexec_secret: str | os.PathLike,
                   node_config: str | os.PathLike) -> list[str]:
    """Command line of ``flower-supernode`` (Flower 1.42); ``root_cert=None`` means ``--insecure``.

    Its Runtime API listens on loopback (``runtime_port``). ``--isolation
    process`` with a SuperExec secret: only the lab's own SuperExec (which runs
    ClientApps through the app pin) can pick up its tasks. ``node_config`` is a
    TOML file (the lab's settings and policy).
    """
    argv = [flower_executable("flower-supernode"), "--superlink", superlink, "--host", LOOPBACK,
            "--port", str(runtime_port), "--isolation", "process", "--superexec-auth-secret-file",
            absolute(superexec_secret), "--node-config", absolute(node_config), *tls_args(root_cert)]  # fmt: skip
    return argv + ([] if private_key is None else ["--auth-supernode-private-key", absolute(private_key)])


def status_from_history(history: list[dict]) -> LabStatus:
    """What a joined lab is doing, from its local history (``history.jsonl`` rows, oldest first).

    The ClientApps record ``training``, ``trained``, ``declined``, ``evaluating``,
    ``evaluated`` and the verdict on a run's final model; the app pin ``refused-app``.
    """
    if not history:
        return LabStatus("waiting")
    last = history[-1]
    event, rnd, reason = last.get("event"), last.get("round") or None, str(last.get("reason", ""))
    if event == "refused-app":
        return LabStatus("refused", None, reason or "untrusted app bundle")
    if event == "declined":
        return LabStatus("declined", rnd, reason or "declined")
    if event in ("training", "evaluating"):
        return LabStatus(event, rnd)
    if event in _VERDICTS or (event == "evaluated" and last.get("final")):
        # Only this run's verdict: it is recorded after the final "evaluating" row.
        since = max((i for i, r in enumerate(history) if r.get("event") == "evaluating"), default=0)
        verdicts = [r for r in history[since:] if r.get("event") in _VERDICTS]
        detail = ""
        if verdicts:
            kept = "became this lab's default model" if verdicts[-1]["event"] == "model-promoted" else "was not adopted"
            detail = f"the final model {kept}: {verdicts[-1].get('reason', '')}".rstrip(": ")
        return LabStatus("finished", rnd, detail)
    return LabStatus("waiting", rnd)


@dataclass(eq=False)
class LabNode:
    """This lab's SuperNode and SuperExec (child processes) plus its local history.

    Parameters
    ----------
    superlink : str
        ``HOST:PORT`` the coordinator gave (its Fleet gateway).
    ca : path or None
        CA certificate (None only with ``insecure``).
    key : path or None
        The lab's OpenSSH EC private key (registered by the coordinator).
    dataset : path
        Training folder (``images/``, ``masks/``).
    lab : str, optional
        Lab name (default: the key file's stem).
    epsilon_budget : float
        ``max-epsilon`` for the privacy ledger (default 8; 0: no limit).
    policy : dict
        The lab's other privacy-policy fields of
        :class:`~napari_feddp.federation.settings.NodeSettings`
        (``accept_dp_modes``, ``max_delta``, ``min_noise_multiplier``, ...).
    ledger_dir, eval_dataset, model_store, train_fn, eval_fn, threads
        See :class:`~napari_feddp.federation.settings.NodeSettings`.
    workdir : path, optional
        Logs, Flower home, secret, node config and history (default: a new temporary directory).
    insecure : bool
        Plain text (explicit opt-in, warns).
    connect_timeout : float
        Seconds after :meth:`start` within which the coordinator must accept
        the SuperNode, else :meth:`status` reports ``unreachable`` (0: it keeps
        reporting ``connecting``).
    extra_env : mapping, optional
        Extra environment of the lab's processes (e.g. ``PYTHONPATH`` for a ``train_fn``).
    """

    superlink: str
    ca: Path | None
    key: Path | None
    dataset: Path
    lab: str | None = None
    epsilon_budget: float = 8.0
    policy: dict = field(default_factory=dict)
    ledger_dir: str = ""
    eval_dataset: str = ""
    model_store: str = ""
    workdir: Path | None = None
    insecure: bool = False
    threads: int = 1
    connect_timeout: float = CONNECT_TIMEOUT
    train_fn: str = ""
    eval_fn: str = ""
    extra_env: Mapping[str, str] | None = None
    process: ManagedProcess | None = field(default=None, init=False)
    superexec: ManagedProcess | None = field(default=None, init=False)
    runtime_port: int | None = field(default=None, init=False)
    node_id: int | None = field(default=None, init=False)
    started_at: float | None = field(default=None, init=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.lab is None:
            self.lab = Path(self.key).stem if self.key else "lab"
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"feddp-{self.lab}-"))
        self.workdir = Path(self.workdir).expanduser().resolve()

    @property
    def history_file(self) -> Path:
        """Local JSON-lines history written by the ClientApps and the app pin."""
        return self.workdir / "history.jsonl"

    def settings(self) -> NodeSettings:
        """The node config passed to the SuperNode."""
        from .policy import accepted_dp_modes

        def resolved(path: str | Path) -> str:
            return absolute(path) if path else ""

        settings = NodeSettings(
            lab=self.lab, data_dir=resolved(self.dataset), ledger_dir=resolved(self.ledger_dir),
            max_epsilon=float(self.epsilon_budget), eval_dir=resolved(self.eval_dataset),
            model_store=resolved(self.model_store), history_file=str(self.history_file), threads=self.threads,
            train_fn=self.train_fn, eval_fn=self.eval_fn, **self.policy)  # fmt: skip
        accepted_dp_modes(settings)  # an unknown mode fails here, not in the first round
        return settings

    def policy_summary(self) -> str:
        """One line stating the lab's privacy policy (for the CLI and the widget)."""
        from .policy import describe_policy

        return describe_policy(self.settings())

    def write_node_config(self) -> Path:
        """Write ``node-config.toml`` for ``--node-config``: :meth:`settings`, the lab's policy included."""
        return write_atomic(self.workdir / "node-config.toml", tomli_w.dumps(self.settings().to_node_config()))

    def start(self, wait: bool = True, timeout: float | None = None) -> LabNode:
        """Start the SuperNode and its SuperExec; with ``wait`` block until the coordinator accepted the node
        (:meth:`wait_joined`, within ``timeout``), else return at once and follow :meth:`status`.

        Every ClientApp the SuperExec starts runs through the app pin: the
        pinned ``flwr-clientapp`` (:func:`.app_pin.write_launcher`) is first on its ``PATH``.
        """
        from .app_pin import HISTORY_ENV, write_launcher

        if not Path(self.dataset).is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.dataset}")
        if self.ca is None and not self.insecure:
            raise ValueError("a SuperNode needs the CA certificate unless insecure=True is given")
        node_config = self.write_node_config()
        if self.insecure:
            warn_insecure(f"SuperNode {self.lab}")
        secret = write_secret(self.workdir / "secrets" / "superexec.secret")
        self.runtime_port, self.node_id = find_free_port(), None
        env = flower_env(self.workdir / "flwr-home", self.extra_env)
        log = self.workdir / f"{self.lab}.log"
        self._log_offset = log.stat().st_size if log.exists() else 0
        self.process = ManagedProcess(f"supernode {self.lab}", supernode_argv(
            self.superlink, self.runtime_port, root_cert=None if self.insecure else self.ca,
            private_key=None if self.insecure else self.key, superexec_secret=secret,
            node_config=node_config), log, env, self.workdir).start()  # fmt: skip
        pinned = write_launcher(self.workdir / "bin").parent
        env = {**env, "PATH": f"{pinned}{os.pathsep}{env['PATH']}", HISTORY_ENV: str(self.history_file)}
        self.superexec = ManagedProcess(
            f"superexec {self.lab}", superexec_argv(f"{LOOPBACK}:{self.runtime_port}", root_cert=None, secret=secret),
            self.workdir / f"{self.lab}-clientapps.log", env, self.workdir).start()  # fmt: skip
        self.started_at = time.monotonic()
        if wait:
            self.wait_joined(timeout)
        return self

    def _log(self) -> str:
        """The SuperNode's log since the last :meth:`start`."""
        if self.process is None:
            return ""
        try:
            with open(self.process.log_path, "rb") as handle:
                handle.seek(self._log_offset)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def joined(self) -> int | None:
        """The SuperNode id once the coordinator accepted the node (then recorded as ``joined``), else None."""
        if self.node_id is None and (match := _NODE_ID.search(self._log())):
            self.node_id = int(match.group(1))
            append_jsonl(self.history_file, {"time": time.time(), "event": "joined", "node": self.node_id})
        return self.node_id

    def wait_joined(self, timeout: float | None = None) -> int:
        """Block until the coordinator accepted the node; return its SuperNode id.

        Raises CoordinatorUnreachable without a connection within ``timeout``
        (default ``connect_timeout``), FederationProcessError with the end of
        its log if the SuperNode exits first (e.g. its key is not registered);
        either way the node is stopped.
        """
        deadline = time.monotonic() + (timeout or self.connect_timeout or CONNECT_TIMEOUT)
        while self.joined() is None:
            if not self.is_running():
                code = self.process.returncode
                self.stop()
                raise FederationProcessError(f"the SuperNode exited with code {code}:\n{log_excerpt(self._log())}\n"
                                             f"(log: {self.process.log_path})")  # fmt: skip
            if time.monotonic() > deadline:
                message = self.unreachable_message()
                self.stop()  # after reading the log: shutting down adds lines of its own
                raise CoordinatorUnreachable(message)
            time.sleep(0.1)
        return self.node_id

    def unreachable_message(self, waited: float | None = None) -> str:
        """``cannot reach coordinator at HOST:PORT (why)`` after ``waited`` seconds (default: since :meth:`start`),
        with the SuperNode's last failed attempt."""
        if waited is None:
            waited = 0.0 if self.started_at is None else time.monotonic() - self.started_at
        why = f"no connection after {waited:.0f} s"
        if attempts := [_LEVEL.sub("", line).strip() for line in _log_lines(self._log()) if _FAILURE.search(line)]:
            # "Connection attempt failed, retrying in 1.57 seconds": the retry no longer happens.
            why += f"; {attempts[-1].split(', retrying')[0]}"
        return f"cannot reach coordinator at {self.superlink} ({why})"

    def is_running(self) -> bool:
        """True while the SuperNode process runs."""
        return self.process is not None and self.process.is_running()

    def stop(self, timeout: float = 10.0) -> None:
        """Leave: the SuperNode deactivates itself at the SuperLink, then its SuperExec (and ClientApp) stop."""
        for process in filter(None, (self.process, self.superexec)):
            process.stop(timeout)

    def kill(self) -> None:
        """Crash the node: SIGKILL the SuperNode, its SuperExec and a running ClientApp."""
        for process in filter(None, (self.process, self.superexec)):
            process.kill()

    def history(self) -> list[dict]:
        """Local records (``joined``, ``training``, ``trained``, ``declined``, ``evaluated``, ...), oldest first."""
        return read_jsonl(self.history_file)

    def status(self) -> LabStatus:
        """Current state: the SuperNode process, whether it joined, then the lab's history
        (:func:`status_from_history`: rounds, declines, a refused app bundle, the end of a run)."""
        if self.process is None:
            return LabStatus("stopped")
        if not self.is_running():
            code = self.process.returncode
            if code in (0, None, -15):
                return LabStatus("stopped")
            return LabStatus("error", message=f"SuperNode exited with code {code}: {log_excerpt(self._log())}")
        if self.joined() is None:
            waited = None if self.started_at is None else time.monotonic() - self.started_at
            if self.connect_timeout and waited is not None and waited > self.connect_timeout:
                return LabStatus("unreachable", message=self.unreachable_message(waited))
            return LabStatus("connecting")
        return status_from_history([row for row in self.history() if row.get("event") != "joined"])
