"""Fixtures for the federation tests: tiny labs, tiny runs, message builders, leak checks.

Everything runs on 127.0.0.1 with OS-assigned ports and a temporary Flower home
per process; a run uses a 2-level, 8-channel UNet on 32-pixel crops.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from experiments.inprocess import InProcessGrid
from napari_feddp.federation.demo import make_synthetic_lab
from napari_feddp.federation.settings import NodeSettings, RunSettings

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _torch_on_one_thread(one_torch_thread):
    """Every test in this folder."""


def tiny_settings(**changes) -> RunSettings:
    """Settings of a fast run: tiny UNet, 32-px crops, 2 DP-SGD steps per round."""
    base = dict(
        num_rounds=2,
        min_clients=3,
        crop_size=32,
        model_depth=2,
        model_base_width=8,
        model_groups=8,
        batch_size=2,
        max_steps=2,
        learning_rate=0.01,
        mpp=0.5,
        source_mpp=0.5,
        round_timeout=120.0,
        node_wait_timeout=90.0,
    )
    base.update(changes)
    return RunSettings(**base)


@pytest.fixture
def settings() -> RunSettings:
    return tiny_settings()


@pytest.fixture
def lab_dir(tmp_path) -> Path:
    """One lab's synthetic dataset: 4 tiles of 32x32 pixels."""
    return make_synthetic_lab(tmp_path / "lab", n_tiles=4, size=32, seed=1)


def metadata(node_id: int = 0, message_type: str = "train", src: int | None = None) -> Metadata:
    """Metadata of a message sent to ``node_id`` (or replied by ``src``)."""
    return Metadata(
        run_id=1,
        message_id=f"m{node_id}-{time.monotonic_ns()}",
        src_node_id=0 if src is None else src,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )


def reply(node_id: int, content: RecordDict | None = None, *, error=None, message_type="train") -> Message:
    """A reply from ``node_id`` as the SuperLink would hand it to the ServerApp."""
    if error is not None:
        return Message(error, metadata=metadata(0, message_type, src=node_id))
    return Message(content, metadata=metadata(0, message_type, src=node_id))


def array_record(arrays: dict) -> ArrayRecord:
    """ArrayRecord of named NumPy arrays."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def train_reply(node_id: int, arrays: dict, metrics: dict) -> Message:
    content = RecordDict({"arrays": array_record(arrays), "metrics": MetricRecord(metrics)})
    return reply(node_id, content)


def instruction(arrays: ArrayRecord, config: dict, message_type: str = "train", node_id: int = 5) -> Message:
    """A message from the ServerApp to ``node_id``."""
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    return Message(content, metadata=metadata(node_id, message_type))


def context(settings: RunSettings, node: NodeSettings, node_id: int = 5) -> Context:
    return Context(
        run_id=1,
        node_id=node_id,
        node_config=node.to_node_config(),
        state=RecordDict(),
        run_config=settings.to_run_config(),
    )


def live_processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose command line or environment contains ``text``."""
    found = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat[stat.rfind(")") + 2:].startswith("Z"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append((int(entry.name), cmdline[:200]))
    return found


def wait_no_processes(text: str, timeout: float = 15.0) -> list[tuple[int, str]]:
    """Wait until no live process mentions ``text``; return what is left."""
    deadline = time.monotonic() + timeout
    left = live_processes_mentioning(text)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = live_processes_mentioning(text)
    return left


def wait_for_line(process, pattern: str, timeout: float = 30.0) -> re.Match:
    """Wait until ``pattern`` appears in a ManagedProcess's log; return the match."""
    deadline = time.monotonic() + timeout
    while not (match := re.search(pattern, process.read_log())):
        assert time.monotonic() < deadline and process.is_running(), f"{pattern!r} not logged:\n{process.read_log()}"
        time.sleep(0.05)
    return match


@pytest.fixture
def joined_lab(tmp_path):
    """A LabNode whose SuperNode has joined (a stand-in process logs the node id); its history is ours to write."""
    from napari_feddp.federation.lab import LabNode
    from napari_feddp.federation.processes import ManagedProcess

    node = LabNode(superlink="127.0.0.1:1", ca=None, key=None, dataset=tmp_path, workdir=tmp_path / "w",
                   insecure=True)
    node.process = ManagedProcess("supernode lab", ["/bin/sh", "-c", "echo 'SuperNode ID: 7'; sleep 60"],
                                  tmp_path / "w" / "lab.log").start()
    wait_for_line(node.process, "(?m)^SuperNode ID", 10)
    yield node
    node.process.kill()


@pytest.fixture
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 9, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def make_grid(tmp_path, settings, labs: str = "abc", **lab_changes) -> InProcessGrid:
    """Labs named by the letters of ``labs`` (node ids 101, 102, ...), each with 4 synthetic tiles."""
    contexts = {}
    for node_id, name in enumerate(labs, start=101):
        node = NodeSettings(
            lab=name,
            data_dir=str(make_synthetic_lab(tmp_path / name, n_tiles=4, size=32, seed=node_id)),
            ledger_dir=str(tmp_path / "ledgers"),
            model_store=str(tmp_path / "store" / name),
            # No budget: these tests follow rounds and resumes, not declines.
            **{"max_epsilon": 0.0, **lab_changes.get(name, {})},
        )
        contexts[node_id] = Context(run_id=9, node_id=node_id, node_config=node.to_node_config(),
                                    state=RecordDict(), run_config={})
    return InProcessGrid(contexts, settings.to_run_config())
