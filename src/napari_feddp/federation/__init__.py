"""Federated, differentially private training with Flower (no Qt).

Flower 1.42 deployment: one SuperLink (coordinator), one SuperNode per lab,
all traffic over HTTPS with a pilot CA, SuperNodes authenticated by per-lab
EC keys registered at the SuperLink. The FedDP app (ServerApp + ClientApp)
lives in this package and is submitted with ``flwr run``.

Modules
-------
certs
    Pilot CA, SuperLink certificate, SuperNode key pairs.
processes
    Flower child processes with guaranteed cleanup of their process trees.
flwr_cli
    The ``flwr`` command line with a private Flower home.
settings
    Run settings (run config) and lab settings (node config).
local
    Pluggable local training / evaluation (defaults: :mod:`napari_feddp.training`).
client_app, server_app, strategy
    The Flower App: ``napari_feddp.federation.client_app:app`` and
    ``napari_feddp.federation.server_app:app``; FedAvg with update validation
    and optional client-level DP.
checkpoints
    Per-round checkpoints, ``rounds.jsonl``, ``evaluation.json``, ``summary.json``.
app_bundle
    The pyproject.toml-only app directory ``flwr run`` needs.
coordinator
    ``federation serve`` and ``run``: SuperLink, its SuperExec, the Fleet gateway, runs.
lab
    ``federation join`` and the Federation widget: a lab's SuperNode and its status.
app_pin, policy
    A lab runs only its installed ClientApp, and only runs within its privacy policy.
pilot
    :class:`LocalFederation`: a coordinator and lab nodes on loopback (demo, tests).
demo
    Synthetic or MoNuSeg-split lab datasets and the per-round table.

Submodules are imported on first use so that ``import napari_feddp.federation``
stays cheap (no torch, no Flower).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LocalFederation": "pilot",
    "LabSpec": "pilot",
    "RunOutcome": "coordinator",
    "FederationRunError": "coordinator",
    "Coordinator": "coordinator",
    "LabNode": "lab",
    "RunSettings": "settings",
    "NodeSettings": "settings",
    "create_pilot_pki": "certs",
    "load_pilot_pki": "certs",
    "FederationProcessError": "processes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
