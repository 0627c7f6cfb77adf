"""Child processes of a federation: start, log, stop with their whole tree.

Every process started here

* runs a ``flower-*`` executable from this virtual environment (so ClientApps
  and ServerApps import the installed ``napari_feddp`` and never install
  anything) with :func:`flower_env`,
* gets its own session and, on Linux, a parent-death signal, so it does not
  outlive a crashed coordinator or lab,
* writes stdout and stderr to a log file,
* is stopped with every descendant (Flower starts ``flower-superexec`` in a
  session of its own, and that one starts ``flwr-serverapp`` /
  ``flwr-clientapp``); an ``atexit`` hook stops whatever still runs when the
  interpreter exits.

Addresses are on loopback with ports taken from the OS.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"

#: Environment every Flower child process gets (no telemetry, no update check,
#: no runtime ``uv sync`` of app dependencies, faster SuperExec task polling).
FLOWER_ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5",
    "NO_COLOR": "1",
    "PYTHONUNBUFFERED": "1",
}

# Sets PR_SET_PDEATHSIG (Linux) so the child gets SIGTERM if its parent dies,
# then execs the real command. The signal survives exec.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(70)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)

ADDRESS_IN_USE = re.compile(r"address already in use|Errno 98", re.IGNORECASE)


class FederationProcessError(RuntimeError):
    """A Flower process failed to start, became unready, or exited early."""


class InsecureModeWarning(UserWarning):
    """Plain-text (no TLS) federation traffic was requested explicitly."""


def warn_insecure(what: str) -> None:
    """Warn that ``what`` runs without TLS, as explicitly requested (``--insecure``)."""
    warnings.warn(f"{what} runs WITHOUT TLS (--insecure): model updates and credentials travel in plain text and "
                  "SuperNode authentication is off. Use only for local debugging on 127.0.0.1.",
                  InsecureModeWarning, stacklevel=3)  # fmt: skip


def find_free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that is free right now (callers retry on "address already in use")."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def flower_executable(name: str) -> str:
    """Absolute path of a Flower console script (``flwr``, ``flower-supernode``, ...) of this environment."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    if found := shutil.which(name):
        return found
    raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH; install flwr>=1.42 "
                            "in the same environment as napari-feddp")


def flower_env(flwr_home: str | os.PathLike | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower child process.

    A copy of ``os.environ`` with :data:`FLOWER_ENV_DEFAULTS`, this
    environment's ``bin`` folder first on PATH (Flower starts its own
    executables by name), loopback excluded from proxies, ``FLWR_HOME`` set to
    ``flwr_home`` and the ``extra`` variables on top.
    """
    env = {**os.environ, **FLOWER_ENV_DEFAULTS}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    no_proxy = [p for p in env.get("NO_PROXY", "").split(",") if p]
    no_proxy += [host for host in (LOOPBACK, "localhost") if host not in no_proxy]
    env["NO_PROXY"] = env["no_proxy"] = ",".join(no_proxy)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update({str(k): str(v) for k, v in (extra or {}).items()})
    return env


def absolute(path: str | os.PathLike) -> str:
    """Absolute path: Flower processes run in their own working directory."""
    return str(Path(path).expanduser().resolve())


def write_private(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` readable by this user only (mode 0600); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(data)
    path.chmod(0o600)
    return path


def write_secret(path: str | os.PathLike) -> Path:
    """Write 32 fresh random bytes to ``path`` (mode 0600, folder 0700); return the path.

    The SuperExec shared secret: Flower authenticates task pick-up at a Runtime
    API with an HMAC keyed by it, so no other process can take a ServerApp or
    ClientApp task.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).parent.chmod(0o700)
    return write_private(path, secrets.token_bytes(32))


def tls_args(root_cert: str | os.PathLike | None) -> list[str]:
    """``--root-certificates CA`` of a Flower client process, or ``--insecure`` when ``root_cert`` is None."""
    return ["--insecure"] if root_cert is None else ["--root-certificates", absolute(root_cert)]


def superexec_argv(runtime_address: str, *, root_cert: str | os.PathLike | None, secret: str | os.PathLike) -> list[str]:
    """Command line of ``flower-superexec`` for a SuperLink's or SuperNode's Runtime API."""
    return [flower_executable("flower-superexec"), "--runtime-api-address", runtime_address,
            "--superexec-auth-secret-file", absolute(secret), *tls_args(root_cert)]  # fmt: skip


def _alive(process: psutil.Process) -> bool:
    """True while ``process`` runs (a zombie has exited)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


_REGISTRY: set[ManagedProcess] = set()
_REGISTRY_LOCK = threading.Lock()


@dataclass(eq=False)
class ManagedProcess:
    """A child process with its own session, a log file and cleanup of its whole tree.

    ``name`` labels messages, ``argv[0]`` is an absolute executable, stdout and
    stderr are appended to ``log_path``; ``env`` defaults to :func:`flower_env`.
    """

    name: str
    argv: list[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _tree: dict[int, psutil.Process] = field(default_factory=dict, init=False, repr=False)

    def start(self) -> ManagedProcess:
        """Start the process (idempotent while it runs)."""
        if self.is_running():
            return self
        self.log_path = Path(self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = list(self.argv)
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]
        with open(self.log_path, "ab", buffering=0) as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=dict(self.env) if self.env is not None else flower_env(),
                                          cwd=self.cwd, start_new_session=True, close_fds=True)  # fmt: skip
        self._tree = {}
        with _REGISTRY_LOCK:
            _REGISTRY.add(self)
        return self

    @property
    def pid(self) -> int | None:
        """Process id, or None before :meth:`start`."""
        return self.popen.pid if self.popen else None

    @property
    def returncode(self) -> int | None:
        """Exit status, or None while running (or before start)."""
        return self.popen.poll() if self.popen else None

    def is_running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def read_log(self) -> str:
        """Whole log file as text (empty if missing)."""
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """Last ``lines`` lines of the log."""
        return "\n".join(self.read_log().splitlines()[-lines:])

    def wait_port(self, host: str, port: int, timeout: float) -> None:
        """Block until ``host:port`` accepts connections; FederationProcessError if the process exits first
        or the port stays closed for ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
                return
            if not self.is_running():
                raise FederationProcessError(f"{self.name} exited with code {self.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise FederationProcessError(
                    f"{self.name}: port {port} not open after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def tree(self) -> list[psutil.Process]:
        """The process and every descendant seen so far that still runs (remembered: once their parent is
        gone they are re-parented and no longer found through it)."""
        if self.is_running():
            with contextlib.suppress(psutil.Error):
                main = psutil.Process(self.popen.pid)
                for process in (main, *main.children(recursive=True)):
                    self._tree.setdefault(process.pid, process)
        return [process for process in self._tree.values() if _alive(process)]

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate the process and all its descendants; return its exit code.

        SIGTERM to the process first (Flower then deactivates a SuperNode and
        stops what it started), then to what is left of the tree, SIGKILL for
        anything still alive after ``timeout`` (at most 3 s for descendants).
        """
        if self.popen is None:
            return None
        tree = self.tree()
        if self.is_running():
            self.popen.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        rest = [process for process in tree if process.pid != self.popen.pid and _alive(process)]
        for process in rest:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        deadline = time.monotonic() + min(timeout, 3.0)
        while time.monotonic() < deadline and any(_alive(process) for process in rest):
            time.sleep(0.1)
        self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the process and every known descendant at once: a crash, no goodbye to the SuperLink."""
        if self.popen is None:
            return
        for process in self.tree():
            with contextlib.suppress(psutil.Error):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        with _REGISTRY_LOCK:
            _REGISTRY.discard(self)


@atexit.register
def stop_all(timeout: float = 5.0) -> None:
    """Stop every process started here that still runs (at interpreter exit)."""
    with _REGISTRY_LOCK:
        processes = list(_REGISTRY)
    for process in processes:
        with contextlib.suppress(Exception):
            process.stop(timeout)


@contextlib.contextmanager
def signals_raise_keyboard_interrupt() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt inside the block (main thread only).

    Command-line front ends wrap their work in this so that ``kill PID`` runs
    the same ``finally`` cleanup as Ctrl-C. SIGINT is included because a shell
    starts background jobs with SIGINT ignored, which Python would inherit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, _raise) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
