"""Start Flower ClientApp processes from a pre-imported parent (a fork server).

Flower 1.42's SuperNode runs every message in a new ``flwr-clientapp``
process (``--isolation subprocess``). Starting one means importing flwr,
torch, Opacus and this package: about 5 s of CPU on an idle 2-core machine
and 20 s when the cores are busy training, paid by every lab in every round.

This module keeps the process-per-message model and removes the import cost:

* a **warm parent** (``python -m napari_feddp.federation.warm_clientapp serve``)
  imports everything once, when the SuperNode starts, then waits on a private
  Unix socket (mode 0600 in a 0700 directory);
* a tiny **launcher** named ``flwr-clientapp`` is put first on the SuperNode's
  ``PATH``. When Flower's SuperExec starts it, it connects to the socket and
  passes its arguments, environment, working directory and its
  stdin/stdout/stderr (``SCM_RIGHTS``). The warm parent forks; the child
  becomes that ClientApp process (it runs Flower's own ``flwr-clientapp``
  entry point with those arguments) and reports its exit code back; the
  launcher exits with it and forwards SIGTERM/SIGINT/SIGHUP to the child.
* if the socket is missing or the warm parent is gone, the launcher ``exec``s
  the pinned cold start (``python -m napari_feddp.federation.app_pin``):
  nothing changes but the speed.

Warm or cold, every ClientApp runs through :mod:`.app_pin`, which refuses any
app bundle other than this package's own before any of its code is imported.

Each message still gets a fresh process (a forked copy of the parent, which
has never run a model, opened a connection or started a thread), so state
never leaks from one round to the next. Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: Environment variable holding the warm parent's socket path.
SOCKET_ENV = "NAPARI_FEDDP_CLIENTAPP_SOCKET"

#: Modules the warm parent imports before it accepts the first request.
PRELOAD = (
    "flwr.supernode.cli.flwr_clientapp",
    "napari_feddp.federation.app_pin",
    "napari_feddp.federation.client_app",
    "napari_feddp.models",
    "napari_feddp.models.store",
    "napari_feddp.training",
    "opacus",
    "opacus.accountants.utils",
    "opacus.utils.batch_memory_manager",
    "opacus.validators",
)

_HEADER = struct.Struct("!I")

# The launcher runs as ``python -IS``: standard library only, no site
# packages, so it starts in ~20 ms. It must not import this package.
_LAUNCHER_SOURCE = '''\
import json, os, signal, socket, struct, sys
REAL = {real!r}
def fallback():
    os.execv(REAL[0], [*REAL, *sys.argv[1:]])
path = os.environ.get({env!r})
if not path:
    fallback()
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    conn.connect(path)
    payload = json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}).encode()
    socket.send_fds(conn, [struct.pack("!I", len(payload))], [0, 1, 2])
    conn.sendall(payload)
    reader = conn.makefile("rb")
    first = reader.readline().split()
except OSError:
    first = []
if len(first) != 2 or first[0] != b"pid":
    conn.close()
    fallback()
child = int(first[1])
def forward(signum, _frame):
    try:
        os.kill(child, signum)
    except OSError:
        pass
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, forward)
last = reader.readline().split()
sys.exit(int(last[1]) if len(last) == 2 and last[0] == b"exit" else 1)
'''


@dataclass
class WarmClientApp:
    """Files of one warm ClientApp parent: its socket and the launcher's directory."""

    directory: Path

    @classmethod
    def create(cls) -> WarmClientApp:
        """A fresh private directory (short path: Unix socket paths max ~100 bytes)."""
        return cls(Path(tempfile.mkdtemp(prefix="feddp-capp-")))

    @property
    def socket_path(self) -> Path:
        return self.directory / "warm.sock"

    @property
    def bin_dir(self) -> Path:
        """Put first on the SuperNode's ``PATH``."""
        return self.directory / "bin"

    def write_launcher(self, cold_start: list[str] | None = None) -> Path:
        """Write the ``flwr-clientapp`` launcher: warm parent if listening, else ``cold_start``.

        ``cold_start`` defaults to the pinned ClientApp (:func:`.app_pin.cold_start_argv`);
        the launcher appends Flower's arguments to it.
        """
        from .app_pin import cold_start_argv

        self.directory.chmod(0o700)
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        launcher = self.bin_dir / "flwr-clientapp"
        source = _LAUNCHER_SOURCE.format(real=list(cold_start or cold_start_argv()), env=SOCKET_ENV)
        launcher.write_text(f"#!{sys.executable} -IS\n{source}")
        launcher.chmod(0o700)
        return launcher

    def serve_argv(self) -> list[str]:
        """Command line of the warm parent."""
        return [sys.executable, "-m", __name__, "serve", "--socket", str(self.socket_path)]

    def wait_ready(self, timeout: float = 120.0, alive=lambda: True) -> bool:
        """Wait until the warm parent listens (it imports torch first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive():
            if self.socket_path.exists():
                return True
            time.sleep(0.05)
        return self.socket_path.exists()

    def cleanup(self) -> None:
        """Remove the directory (socket, launcher)."""
        shutil.rmtree(self.directory, ignore_errors=True)


# --------------------------------------------------------------------------- #
# Warm parent                                                                 #
# --------------------------------------------------------------------------- #


def serve(socket_path: Path, preload: tuple[str, ...] = PRELOAD) -> int:
    """Import ``preload``, then fork one ClientApp child per launcher connection."""
    import importlib

    for name in preload:
        importlib.import_module(name)
    # Forked children must not inherit half-written buffers.
    sys.stdout.flush()
    sys.stderr.flush()
    # Children are reaped by the kernel; the parent never waits for them.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # SIGTERM (from SuperNodeProcess.stop or a parent-death signal) ends the loop through
    # ``finally``, so the socket file goes away with the process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    socket_path = Path(socket_path)
    tmp = socket_path.with_name(socket_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp))
    tmp.chmod(0o600)
    server.listen(16)
    # Appear under the final name only once listening: the SuperNode side
    # waits for the path to exist.
    tmp.rename(socket_path)
    parent = os.getppid()
    server.settimeout(1.0)
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                if os.getppid() != parent:  # whoever started us is gone
                    return 0
                continue
            pid = os.fork()
            if pid == 0:  # child: becomes the ClientApp process
                server.close()
                os._exit(_run_child(conn))
            conn.close()
    finally:
        server.close()
        with contextlib.suppress(OSError):
            socket_path.unlink()


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = conn.recv(size)
        if not chunk:
            raise ConnectionError("launcher closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _run_child(conn: socket.socket) -> int:
    """In the forked child: adopt the launcher's identity and run Flower's ClientApp."""
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    conn.settimeout(None)
    try:
        header, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
        if len(header) != _HEADER.size or len(fds) != 3:
            return 70
        (size,) = _HEADER.unpack(header)
        request = json.loads(_recv_exact(conn, size))
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["flwr-clientapp", *request["argv"]]
        _set_process_name(b"flwr-clientapp")
        conn.sendall(f"pid {os.getpid()}\n".encode())
    except Exception:  # noqa: BLE001 - the launcher falls back to a cold start
        return 70
    code = _run_clientapp_main()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    with contextlib.suppress(OSError):
        conn.sendall(f"exit {code}\n".encode())
    return code


def _set_process_name(name: bytes) -> None:
    """Show the child as ``flwr-clientapp`` in ``ps -o comm``/``top`` (Linux; best effort)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _run_clientapp_main() -> int:
    from .app_pin import run_pinned_clientapp

    return run_pinned_clientapp()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_feddp.federation.warm_clientapp")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="import once, then fork ClientApp processes on request")
    srv.add_argument("--socket", required=True, type=Path)
    srv.add_argument("--preload", action="append", help="module to import first (repeatable)")
    args = parser.parse_args(argv)
    return serve(args.socket, tuple(args.preload) if args.preload else PRELOAD)


if __name__ == "__main__":
    sys.exit(main())
