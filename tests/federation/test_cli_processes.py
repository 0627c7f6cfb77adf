"""The CLI as users run it: ``serve`` and ``join`` until killed, ``join`` to nobody, ``demo`` as written.

Each command runs in its own Python process; the test signals it like a user
would (Ctrl-C, ``kill``) and checks that no Flower process survives.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from napari_feddp.federation.certs import create_node_keys, create_pilot_pki
from napari_feddp.federation.demo import make_synthetic_lab
from napari_feddp.federation.lab import LabNode, LabStatus
from napari_feddp.federation.processes import ManagedProcess, find_free_port

from .conftest import wait_for_line, wait_no_processes

pytestmark = pytest.mark.slow  # real Flower processes

# Until napari_feddp.cli registers the module itself, add it here (idempotent).
CLI = (
    "import sys; from napari_feddp import cli\n"
    "if 'federation' not in cli.COMMAND_MODULES: cli.COMMAND_MODULES = (*cli.COMMAND_MODULES, 'federation')\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)


def start_cli(*argv: str, cwd: Path, **environ: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **environ}
    return subprocess.Popen(
        [sys.executable, "-c", CLI, "federation", *argv], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 90.0) -> tuple[re.Match, str]:
    """Read the command's output until ``pattern`` appears (or fail with the output)."""
    seen = []
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match, "".join(seen)
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"{pattern!r} not seen; output:\n{''.join(seen)}")


def finish(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    os.set_blocking(proc.stdout.fileno(), True)
    out, _ = proc.communicate(timeout=timeout)
    return out


@pytest.mark.slow
def test_serve_and_join_until_killed(tmp_path):
    pki = create_pilot_pki(tmp_path / "pki")
    # The lab makes its own key pair; only the public key reaches the coordinator.
    keys = start_cli("keys", "--out", str(tmp_path / "keys"), "--lab", "lab-a", cwd=tmp_path)
    assert "public key" in finish(keys) and keys.returncode == 0
    lab_key, lab_pub = tmp_path / "keys" / "lab-a.key", tmp_path / "keys" / "lab-a.pub"
    serve = start_cli("serve", "--pki", str(pki.root), "--workdir", str(tmp_path / "coord"),
                      "--register", "lab-a", str(lab_pub), cwd=tmp_path)
    try:
        match, _ = read_until(serve, r"labs dial (\S+) \(Fleet API only, TLS\)")
        address = match.group(1)
        data = make_synthetic_lab(tmp_path / "data", n_tiles=2, size=32)

        # A lab with the wrong key is refused with a clear message.
        other = create_node_keys(tmp_path / "other", "lab-a")
        intruder = start_cli("join", "--superlink", address, "--ca", str(pki.ca.cert),
                             "--key", str(other.private_key), "--dataset", str(data),
                             "--workdir", str(tmp_path / "intruder"), cwd=tmp_path)
        out = finish(intruder)
        assert intruder.returncode == 2 and "could not join" in out

        join = start_cli("join", "--superlink", address, "--ca", str(pki.ca.cert),
                         "--key", str(lab_key), "--dataset", str(data),
                         "--workdir", str(tmp_path / "lab"), cwd=tmp_path)
        read_until(join, r"policy: epsilon budget 8 at delta <= 1e-05; DP modes sample")
        read_until(join, r"status: waiting")
        join.send_signal(signal.SIGINT)  # Ctrl-C
        out = finish(join)
        assert join.returncode == 0 and "leaving the federation" in out
        assert wait_no_processes(str(tmp_path / "lab")) == []
    finally:
        serve.send_signal(signal.SIGTERM)  # kill PID
        finish(serve)
    assert serve.returncode == 0
    assert wait_no_processes(str(tmp_path / "coord")) == []
    assert wait_no_processes(str(pki.root)) == []


@pytest.mark.slow
def test_demo_interrupted_by_ctrl_c_leaves_nothing_running(tmp_path):
    demo = start_cli("demo", "--clients", "1", "--rounds", "5", "--synthetic", "--crop-size", "32",
                     "--depth", "2", "--base-width", "8", "--checkpoint-dir", str(tmp_path / "ckpt"),
                     "--workdir", str(tmp_path / "work"), cwd=tmp_path)
    read_until(demo, r"SuperNodes up")
    time.sleep(2)
    demo.send_signal(signal.SIGINT)
    out = finish(demo)
    assert demo.returncode == 130, out
    assert wait_no_processes(str(tmp_path / "work")) == []


def test_lab_status_follows_the_supernode_and_the_labs_history(tmp_path):
    lab = LabNode("127.0.0.1:1", None, None, tmp_path, lab="lab-a", workdir=tmp_path, insecure=True)
    assert lab.status() == LabStatus("stopped")
    # One line, as a real command line is: the log's first line echoes it.
    script = "import sys, time; [print(line, flush=True) or time.sleep(0.05) for line in sys.argv[1:]]; time.sleep(30)"

    def fake(*lines):
        lab.process = ManagedProcess("fake", [sys.executable, "-c", script, *lines],
                                     tmp_path / f"fake{time.monotonic_ns()}.log").start()
        wait_for_line(lab.process, "(?m)^" + re.escape(lines[-1]))  # printed, not the echoed command
        return lab.process

    # Flower colours its log even with NO_COLOR=1.
    retry = "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 0.67 seconds"
    node = fake("Starting Flower SuperNode", retry)
    assert lab.status().state == "connecting"  # never started here: no connect deadline
    lab.started_at, lab.connect_timeout = time.monotonic() - 2, 1.0
    status = lab.status()
    assert status == LabStatus("unreachable", None, status.message)
    assert status.describe() == ("cannot reach coordinator at 127.0.0.1:1 (no connection after 2 s; "
                                 "Connection attempt failed)")
    lab.started_at = None
    node.stop()
    node = fake("SuperNode ID: 42")
    assert lab.status().state == "waiting"
    assert lab.node_id == 42 and lab.history()[-1]["event"] == "joined" and lab.history()[-1]["node"] == 42
    lab.history_file.write_text('{"round": 3, "event": "training"}\n')
    assert lab.status() == LabStatus("training", 3)
    with lab.history_file.open("a") as history:
        history.write('{"round": 3, "event": "declined", "reason": "next round would reach epsilon 9.0 > budget 8.0"}\n')
    assert lab.status() == LabStatus("declined", 3, "next round would reach epsilon 9.0 > budget 8.0")
    with lab.history_file.open("a") as history:
        history.write('{"round": 4, "event": "evaluating"}\n')
    assert lab.status() == LabStatus("evaluating", 4)
    node.stop()
    assert lab.status().state == "stopped"
    fake("\x1b[91mERROR \x1b[0m:     Exit Code: 305", "Failed to initialize the connection to the SuperLink.")
    lab.process.kill()
    status = lab.status()
    assert status.state == "error" and "Failed to initialize" in status.message
    assert "\x1b" not in status.message and "ERROR" not in status.message and "Exit Code: 305" in status.message


@pytest.mark.slow
def test_join_gives_up_on_an_unreachable_coordinator_in_one_clean_line(tmp_path):
    pki = create_pilot_pki(tmp_path / "pki")
    keys = create_node_keys(tmp_path / "keys", "lab-a")
    address = f"127.0.0.1:{find_free_port()}"  # nothing listens there
    data = make_synthetic_lab(tmp_path / "data", n_tiles=2, size=32)
    join = start_cli("join", "--superlink", address, "--ca", str(pki.ca.cert), "--key", str(keys.private_key),
                     "--dataset", str(data), "--workdir", str(tmp_path / "lab"), "--connect-timeout", "3",
                     cwd=tmp_path)
    out = finish(join)
    assert join.returncode == 1, out
    assert "\x1b" not in out and "WARNING" not in out  # no Flower log, no colour codes
    [line] = out.splitlines()
    # The SuperNode's last failed attempt, when it has made one within the 3 s.
    assert re.fullmatch(rf"cannot reach coordinator at {re.escape(address)} \(no connection after \d+ s"
                        r"(; Connection attempt failed)?\)", line), line
    assert wait_no_processes(str(tmp_path / "lab")) == []


def test_demo_needs_no_checkpoint_dir_and_no_help_names_the_repositorys_shared_folder(capsys):
    from napari_feddp import cli

    args = cli.build_parser().parse_args(["federation", "demo"])
    assert args.checkpoint_dir is None and callable(args.func)
    for command in (["federation", "demo"], ["federation", "join"], ["federation"]):
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        assert "shared" not in capsys.readouterr().out


@pytest.mark.slow
def test_demo_as_the_readme_writes_it_keeps_its_checkpoints(tmp_path):
    # The README's line plus the options that keep it short; its temporary folder goes under tmp_path.
    demo = start_cli("demo", "--clients", "1", "--rounds", "1", "--synthetic", "--crop-size", "32",
                     "--depth", "2", "--base-width", "8", "--max-steps", "2", "--batch-size", "2",
                     cwd=tmp_path, TMPDIR=str(tmp_path))
    match, _ = read_until(demo, r"checkpoints and model cards go to (\S+)")
    out = finish(demo, timeout=300)
    assert demo.returncode == 0, out
    checkpoints = Path(match.group(1))
    assert checkpoints.parent.name.startswith("feddp-demo-") and checkpoints.is_relative_to(tmp_path)
    assert (checkpoints / "final.safetensors").is_file() and (checkpoints / "rounds.jsonl").is_file()
    assert [p.name for p in checkpoints.parent.iterdir()] == ["checkpoints"]  # logs, PKI and tiles are gone
    assert f"checkpoints and model cards: {checkpoints}" in out
    assert wait_no_processes(str(checkpoints.parent)) == []
