"""Drive the ``flwr`` command line (Flower 1.42) with a private Flower home.

``flwr`` reads SuperLink *connections* from ``$FLWR_HOME/config.toml``::

    [superlink]
    default = "feddp"

    [superlink.feddp]
    address = "127.0.0.1:PORT"
    root-certificates = "/abs/ca.pem"     # or: insecure = true

and talks HTTPS to the SuperLink's Control API at that address. The commands
used here all accept ``--format json``:

* ``flwr supernode register PUBLIC_KEY [CONNECTION] --name LAB`` (node auth),
* ``flwr run APP_DIR [CONNECTION]`` (builds a FAB from ``APP_DIR/pyproject.toml``
  and starts a run; returns at once with the run id),
* ``flwr list [CONNECTION] --run-id ID`` (status ``finished:completed`` etc.),
* ``flwr stop RUN_ID [CONNECTION]``, ``flwr log RUN_ID [CONNECTION] --show``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .processes import absolute, flower_env, flower_executable

CONNECTION_NAME = "feddp"


class FlowerCliError(RuntimeError):
    """A ``flwr`` command failed or printed something unexpected."""


def write_flower_config(flwr_home: str | os.PathLike, address: str, *, root_cert: str | os.PathLike | None,
                        insecure: bool = False) -> Path:
    """Write ``flwr_home/config.toml`` with one default SuperLink connection to ``address``; return the file.

    ``root_cert`` (the CA certificate) is required unless ``insecure`` (plain
    text, explicit opt-in).
    """
    import tomli_w

    if not insecure and root_cert is None:
        raise ValueError("root_cert is required for a TLS connection")
    connection = {"address": address, **({"insecure": True} if insecure else {"root-certificates": absolute(root_cert)})}
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION_NAME, CONNECTION_NAME: connection}}))
    return path


@dataclass
class FlowerCli:
    """Run ``flwr`` sub-commands (``timeout`` seconds each) against the connection in ``flwr_home/config.toml``."""

    flwr_home: Path
    connection: str = CONNECTION_NAME
    timeout: float = 120.0

    def _run(self, args: list[str], *, json_output: bool = True) -> dict | str:
        argv = [flower_executable("flwr"), *args]
        if json_output:
            argv += ["--format", "json"]
        env = flower_env(self.flwr_home, {"COLUMNS": "200", "TERM": "dumb"})
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=self.timeout,
                                  stdin=subprocess.DEVNULL, check=False)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise FlowerCliError(f"flwr {' '.join(args)} timed out after {self.timeout} s") from exc
        if not json_output:
            if done.returncode != 0:
                raise FlowerCliError(f"flwr {' '.join(args)} failed ({done.returncode}): {done.stderr or done.stdout}")
            return done.stdout
        payload = _parse_json(done.stdout)
        if done.returncode != 0 or payload is None or not payload.get("success", False):
            detail = (payload or {}).get("error-message") or (done.stderr.strip() or done.stdout.strip())[-2000:]
            raise FlowerCliError(f"flwr {' '.join(args)} failed (exit {done.returncode}): {detail}")
        return payload

    def register_node(self, public_key: str | os.PathLike, name: str | None = None) -> int:
        """Register a SuperNode public key; return the node id."""
        name_args = ["--name", name] if name else []
        return int(self._run(["supernode", "register", str(public_key), self.connection, *name_args])["node-id"])

    def list_nodes(self) -> list[dict]:
        """``flwr supernode list`` entries."""
        return list(self._run(["supernode", "list", self.connection]).get("nodes", []))

    def start_run(self, app_dir: str | os.PathLike) -> int:
        """``flwr run APP_DIR``; return the run id (the run continues remotely)."""
        return int(self._run(["run", str(app_dir), self.connection])["run-id"])

    def run_info(self, run_id: int) -> dict:
        """Details of one run (``status`` such as ``running``, ``finished:completed``)."""
        runs = self._run(["list", self.connection, "--run-id", str(run_id)]).get("runs", [])
        if not runs:
            raise FlowerCliError(f"run {run_id} not found")
        return runs[0]

    def stop_run(self, run_id: int) -> None:
        """``flwr stop RUN_ID`` (errors ignored if it already finished)."""
        with contextlib.suppress(FlowerCliError):
            self._run(["stop", str(run_id), self.connection])

    def logs(self, run_id: int) -> str:
        """Logs of a run as text (``flwr log --show``)."""
        try:
            return str(self._run(["log", str(run_id), self.connection, "--show"], json_output=False))
        except FlowerCliError as exc:
            return f"(logs unavailable: {exc})"


def _parse_json(text: str) -> dict | None:
    """The JSON object in ``flwr``'s output (Flower may print a line before it), or None."""
    start, end = text.find("{"), text.rfind("}")
    try:
        return json.loads(text[start : end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        return None
