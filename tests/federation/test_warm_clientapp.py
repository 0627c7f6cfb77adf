"""The warm ClientApp parent: fork-per-message with Flower's own entry point, or a cold fallback."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from napari_feddp.federation.processes import ManagedProcess, SuperNodeProcess, _pid_alive, descendants, flower_env
from napari_feddp.federation.warm_clientapp import SOCKET_ENV, WarmClientApp

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server is Linux-only")

# A stand-in for Flower's ClientApp binary, used by the cold fallback only.
_FAKE_REAL = """#!/bin/sh
echo "cold start $*"
exit 7
"""


@pytest.fixture
def warm(tmp_path):
    """A warm parent that preloads only flwr's ClientApp entry point (fast to start)."""
    fake = tmp_path / "real-flwr-clientapp"
    fake.write_text(_FAKE_REAL)
    fake.chmod(0o755)
    w = WarmClientApp.create()
    launcher = w.write_launcher([str(fake)])
    proc = ManagedProcess(
        name="warm parent",
        argv=[*w.serve_argv(), "--preload", "flwr.supernode.cli.flwr_clientapp"],
        log_path=tmp_path / "warm.log",
        env=flower_env(tmp_path / "flwr-home"),
    ).start()
    assert w.wait_ready(120, alive=proc.is_running), proc.log_tail()
    yield w, launcher, proc
    proc.kill()
    w.cleanup()


def _env(w: WarmClientApp) -> dict[str, str]:
    return dict(os.environ, **{SOCKET_ENV: str(w.socket_path), "FEDDP_WARM_TEST": "from-launcher"})


def test_the_launcher_runs_flowers_clientapp_in_a_forked_child(warm, tmp_path):
    w, launcher, proc = warm
    assert stat.S_IMODE(w.socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(w.directory.stat().st_mode) == 0o700
    started = time.monotonic()
    result = subprocess.run(
        [str(launcher), "--help"], env=_env(w), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - started
    # Flower's own argument parser answered, through the launcher's stdout, with exit code 0,
    # and it did not start a cold interpreter (that prints "cold start", exit 7).
    assert result.returncode == 0, result.stderr
    assert "usage: flwr-clientapp" in result.stdout
    assert "cold start" not in result.stdout
    assert elapsed < 5.0  # a cold flwr import alone takes longer on this machine
    assert proc.is_running()  # the parent survives and serves the next message


def test_exit_codes_environment_and_cwd_are_the_launchers(warm, tmp_path):
    w, launcher, _proc = warm
    # A missing token makes Flower's entry point exit non-zero with its own message.
    result = subprocess.run([str(launcher)], env=_env(w), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--token" in result.stderr
    # Relative paths resolve in the launcher's directory, "~" with the launcher's HOME:
    # Flower finds both (empty) token files and says they hold no token.
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    for folder in (cwd, home):
        folder.mkdir()
        (folder / "empty-token").write_text("")
    for token_file, where in (("empty-token", cwd), ("~/empty-token", home)):
        result = subprocess.run(
            [str(launcher), "--token-file", token_file],
            env={**_env(w), "HOME": str(home)},
            cwd=cwd if where is cwd else tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert "does not contain a token" in result.stderr, result.stderr


def test_sigterm_to_the_launcher_reaches_the_child(warm, tmp_path):
    w, launcher, _proc = warm
    # The child blocks connecting to a runtime API nobody serves; SIGTERM must end it.
    popen = subprocess.Popen(
        [str(launcher), "--runtime-api-address", "127.0.0.1:9", "--token", "0" * 64, "--insecure"],
        env=_env(w),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(2.0)
    assert popen.poll() is None
    children_before = descendants(_proc.pid)
    assert children_before, "no forked ClientApp child"
    # The forked child names itself like the process it replaces.
    with open(f"/proc/{children_before[0]}/comm") as fh:
        assert fh.read().strip() == "flwr-clientapp"
    popen.send_signal(signal.SIGTERM)
    popen.wait(30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_pid_alive(pid) for pid in children_before):
        time.sleep(0.1)
    assert not any(_pid_alive(pid) for pid in children_before)


def test_sigterm_ends_the_parent_and_removes_its_socket(warm):
    w, _launcher, proc = warm
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(30) == 0
    assert not w.socket_path.exists()


def test_without_a_warm_parent_the_launcher_starts_the_real_clientapp(tmp_path):
    fake = tmp_path / "real"
    fake.write_text(_FAKE_REAL)
    fake.chmod(0o755)
    w = WarmClientApp.create()
    try:
        launcher = w.write_launcher([str(fake)])
        for env in (
            dict(os.environ, **{SOCKET_ENV: str(w.socket_path)}),  # nobody listening
            {k: v for k, v in os.environ.items() if k != SOCKET_ENV},  # not configured
        ):
            result = subprocess.run([str(launcher), "--token", "t"], env=env, capture_output=True, text=True)
            assert result.returncode == 7
            assert result.stdout.strip() == "cold start --token t"
    finally:
        w.cleanup()
    assert not w.directory.exists()


def test_the_default_cold_start_is_the_pinned_clientapp(tmp_path):
    w = WarmClientApp.create()
    try:
        launcher = w.write_launcher()
        env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
        result = subprocess.run([str(launcher), "--help"], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage: flwr-clientapp" in result.stdout  # Flower's entry point, started by app_pin
        assert "napari_feddp.federation.app_pin" in launcher.read_text()
    finally:
        w.cleanup()


def test_supernode_runs_with_a_warm_parent_and_cleans_it_up(tmp_path):
    node = SuperNodeProcess(
        name="lab-w",
        workdir=tmp_path,
        superlink_address="127.0.0.1:1",
        root_cert=None,
        private_key=None,
        insecure=True,
        max_retries=0,
    )
    with pytest.warns(UserWarning):
        node.start(wait=False)
    try:
        warm_dir = node._warm.directory
        assert node.warm_process is not None and node.warm_process.is_running()
        assert (warm_dir / "bin" / "flwr-clientapp").is_file()
    finally:
        node.stop(5)
    assert node.warm_process is None
    assert not warm_dir.exists()
