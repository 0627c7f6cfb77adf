"""The lab side: run this lab's SuperNode as a child process and report its status.

Used by ``napari-feddp federation join`` and meant for the napari Federation
widget: :class:`LabNode` never runs Flower in the caller's process (the
SuperNode installs signal handlers and blocks), it starts ``flower-supernode``
as a child, and :meth:`LabNode.status` / :meth:`LabNode.history` read its log
and the ClientApp's local history file. Nothing here needs Qt.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .processes import FederationProcessError, SuperNodeProcess
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


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (colours, cursor moves).

    Parameters
    ----------
    text : str
        Log text, possibly coloured.

    Returns
    -------
    str
    """
    return _ANSI.sub("", text)


def log_excerpt(log: str, lines: int = 6) -> str:
    """The part of a Flower log that says what went wrong, readable in one message.

    Parameters
    ----------
    log : str
        Whole log text.
    lines : int
        How many lines to keep at most.

    Returns
    -------
    str
        The last ``ERROR`` entry with its continuation lines (Flower explains
        an exit code over several lines, then logs its shutdown), else the last
        non-empty lines; without colour codes, Flower's level prefix or the
        command line the log starts with.
    """
    rows = [line.rstrip() for line in strip_ansi(log).splitlines() if line.strip() and not line.startswith("$ ")]
    errors = [i for i, line in enumerate(rows) if _ERROR.match(line)]
    if errors:
        entry = [rows[errors[-1]]]
        for line in rows[errors[-1] + 1:]:
            if _LEVEL.match(line):
                break
            entry.append(line)
        rows = entry[:lines]
    return "\n".join(_LEVEL.sub("", line).strip() for line in rows[-lines:])


class CoordinatorUnreachable(FederationProcessError):
    """The SuperNode could not connect to the coordinator within the timeout."""


@dataclass
class LabStatus:
    """What the lab's SuperNode is doing.

    Attributes
    ----------
    state : str
        ``stopped``, ``connecting``, ``unreachable`` (no connection to the
        coordinator within the connect timeout), ``waiting``, ``training``,
        ``evaluating``, ``declined``, ``refused`` (a run's app bundle was not
        this lab's napari-feddp), ``finished`` (the run's final evaluation is
        done) or ``error``.
    round : int or None
        Round of the last message received.
    message : str
        Human-readable detail (error text, decline reason).
    """

    state: str
    round: int | None = None
    message: str = ""

    #: States in which the lab's SuperNode no longer runs (or should be stopped).
    FINAL = ("stopped", "unreachable", "error")

    def describe(self) -> str:
        """One line for a person: the state, the round and the detail.

        Returns
        -------
        str
            For example ``"round 4: declined - next round would reach epsilon
            9.0 > budget 8.0"`` or ``"run finished (round 5): the final model
            was not adopted: ..."``.
        """
        at = "" if self.round is None else f"round {self.round}: "
        detail = self.message
        if self.state == "connecting":
            return "connecting to the coordinator…"
        if self.state == "unreachable":
            return detail or "cannot reach the coordinator"
        if self.state == "waiting":
            done = "" if self.round is None else f" (last: round {self.round})"
            return f"waiting for the next round{done}"
        if self.state in ("training", "evaluating"):
            return f"{at}{self.state}"
        if self.state == "declined":
            return f"{at}declined - {detail or 'outside this lab policy'}"
        if self.state == "refused":
            return f"refused a run: its app bundle is not this lab's napari-feddp ({detail})"
        if self.state == "finished":
            where = "" if self.round is None else f" (round {self.round})"
            return f"run finished{where}" + (f"; {detail}" if detail else "")
        if self.state == "error":
            return f"error: {detail}" if detail else "error"
        return self.state + (f": {detail}" if detail else "")


@dataclass(eq=False)
class LabNode:
    """This lab's SuperNode (child process) plus its local history.

    Parameters
    ----------
    superlink : str
        ``HOST:PORT`` of the coordinator's SuperLink.
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
    ledger_dir, eval_dataset, model_store : str
        See :class:`~napari_feddp.federation.settings.NodeSettings`.
    workdir : path, optional
        Logs, Flower home and history (default: a new temporary directory).
    insecure : bool
        Plain text (explicit opt-in, warns).
    threads : int
        Torch threads of each ClientApp.
    connect_timeout : float
        Seconds after :meth:`start` within which the coordinator must accept
        the SuperNode; later :meth:`status` reports ``unreachable``
        (default :data:`CONNECT_TIMEOUT`; 0: :meth:`status` keeps reporting
        ``connecting``).
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
    node: SuperNodeProcess | None = field(default=None, init=False)
    started_at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.lab is None:
            self.lab = Path(self.key).stem if self.key else "lab"
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"feddp-{self.lab}-"))
        self.workdir = Path(self.workdir).expanduser().resolve()

    @property
    def history_file(self) -> Path:
        """Local JSON-lines history written by the ClientApp."""
        return self.workdir / "history.jsonl"

    def settings(self) -> NodeSettings:
        """The node config passed to the SuperNode."""
        def absolute(path: str | Path) -> str:
            return str(Path(path).expanduser().resolve()) if path else ""

        from .policy import accepted_dp_modes

        settings = NodeSettings(
            lab=self.lab,
            data_dir=absolute(self.dataset),
            ledger_dir=absolute(self.ledger_dir),
            max_epsilon=float(self.epsilon_budget),
            eval_dir=absolute(self.eval_dataset),
            model_store=absolute(self.model_store),
            history_file=str(self.history_file),
            threads=self.threads,
            **self.policy,
        )
        accepted_dp_modes(settings)  # an unknown mode fails here, not in the first round
        return settings

    def policy_summary(self) -> str:
        """One line stating the lab's privacy policy (for the CLI and the widget)."""
        from .policy import describe_policy

        return describe_policy(self.settings())

    def start(self, wait: bool = True, timeout: float | None = None) -> LabNode:
        """Start the SuperNode; with ``wait`` until the SuperLink accepted it.

        Parameters
        ----------
        wait : bool
            Block until the coordinator accepted the node (else return at once
            and follow :meth:`status`).
        timeout : float, optional
            Seconds to wait (default: ``connect_timeout``).

        Raises
        ------
        CoordinatorUnreachable
            If no connection was made within the timeout (the node is stopped).
        FederationProcessError
            If the SuperNode exits first (e.g. its key is not registered); the
            message carries the end of its log without colour codes.
        """
        if not Path(self.dataset).is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.dataset}")
        self.node = SuperNodeProcess(
            name=self.lab,
            workdir=self.workdir,
            superlink_address=self.superlink,
            root_cert=None if self.ca is None else Path(self.ca),
            private_key=None if self.key is None else Path(self.key),
            node_config=self.settings().to_node_config(),
            insecure=self.insecure,
            ready_timeout=timeout or self.connect_timeout or CONNECT_TIMEOUT,
        )
        self.started_at = time.monotonic()
        self.node.start(wait=False)
        if wait:
            try:
                self.node.wait_ready()
            except FederationProcessError:
                process = self.node.process
                if self.node.is_running():  # still retrying: nobody answered
                    message = self.unreachable_message(time.monotonic() - self.started_at)
                    self.node.stop()  # after reading the log: shutting down adds lines of its own
                    raise CoordinatorUnreachable(message) from None
                code = process.returncode
                self.node.stop()
                raise FederationProcessError(
                    f"the SuperNode exited with code {code}:\n{log_excerpt(process.read_log())}\n"
                    f"(log: {process.log_path})") from None
        return self

    def unreachable_message(self, waited: float | None = None) -> str:
        """``cannot reach coordinator at HOST:PORT (why)``, from the SuperNode's log.

        Parameters
        ----------
        waited : float, optional
            Seconds waited (default: since :meth:`start`).

        Returns
        -------
        str
        """
        if waited is None:
            waited = 0.0 if self.started_at is None else time.monotonic() - self.started_at
        why = f"no connection after {waited:.0f} s"
        log = self.node.process.read_log() if self.node is not None and self.node.process is not None else ""
        attempts = [_LEVEL.sub("", line).strip() for line in strip_ansi(log).splitlines()
                    if _FAILURE.search(line) and not line.startswith("$ ")]
        if attempts:
            # "Connection attempt failed, retrying in 1.57 seconds": the retry no longer happens.
            why += f"; {attempts[-1].split(', retrying')[0]}"
        return f"cannot reach coordinator at {self.superlink} ({why})"

    def stop(self) -> None:
        """Leave: stop the SuperNode and everything it started."""
        if self.node is not None:
            self.node.stop()

    def __enter__(self) -> LabNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def history(self) -> list[dict]:
        """Per-round local records (``training``, ``trained``, ``declined``, ``evaluated``)."""
        if not self.history_file.exists():
            return []
        rows = []
        for line in self.history_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def status(self) -> LabStatus:
        """Current state from the process and the ClientApp's local history.

        The SuperNode's log only tells whether it has joined; everything else
        (round, declines and their reasons, a refused app bundle, the end of a
        run) comes from the history the ClientApp records in this lab.
        """
        if self.node is None or self.node.process is None:
            return LabStatus("stopped")
        log = self.node.process.read_log()
        if not self.node.is_running():
            code = self.node.process.returncode
            if code in (0, None, -15):
                return LabStatus("stopped")
            return LabStatus("error", message=f"SuperNode exited with code {code}: {log_excerpt(log)}")
        if "SuperNode ID" not in log:
            waited = None if self.started_at is None else time.monotonic() - self.started_at
            if self.connect_timeout and waited is not None and waited > self.connect_timeout:
                return LabStatus("unreachable", message=self.unreachable_message(waited))
            return LabStatus("connecting")
        history = self.history()
        if not history:
            return LabStatus("waiting")
        last = history[-1]
        event, rnd = last.get("event"), (last.get("round") or None)
        reason = str(last.get("reason", ""))
        if event == "refused-app":
            return LabStatus("refused", None, reason or "untrusted app bundle")
        if event == "declined":
            return LabStatus("declined", rnd, reason or "declined")
        if event in ("training", "evaluating"):
            return LabStatus(event, rnd)
        if event in ("model-promoted", "model-refused", "store-failed") or (
            event == "evaluated" and last.get("final")
        ):
            # Only this run's verdict: it is recorded after the final "evaluating" row.
            since = max((i for i, r in enumerate(history) if r.get("event") == "evaluating"), default=0)
            verdicts = [r for r in history[since:]
                        if r.get("event") in ("model-promoted", "model-refused", "store-failed")]
            detail = ""
            if verdicts:
                v = verdicts[-1]
                kept = "became this lab's default model" if v["event"] == "model-promoted" else "was not adopted"
                detail = f"the final model {kept}: {v.get('reason', '')}".rstrip(": ")
            return LabStatus("finished", rnd, detail)
        return LabStatus("waiting", rnd)
