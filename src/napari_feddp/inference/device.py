"""Pick the compute device and the mixed-precision context for prediction."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

from .errors import InferenceError


def select_device(device: str | torch.device = "auto") -> torch.device:
    """Return the device to predict on.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"`` picks CUDA, then Apple MPS, then the CPU. Anything else
        (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) is used as given after
        checking that it is available.

    Raises
    ------
    InferenceError
        If the name is not a device or the device is not available here.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InferenceError(
            f"device: expected 'auto', 'cpu', 'cuda[:N]' or 'mps', received {device!r}"
        ) from exc
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise InferenceError("device: 'cuda' was requested but no CUDA GPU is available; use 'auto' or 'cpu'")
        index = chosen.index or 0
        if index >= torch.cuda.device_count():
            raise InferenceError(
                f"device: expected a CUDA index below {torch.cuda.device_count()}, received {chosen}"
            )
    elif chosen.type == "mps" and not _mps_available():
        raise InferenceError("device: 'mps' was requested but Apple MPS is not available; use 'auto' or 'cpu'")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise InferenceError(f"device: expected 'auto', 'cpu', 'cuda[:N]' or 'mps', received {device!r}")
    return chosen


def autocast(device: torch.device, enabled: bool = True) -> AbstractContextManager:
    """Mixed precision for the forward pass: bfloat16 (or float16) on CUDA only.

    CPU and MPS run in float32, where reduced precision is slower or unsupported
    for many layers; the context is then a no-op.
    """
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
