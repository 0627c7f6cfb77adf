"""The CPU engine's glibc setting: applied once, on Linux/glibc only, and can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from napari_feddp.inference._malloc import ENV, keep_freed_memory

CODE = (
    "from napari_feddp.inference._malloc import keep_freed_memory as k; "
    "print(k(), k())"
)


def _run(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if env_value is not None:
        env[ENV] = env_value
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_applied_once_on_glibc_and_off_on_request():
    assert _run(None) == "True True"
    assert _run("0") == "False False"


def test_in_this_process_it_is_stable():
    assert keep_freed_memory() == keep_freed_memory()
