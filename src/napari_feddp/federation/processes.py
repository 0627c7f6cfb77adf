"""Start and stop Flower SuperLink / SuperNode child processes, and clean up.

Every process started here

* runs the ``flower-*`` executable that sits next to the running Python
  interpreter (same virtual environment as this package, so ClientApps and
  ServerApps import the installed ``napari_feddp`` and never install anything),
* gets its own process group (``start_new_session``) and, on Linux, a
  parent-death signal so it does not outlive a crashed coordinator,
* writes stdout and stderr to a log file,
* is registered for cleanup: :meth:`ManagedProcess.stop` terminates the whole
  tree (Flower starts ``flower-superexec`` in its own session and that one
  starts ``flwr-serverapp`` / ``flwr-clientapp``), and an ``atexit`` hook stops
  whatever is still running when the interpreter exits.

Addresses are always on loopback with ports taken from the OS.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .warm_clientapp import WarmClientApp

LOOPBACK = "127.0.0.1"

#: Set to ``0`` to start every ClientApp cold, as plain Flower does.
WARM_CLIENTAPP_ENV = "NAPARI_FEDDP_WARM_CLIENTAPP"

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


class FederationProcessError(RuntimeError):
    """A Flower process failed to start, became unready, or exited early."""


class InsecureModeWarning(UserWarning):
    """Plain-text (no TLS) federation traffic was requested explicitly."""


def warn_insecure(what: str) -> None:
    """Emit the warning for an explicitly requested insecure (plain-text) mode.

    Parameters
    ----------
    what : str
        The component that runs without TLS (for the message).
    """
    warnings.warn(
        f"{what} runs WITHOUT TLS (--insecure): model updates and credentials "
        "travel in plain text and SuperNode authentication is off. Use only for "
        "local debugging on 127.0.0.1.",
        InsecureModeWarning,
        stacklevel=3,
    )


def find_free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that is free right now.

    Parameters
    ----------
    host : str
        Interface to probe, loopback by default.

    Returns
    -------
    int
        A port number; another program may still take it before use, so
        callers retry on "address already in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Return True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def flower_executable(name: str) -> str:
    """Absolute path of a Flower console script from this environment.

    Parameters
    ----------
    name : str
        ``flower-superlink``, ``flower-supernode`` or ``flwr``.

    Raises
    ------
    FileNotFoundError
        If the executable is neither next to ``sys.executable`` nor on PATH.
    """
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"{name} not found next to {sys.executable} or on PATH; install flwr>=1.42 "
        "in the same environment as napari-feddp"
    )


def flower_env(
    flwr_home: str | os.PathLike | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for a Flower child process.

    Parameters
    ----------
    flwr_home : path, optional
        Value for ``FLWR_HOME`` (Flower's config, installed FABs, credentials).
    extra : mapping, optional
        More variables (override the defaults).

    Returns
    -------
    dict
        A copy of ``os.environ`` with the Flower defaults, the environment's
        ``bin`` directory first on PATH (Flower spawns ``flower-superexec``,
        ``flwr-clientapp`` by name) and loopback excluded from proxies.
    """
    env = dict(os.environ)
    env.update(FLOWER_ENV_DEFAULTS)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    no_proxy = [p for p in env.get("NO_PROXY", "").split(",") if p]
    for host in (LOOPBACK, "localhost"):
        if host not in no_proxy:
            no_proxy.append(host)
    env["NO_PROXY"] = env["no_proxy"] = ",".join(no_proxy)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def descendants(pid: int) -> list[int]:
    """Process ids of all descendants of ``pid`` (children first), best effort."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies count as gone
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rfind(")") + 2 :].startswith("Z"):
            return False
    return True


_REGISTRY: set[ManagedProcess] = set()
_REGISTRY_LOCK = threading.Lock()


@dataclass(eq=False)
class ManagedProcess:
    """A child process with its own process group, log file and cleanup.

    Parameters
    ----------
    name : str
        Short label used in messages (``superlink``, ``supernode lab-a``).
    argv : list of str
        Command; ``argv[0]`` must be an absolute executable path.
    log_path : path
        File that receives stdout and stderr (appended).
    env : mapping, optional
        Environment; defaults to :func:`flower_env`.
    cwd : path, optional
        Working directory.
    """

    name: str
    argv: list[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _tree: set[int] = field(default_factory=set, init=False, repr=False)

    def start(self) -> ManagedProcess:
        """Start the process (idempotent while it runs)."""
        if self.popen is not None and self.popen.poll() is None:
            return self
        self.log_path = Path(self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = list(self.argv)
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]
        with open(self.log_path, "ab", buffering=0) as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            self.popen = subprocess.Popen(  # noqa: S603 - fixed executable list
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(self.env) if self.env is not None else flower_env(),
                cwd=str(self.cwd) if self.cwd else None,
                start_new_session=True,
                close_fds=True,
            )
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
        """True between start and exit."""
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

    def wait_for_log(
        self, pattern: str | re.Pattern, timeout: float, *, fail_on_exit: bool = True
    ) -> re.Match:
        """Block until ``pattern`` appears in the log.

        Parameters
        ----------
        pattern : str or compiled regex
            Searched in the whole log text.
        timeout : float
            Seconds to wait.
        fail_on_exit : bool
            Raise as soon as the process exits without a match.

        Returns
        -------
        re.Match

        Raises
        ------
        FederationProcessError
            On timeout or early exit (the message includes the log tail).
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.read_log())
            if match:
                return match
            if fail_on_exit and self.popen is not None and self.popen.poll() is not None:
                raise FederationProcessError(
                    f"{self.name} exited with code {self.popen.returncode} before "
                    f"it was ready. Log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise FederationProcessError(
                    f"{self.name} not ready after {timeout:.0f} s. "
                    f"Log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for exit; return the exit code (None on timeout)."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _snapshot_tree(self) -> set[int]:
        if self.popen is not None and self.popen.poll() is None:
            self._tree.update(descendants(self.popen.pid))
        return self._tree

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate the process and all its descendants.

        SIGTERM first (Flower then deactivates the SuperNode and stops its
        SuperExec), SIGKILL for anything left after ``timeout`` seconds.

        Returns
        -------
        int or None
            Exit code of the main process.
        """
        if self.popen is None:
            return None
        tree = set(self._snapshot_tree())
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            _signal_pid(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for pid in tree:
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + min(timeout, 3.0)
        while time.monotonic() < deadline and any(_pid_alive(p) for p in tree):
            time.sleep(0.1)
        self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the process group and every known descendant at once.

        This is what a crash looks like to the federation (no goodbye to the
        SuperLink); :meth:`stop` calls it for leftovers.
        """
        if self.popen is None:
            return
        tree = self._snapshot_tree()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        for pid in [self.popen.pid, *tree]:
            _signal_pid(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        with _REGISTRY_LOCK:
            _REGISTRY.discard(self)


def stop_all(timeout: float = 5.0) -> None:
    """Stop every process started by this module that is still registered."""
    with _REGISTRY_LOCK:
        procs = list(_REGISTRY)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.stop(timeout)


atexit.register(stop_all)


@contextlib.contextmanager
def signals_raise_keyboard_interrupt() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt inside the block.

    Command-line front ends wrap their work in this so that ``kill PID`` runs
    the same ``finally`` cleanup as Ctrl-C. SIGINT is included because a shell
    starts background jobs with SIGINT ignored, which Python would inherit.
    Only active in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- #
# SuperLink and SuperNode                                                     #
# --------------------------------------------------------------------------- #

_ADDRESS_IN_USE = re.compile(r"address already in use|Errno 98", re.IGNORECASE)


@dataclass(frozen=True)
class TlsFiles:
    """TLS material for the SuperLink (server side).

    Attributes
    ----------
    ca_cert, server_cert, server_key : Path
        PEM files (see :mod:`napari_feddp.federation.certs`).
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _absolute(path: str | os.PathLike) -> str:
    """Absolute path: Flower processes run in their own working directory."""
    return str(Path(path).expanduser().resolve())


def superlink_argv(
    port: int,
    tls: TlsFiles | None,
    *,
    superexec_secret: str | os.PathLike,
    enable_supernode_auth: bool = True,
    database: str | os.PathLike | None = None,
) -> list[str]:
    """Command line of ``flower-superlink`` (Flower 1.42), bound to loopback.

    One HTTP(S) port serves the Fleet, Control and Runtime APIs, so it never
    leaves loopback: labs reach the Fleet API through the gateway
    (:mod:`.gateway`). ``--isolation process`` with a SuperExec secret means
    only the coordinator's own SuperExec, holding that secret, can pick up a
    ServerApp. ``tls=None`` means ``--insecure`` (and no SuperNode
    authentication, which needs TLS). Runtime dependency installation is
    disabled: apps use this environment.
    """
    argv = [flower_executable("flower-superlink"), "--host", LOOPBACK, "--port", str(port)]
    if tls is None:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-ca-certfile", _absolute(tls.ca_cert),
            "--ssl-certfile", _absolute(tls.server_cert),
            "--ssl-keyfile", _absolute(tls.server_key),
        ]  # fmt: skip
        if enable_supernode_auth:
            argv.append("--enable-supernode-auth")
    argv += ["--isolation", "process", "--superexec-auth-secret-file", _absolute(superexec_secret)]
    if database is not None:
        argv += ["--database", _absolute(database)]
    argv.append("--disable-runtime-dependency-installation")
    return argv


def superexec_argv(
    runtime_address: str, *, root_cert: str | os.PathLike | None, secret: str | os.PathLike
) -> list[str]:
    """Command line of ``flower-superexec`` for a SuperLink's or SuperNode's Runtime API.

    ``root_cert=None`` means a plain-text Runtime API (a SuperNode's, on loopback).
    """
    argv = [flower_executable("flower-superexec"), "--runtime-api-address", runtime_address,
            "--superexec-auth-secret-file", _absolute(secret)]  # fmt: skip
    if root_cert is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", _absolute(root_cert)]
    return argv


def write_secret(path: str | os.PathLike) -> Path:
    """Write 32 random bytes to ``path`` (mode 0600, folder 0700); return the path.

    The SuperExec shared secret: Flower authenticates task pick-up at a Runtime
    API with an HMAC keyed by it, so another process cannot take a ServerApp or
    ClientApp task.
    """
    import secrets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    path.chmod(0o600)
    return path


def supernode_argv(
    superlink_address: str,
    runtime_port: int,
    *,
    root_cert: str | os.PathLike | None,
    private_key: str | os.PathLike | None,
    superexec_secret: str | os.PathLike,
    node_config: Mapping[str, object] | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """Command line of ``flower-supernode`` (Flower 1.42).

    ``root_cert=None`` means ``--insecure``. ``runtime_port`` is the SuperNode's
    own local Runtime HTTP API, on loopback. ``--isolation process`` with a
    SuperExec secret: only the lab's own SuperExec (which runs ClientApps
    through the app pin, :mod:`.app_pin`) can pick up its tasks.
    """
    argv = [
        flower_executable("flower-supernode"),
        "--superlink", superlink_address,
        "--host", LOOPBACK,
        "--port", str(runtime_port),
        "--isolation", "process",
        "--superexec-auth-secret-file", _absolute(superexec_secret),
    ]  # fmt: skip
    if root_cert is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", _absolute(root_cert)]
    if private_key is not None:
        argv += ["--auth-supernode-private-key", _absolute(private_key)]
    if node_config:
        argv += ["--node-config", format_node_config(node_config)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def format_node_config(config: Mapping[str, object]) -> str:
    """Format ``{key: value}`` as Flower's ``--node-config`` string.

    Flower splits the string with a regular expression and parses each value
    as TOML, so strings become TOML literal strings (``'...'``, no escapes) or,
    if they contain a single quote, basic strings without escapes.

    Raises
    ------
    ValueError
        For keys other than letters, digits, ``-``, ``_``, or strings holding
        both quote characters, a backslash next to a double quote, or a newline.
    """
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(key)):
            raise ValueError(f"invalid node-config key {key!r}")
        if isinstance(value, bool):
            literal = "true" if value else "false"
        elif isinstance(value, (int, float)):
            literal = repr(value)
        else:
            text = str(value)
            if "\n" in text or "\r" in text:
                raise ValueError(f"node-config value for {key!r} contains a newline")
            if "'" not in text:
                literal = f"'{text}'"
            elif '"' not in text and "\\" not in text:
                literal = f'"{text}"'
            else:
                raise ValueError(f"node-config value for {key!r} cannot be quoted for Flower: {text!r}")
        parts.append(f"{key}={literal}")
    return " ".join(parts)


@dataclass(eq=False)
class SuperLinkProcess:
    """The coordinator's processes: SuperLink on loopback, its SuperExec, the Fleet gateway.

    * ``flower-superlink`` listens on ``127.0.0.1`` only (Fleet, Control and
      Runtime API share its port); :attr:`address` is for the coordinator's
      own ``flwr`` commands.
    * ``flower-superexec`` runs the ServerApp; it authenticates to the
      SuperLink's Runtime API with a shared secret (``superexec.secret``,
      mode 0600, new at every start), so no other process can take the task.
    * the gateway (:mod:`.gateway`) listens on ``host:port`` and forwards the
      Fleet API only; :attr:`fleet_address` is what labs dial.

    Parameters
    ----------
    workdir : path
        Logs, the secret and the SuperLink's ``FLWR_HOME``.
    tls : TlsFiles or None
        None only with ``insecure=True``.
    insecure : bool
        Explicit opt-in to plain text; warns.
    enable_supernode_auth : bool
        Only registered SuperNode public keys may connect (needs TLS).
    port : int, optional
        Public (gateway) port; default picks a free one.
    host : str
        Public interface of the gateway (loopback by default; the TLS
        certificate must name the address the labs dial).
    """

    workdir: Path
    tls: TlsFiles | None
    insecure: bool = False
    enable_supernode_auth: bool = True
    port: int | None = None
    ready_timeout: float = 60.0
    host: str = LOOPBACK
    process: ManagedProcess | None = field(default=None, init=False)
    superexec: ManagedProcess | None = field(default=None, init=False)
    gateway: ManagedProcess | None = field(default=None, init=False)
    internal_port: int | None = field(default=None, init=False)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the SuperLink itself (Control API; coordinator only)."""
        return f"{LOOPBACK}:{self.internal_port}"

    @property
    def fleet_address(self) -> str:
        """``HOST:PORT`` labs dial (the gateway; Fleet API only)."""
        host = LOOPBACK if self.host in ("0.0.0.0", "") else self.host
        return f"{host}:{self.port}"

    @property
    def secret_path(self) -> Path:
        """The SuperExec shared secret."""
        return Path(self.workdir) / "secrets" / "superexec.secret"

    def start(self) -> SuperLinkProcess:
        """Start SuperLink, SuperExec and gateway; wait until labs can connect."""
        if self.tls is None and not self.insecure:
            raise ValueError("SuperLink needs TLS files unless insecure=True is given")
        if self.insecure:
            warn_insecure("SuperLink")
        workdir = Path(self.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        write_secret(self.secret_path)
        env = flower_env(workdir / "flwr-home")
        for attempt in range(4):
            port = find_free_port()
            proc = ManagedProcess(
                name="superlink",
                argv=superlink_argv(
                    port,
                    None if self.insecure else self.tls,
                    superexec_secret=self.secret_path,
                    enable_supernode_auth=self.enable_supernode_auth and not self.insecure,
                ),
                log_path=workdir / "superlink.log",
                env=env,
                cwd=workdir,
            ).start()
            self.process, self.internal_port = proc, port
            try:
                proc.wait_for_log(r"Application startup complete|Uvicorn running on", self.ready_timeout)
                _wait_port(proc, LOOPBACK, port, self.ready_timeout)
                break
            except FederationProcessError:
                clash = _ADDRESS_IN_USE.search(proc.log_tail(40))
                proc.stop(5)
                if not clash or attempt == 3:
                    raise
        self.superexec = ManagedProcess(
            name="superexec (serverapp)",
            argv=superexec_argv(
                self.address,
                root_cert=None if self.insecure else self.tls.ca_cert,
                secret=self.secret_path,
            ),
            log_path=workdir / "superexec.log",
            env=env,
            cwd=workdir,
        ).start()
        self._start_gateway(workdir)
        return self

    def _start_gateway(self, workdir: Path) -> None:
        from .gateway import gateway_argv

        fixed = self.port is not None
        for attempt in range(4):
            port = self.port if fixed else find_free_port(self.host if self.host else LOOPBACK)
            tls = None if self.insecure else self.tls
            proc = ManagedProcess(
                name="fleet gateway",
                argv=gateway_argv(
                    self.host, port, self.address,
                    certfile=None if tls is None else tls.server_cert,
                    keyfile=None if tls is None else tls.server_key,
                    ca_cert=None if tls is None else tls.ca_cert,
                ),  # fmt: skip
                log_path=workdir / "gateway.log",
                env=flower_env(),
                cwd=workdir,
            ).start()
            self.gateway, self.port = proc, port
            try:
                _wait_port(proc, self.fleet_address.rsplit(":", 1)[0], port, self.ready_timeout)
                return
            except FederationProcessError:
                clash = _ADDRESS_IN_USE.search(proc.log_tail(40))
                proc.stop(5)
                if fixed or not clash or attempt == 3:
                    raise

    def is_running(self) -> bool:
        """True while SuperLink and gateway both run."""
        return all(p is not None and p.is_running() for p in (self.process, self.gateway))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the gateway, the SuperExec (and any ServerApp), then the SuperLink."""
        for proc in (self.gateway, self.superexec, self.process):
            if proc is not None:
                proc.stop(timeout)


def _wait_port(proc: ManagedProcess, host: str, port: int, timeout: float) -> None:
    """Wait until ``host:port`` accepts connections while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while not port_is_open(host, port):
        if not proc.is_running():
            raise FederationProcessError(f"{proc.name} exited with code {proc.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise FederationProcessError(f"{proc.name}: port {port} not open after {timeout:.0f} s:\n{proc.log_tail()}")
        time.sleep(0.1)


_NODE_ID = re.compile(r"SuperNode ID:\s*(\d+)")


@dataclass(eq=False)
class SuperNodeProcess:
    """A ``flower-supernode`` child process (one lab) on loopback.

    Parameters
    ----------
    name : str
        Lab name (log file and messages).
    workdir : path
        Holds ``<name>.log`` and the node's ``FLWR_HOME``.
    superlink_address : str
        ``host:port`` of the SuperLink.
    root_cert : path or None
        CA certificate to verify the SuperLink; None only with ``insecure``.
    private_key : path or None
        OpenSSH EC private key registered with the SuperLink.
    node_config : mapping
        Lab settings passed as ``--node-config`` (data directory, ...).
    insecure : bool
        Explicit opt-in to plain text; warns.
    extra_env : mapping, optional
        Additional environment (e.g. ``PYTHONPATH`` for a custom trainer).
    warm_clientapp : bool
        Start ClientApp processes from a pre-imported parent
        (:mod:`napari_feddp.federation.warm_clientapp`) instead of a cold
        interpreter per message; falls back to a cold (still pinned) start
        whenever that parent is not ready. Default True unless the environment sets
        ``NAPARI_FEDDP_WARM_CLIENTAPP=0``.
    """

    name: str
    workdir: Path
    superlink_address: str
    root_cert: Path | None
    private_key: Path | None
    node_config: Mapping[str, object] = field(default_factory=dict)
    insecure: bool = False
    extra_env: Mapping[str, str] | None = None
    max_retries: int | None = None
    max_wait_time: float | None = None
    ready_timeout: float = 60.0
    warm_clientapp: bool = field(default_factory=lambda: os.environ.get(WARM_CLIENTAPP_ENV, "1") != "0")
    process: ManagedProcess | None = field(default=None, init=False)
    runtime_port: int | None = field(default=None, init=False)
    node_id: int | None = field(default=None, init=False)
    warm_process: ManagedProcess | None = field(default=None, init=False, repr=False)
    _warm: WarmClientApp | None = field(default=None, init=False, repr=False)

    superexec: ManagedProcess | None = field(default=None, init=False)

    @property
    def secret_path(self) -> Path:
        """The SuperExec shared secret of this node (mode 0600)."""
        return Path(self.workdir) / "secrets" / "superexec.secret"

    def start(self, wait: bool = True) -> SuperNodeProcess:
        """Start the SuperNode and its SuperExec; with ``wait`` block until the SuperLink accepted the node.

        The SuperExec starts every ClientApp through the app pin (the
        ``flwr-clientapp`` launcher of :mod:`.warm_clientapp`, first on its
        ``PATH``), warm or cold.

        Raises
        ------
        FederationProcessError
            If the node exits first (e.g. its key is not registered).
        """
        if self.root_cert is None and not self.insecure:
            raise ValueError("SuperNode needs the CA certificate unless insecure=True is given")
        if self.insecure:
            warn_insecure(f"SuperNode {self.name}")
        workdir = Path(self.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        write_secret(self.secret_path)
        self.runtime_port = find_free_port()
        env = flower_env(workdir / "flwr-home", self.extra_env)
        self.process = ManagedProcess(
            name=f"supernode {self.name}",
            argv=supernode_argv(
                self.superlink_address,
                self.runtime_port,
                root_cert=None if self.insecure else self.root_cert,
                private_key=None if self.insecure else self.private_key,
                superexec_secret=self.secret_path,
                node_config=self.node_config,
                max_retries=self.max_retries,
                max_wait_time=self.max_wait_time,
            ),
            log_path=workdir / f"{self.name}.log",
            env=env,
            cwd=workdir,
        ).start()
        self.superexec = ManagedProcess(
            name=f"superexec {self.name}",
            argv=superexec_argv(f"{LOOPBACK}:{self.runtime_port}", root_cert=None, secret=self.secret_path),
            log_path=workdir / f"{self.name}-clientapps.log",
            env=self._clientapp_env(env),
            cwd=workdir,
        ).start()
        if wait:
            self.wait_ready()
        return self

    def _clientapp_env(self, env: dict[str, str]) -> dict[str, str]:
        """Environment of the SuperExec: the pinned ``flwr-clientapp`` launcher first on PATH."""
        from .app_pin import HISTORY_ENV
        from .warm_clientapp import SOCKET_ENV, WarmClientApp

        self._stop_warm_parent(kill=True)
        warm = WarmClientApp.create()
        warm.write_launcher()
        self._warm = warm
        env = dict(env)
        env["PATH"] = str(warm.bin_dir) + os.pathsep + env["PATH"]
        history = self.node_config.get("history-file")
        if history:
            env[HISTORY_ENV] = str(history)
        if self.warm_clientapp:
            self.warm_process = ManagedProcess(
                name=f"clientapp parent {self.name}",
                argv=warm.serve_argv(),
                log_path=Path(self.workdir) / f"{self.name}-clientapp-parent.log",
                env=env,
                cwd=Path(self.workdir),
            ).start()
            env[SOCKET_ENV] = str(warm.socket_path)
        return env

    def _stop_warm_parent(self, kill: bool = False, timeout: float = 5.0) -> None:
        if self.warm_process is not None:
            if kill:
                self.warm_process.kill()
            else:
                self.warm_process.stop(timeout)
            self.warm_process = None
        if self._warm is not None:
            self._warm.cleanup()
            self._warm = None

    def wait_ready(self, timeout: float | None = None) -> int:
        """Wait for the ``SuperNode ID`` log line; return the node id."""
        assert self.process is not None, "start() first"
        match = self.process.wait_for_log(_NODE_ID, timeout or self.ready_timeout)
        self.node_id = int(match.group(1))
        return self.node_id

    def is_running(self) -> bool:
        """True while the SuperNode process runs."""
        return self.process is not None and self.process.is_running()

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (the node deactivates itself at the SuperLink), then its SuperExec."""
        if self.process is not None:
            self.process.stop(timeout)
        if self.superexec is not None:
            self.superexec.stop(timeout)
        self._stop_warm_parent(timeout=timeout)

    def kill(self) -> None:
        """Crash the node: SIGKILL it, its SuperExec and running ClientApp."""
        if self.process is not None:
            self.process.kill()
        if self.superexec is not None:
            self.superexec.kill()
        self._stop_warm_parent(kill=True)
