"""Child-process management: process trees, crashes of the parent, readiness, helpers."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from napari_feddp.federation.certs import create_pilot_pki
from napari_feddp.federation.coordinator import superlink_argv
from napari_feddp.federation.lab import supernode_argv
from napari_feddp.federation.processes import (
    FederationProcessError,
    ManagedProcess,
    find_free_port,
    flower_env,
    signals_raise_keyboard_interrupt,
    superexec_argv,
    write_secret,
)

from .conftest import wait_for_line, wait_no_processes

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

# A parent that starts a grandchild in its own session, as flower-superlink does
# with flower-superexec, then waits.
TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", sys.argv[1]],
                             start_new_session=True)
    print("ready", child.pid, flush=True)
    time.sleep(300)
    """
)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat[stat.rfind(")") + 2 :].startswith("Z")


@linux_only
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_stop_and_kill_end_the_whole_tree(tmp_path, how):
    tag = f"feddp-tree-{how}-{os.getpid()}"
    proc = ManagedProcess("tree", [sys.executable, "-c", TREE, tag], tmp_path / "tree.log").start()
    match = wait_for_line(proc, r"ready (\d+)")
    grandchild = int(match.group(1))
    assert _alive(grandchild)
    getattr(proc, how)()
    assert not proc.is_running()
    assert wait_no_processes(tag, timeout=10) == []


@linux_only
def test_children_die_with_a_crashed_parent(tmp_path):
    """SIGKILL of the coordinator (no atexit, no finally) still ends its Flower process.

    The child gets SIGTERM through PR_SET_PDEATHSIG. (Processes Flower itself
    starts in a new session, like SuperExec, watch their parent pid.)
    """
    tag = f"feddp-orphan-{os.getpid()}"
    coordinator = textwrap.dedent(
        f"""
        import sys, time
        from napari_feddp.federation.processes import ManagedProcess
        child = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(300)", {tag!r}]
        process = ManagedProcess("child", child, {str(tmp_path / 'c.log')!r}).start()
        while "\\nup" not in process.read_log():
            time.sleep(0.05)
        print("started", flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", coordinator], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "started"
        assert wait_no_processes(tag, timeout=0)  # the child runs
        parent.kill()
        parent.wait(10)
        assert wait_no_processes(tag, timeout=10) == []
    finally:
        parent.kill()
        for pid, _ in wait_no_processes(tag, 0):
            os.kill(pid, signal.SIGKILL)


def test_stop_ends_a_process_that_ignores_sigterm(tmp_path):
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    proc = ManagedProcess("stubborn", [sys.executable, "-c", stubborn], tmp_path / "stubborn.log").start()
    wait_for_line(proc, "(?m)^up")
    started = time.monotonic()
    assert proc.stop(timeout=1) == -signal.SIGKILL
    assert time.monotonic() - started < 10 and not proc.is_running()


def test_wait_port_reports_early_exit_with_the_log(tmp_path):
    proc = ManagedProcess("bad", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                          tmp_path / "bad.log").start()
    with pytest.raises(FederationProcessError, match="(?s)exited with code 3.*boom"):
        proc.wait_port("127.0.0.1", find_free_port(), timeout=30)


def test_sigterm_becomes_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt), signals_raise_keyboard_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_free_ports_are_on_loopback_and_distinct():
    ports = {find_free_port() for _ in range(5)}
    assert all(1024 < p < 65536 for p in ports)


def test_flower_env_is_private_and_quiet(tmp_path):
    env = flower_env(tmp_path / "home", {"X": "1"})
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert "127.0.0.1" in env["NO_PROXY"] and env["X"] == "1"


def test_command_lines_are_secure_unless_told_otherwise(tmp_path):
    pki = create_pilot_pki(tmp_path / "pki")
    secret = tmp_path / "secret"
    link = superlink_argv(9999, pki, superexec_secret=secret)
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--host") + 1] == "127.0.0.1"  # Control and Runtime APIs never leave loopback
    assert link[link.index("--isolation") + 1] == "process"  # only our SuperExec runs the ServerApp ...
    assert link[link.index("--superexec-auth-secret-file") + 1] == str(secret)  # ... holding the secret
    assert "--disable-runtime-dependency-installation" in link
    assert "--insecure" in superlink_argv(9999, None, superexec_secret=secret)
    node = supernode_argv("127.0.0.1:9999", 9000, root_cert=pki.ca.cert, private_key=tmp_path / "k",
                          superexec_secret=secret, node_config=tmp_path / "node-config.toml")
    assert "--insecure" not in node and "--auth-supernode-private-key" in node
    assert node[node.index("--isolation") + 1] == "process"
    assert node[node.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert node[node.index("--host") + 1] == "127.0.0.1"
    assert "--allow-runtime-dependency-installation" not in node
    exe = superexec_argv("127.0.0.1:9000", root_cert=None, secret=secret)
    assert "--insecure" in exe and exe[exe.index("--superexec-auth-secret-file") + 1] == str(secret)


def test_secrets_are_private_and_fresh(tmp_path):
    first = write_secret(tmp_path / "secrets" / "s").read_bytes()
    assert len(first) == 32
    assert stat.S_IMODE((tmp_path / "secrets" / "s").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "secrets").stat().st_mode) == 0o700
    assert write_secret(tmp_path / "secrets" / "s").read_bytes() != first
