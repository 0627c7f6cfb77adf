"""A federation in one process: the real ServerApp and ClientApp code, without the network.

:class:`InProcessGrid` hands every message to the ClientApp of its destination
lab in this process, each lab getting its own deserialized copy (as over the
network), and turns a ClientApp exception into the error reply a SuperNode
would send. Everything above the transport is the product's: the ServerApp's
rounds, SecAgg+ on both sides, the labs' policies, DP-SGD and privacy ledgers.
It serves the tests and the experiment settings too slow to run with one
process per message (distributed noise takes one round per DP-SGD step).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from napari_feddp.federation import client_app, server_app
from napari_feddp.federation.checkpoints import CheckpointWriter
from napari_feddp.federation.settings import NodeSettings, RunSettings


class InProcessGrid(Grid):
    """A Grid whose SuperNodes are ClientApp calls in this process (node id -> the lab's Context).

    ``sent`` and ``received`` keep every message; nodes in ``unreachable`` answer with the
    error the SuperLink sends for a node that stopped reporting.
    """

    def __init__(self, contexts: dict[int, Context], run_config: dict | None = None):
        self.contexts = contexts
        self.run_config = dict(run_config or {})
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.unreachable: set[int] = set()

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return None

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError  # send_and_receive delivers directly

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.sent.append(message)
            context = self.contexts[message.metadata.dst_node_id]
            context.run_config = dict(self.run_config)
            content = recorddict_from_proto(recorddict_to_proto(message.content))
            received = Message(content, metadata=copy.deepcopy(message.metadata))
            if message.metadata.dst_node_id in self.unreachable:
                replies.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"),
                                       reply_to=received))
                continue
            try:
                answer = client_app.app(received, context)
            except Exception as exc:  # what a SuperNode sends when its ClientApp raises
                answer = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>"),
                                 reply_to=received)
            self.received.append(answer)
            replies.append(answer)
        return replies


def lab_contexts(labs: Iterable[NodeSettings], run_id: int = 1) -> dict[int, Context]:
    """One Context per lab, node ids 101, 102, ... in order."""
    return {node_id: Context(run_id=run_id, node_id=node_id, node_config=lab.to_node_config(), state=RecordDict(),
                             run_config={})
            for node_id, lab in enumerate(labs, start=101)}  # fmt: skip


def run_in_process(settings: RunSettings, labs: Iterable[NodeSettings], run_id: int = 1):
    """Run a whole federated run in this process; return ``(final arrays, strategy)``.

    The checkpoints, ``rounds.jsonl`` and ``final.safetensors`` go to ``settings.checkpoint_dir``.
    """
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 1, 1
    try:
        grid = InProcessGrid(lab_contexts(labs, run_id), settings.to_run_config())
        context = Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(),
                          run_config=settings.to_run_config())
        Path(settings.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        return server_app.run_federation(grid, settings, CheckpointWriter(settings.checkpoint_dir, settings),
                                         context=context)  # fmt: skip
    finally:
        TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
