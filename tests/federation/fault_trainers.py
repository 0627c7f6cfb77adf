"""Local train functions that misbehave, plugged into test labs via ``train-fn``.

The SuperNodes of the fault-injection tests put this folder on PYTHONPATH, so
``flwr-clientapp`` imports these as ``fault_trainers:<name>``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

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
