"""The lab side: run this lab's SuperNode as a child process and report its status.

Used by ``napari-feddp federation join`` and meant for the napari Federation
widget: :class:`LabNode` never runs Flower in the caller's process (the
SuperNode installs signal handlers and blocks), it starts ``flower-supernode``
as a child, and :meth:`LabNode.status` / :meth:`LabNode.history` read its log
and the ClientApp's local history file. Nothing here needs Qt.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .processes import SuperNodeProcess
from .settings import NodeSettings



@dataclass
class LabStatus:
    """What the lab's SuperNode is doing.

    Attributes
    ----------
    state : str
        ``stopped``, ``connecting``, ``waiting``, ``training``, ``evaluating``,
        ``declined``, ``refused`` (a run's app bundle was not this lab's
        napari-feddp), ``finished`` (the run's final evaluation is done) or
        ``error``.
    round : int or None
        Round of the last message received.
    message : str
        Human-readable detail (error text, decline reason).
    """

    state: str
    round: int | None = None
    message: str = ""


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
    node: SuperNodeProcess | None = field(default=None, init=False)

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

    def start(self, wait: bool = True, timeout: float = 60.0) -> LabNode:
        """Start the SuperNode; with ``wait`` until the SuperLink accepted it.

        Raises
        ------
        FederationProcessError
            If the SuperLink refuses the node (unknown key, TLS failure, ...).
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
            ready_timeout=timeout,
        )
        self.node.start(wait=wait)
        return self

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
            tail = "\n".join(line for line in log.splitlines()[-12:] if line.strip())
            return LabStatus("error", message=f"SuperNode exited with code {code}: {tail}")
        if "SuperNode ID" not in log:
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
            verdicts = [r for r in history if r.get("event") in ("model-promoted", "model-refused", "store-failed")]
            detail = ""
            if verdicts:
                v = verdicts[-1]
                kept = "became this lab's default model" if v["event"] == "model-promoted" else "was not adopted"
                detail = f"the final model {kept}: {v.get('reason', '')}".rstrip(": ")
            return LabStatus("finished", rnd, detail)
        return LabStatus("waiting", rnd)
