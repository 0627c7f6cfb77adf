"""Local train functions that misbehave, plugged into test labs via ``train-fn``.

The SuperNodes of the fault-injection tests put this folder on PYTHONPATH, so
``flwr-clientapp`` imports these as ``fault_trainers:<name>``.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch

from napari_feddp.federation.local import LocalUpdate


def nan_update(request) -> LocalUpdate:
    """Return weights full of NaN (a diverged or malicious lab)."""
    with torch.no_grad():
        for parameter in request.model.parameters():
            parameter.fill_(float("nan"))
    return LocalUpdate(num_examples=4, loss=1.0, dice=0.1)


def hang_until_killed(request) -> LocalUpdate:
    """Signal the test that training started (marker file), then never finish."""
    marker = os.environ.get("FEDDP_TEST_MARKER")
    if marker:
        Path(marker).write_text(str(request.server_round))
    time.sleep(600)
    return LocalUpdate(num_examples=4, loss=1.0, dice=0.1)


def huge_update(request) -> LocalUpdate:
    """Return weights of 1e30 and claim a billion examples (a lab poisoning the model)."""
    with torch.no_grad():
        for parameter in request.model.parameters():
            parameter.fill_(1e30)
    return LocalUpdate(num_examples=10**9, loss=0.1, dice=0.99)


def known_delta(lab: str, name: str, shape) -> np.ndarray:
    """The update ``shifted_update`` applies to array ``name`` in lab ``lab`` (reproducible from the names)."""
    seed = int(hashlib.sha256(f"{lab}/{name}".encode()).hexdigest()[:16], 16)
    return np.random.default_rng(seed).normal(0.0, 0.05, shape).astype(np.float32)


def shifted_update(request) -> LocalUpdate:
    """Move every weight by :func:`known_delta` of this lab (a lab whose update the test knows)."""
    with torch.no_grad():
        for name, value in request.model.state_dict().items():
            value.add_(torch.from_numpy(known_delta(request.node.lab, name, tuple(value.shape))))
    return LocalUpdate(num_examples=4, loss=0.5, dice=0.5, epsilon=1.0, delta=1e-5)


def crash(request) -> LocalUpdate:
    """Fail in the middle of the round (a lab whose machine goes down after the key exchange)."""
    raise RuntimeError("lab machine went down")
