"""A lab runs only the ClientApp of its own installed napari-feddp: the app pin.

A Flower run carries an app bundle (FAB: a zip with ``pyproject.toml``, code,
and ``.info/CONTENT`` hashes). Flower's SuperNode installs whatever bundle a
run names and imports the component ``[tool.flwr.app.components] clientapp``
from it, so whoever can start a run could execute code inside every lab.
Flower's own answer, ``flower-supernode --trusted-entities``, only verifies
bundles fetched from Flower Hub (a local bundle never carries a
verification), so it cannot pin a private deployment.

The pin wraps Flower's ``flwr-clientapp`` entry point. Before Flower installs
a bundle, :func:`check_fab` requires that it is exactly what
:func:`napari_feddp.federation.app_bundle.render_pyproject` produces for this
installed version: nothing but ``pyproject.toml`` (so no module can shadow
the installed package), publisher and name of napari-feddp, the same version,
no dependencies, and the components of this package. Anything else is
refused before any of its code is imported: the task fails with
``UntrustedAppError``, the lab's ClientApp log has one line saying why, and
the lab's local history (Federation widget) records a ``refused-app`` event.

Flower's SuperExec starts every ClientApp task as ``flwr-clientapp ARGS``,
found on its ``PATH``. A lab's SuperExec finds :func:`write_launcher`'s
``flwr-clientapp`` first: the same entry point, with the pin installed. Each
task still runs in a new process, as with Flower's own process isolation.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import tomllib
import zipfile
from pathlib import Path

from .app_bundle import APP_NAME, APP_PUBLISHER, CLIENT_APP_REF, SERVER_APP_REF
from .checkpoints import append_jsonl

#: Environment variable naming the lab's local history file (JSON lines).
HISTORY_ENV = "NAPARI_FEDDP_HISTORY_FILE"
#: Files a trusted bundle may contain (Flower adds ``.info/CONTENT``).
ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})


class UntrustedAppError(RuntimeError):
    """A run's app bundle is not this lab's installed napari-feddp app."""


def installed_version() -> str:
    """Version of the installed napari-feddp (what the bundle must declare)."""
    from .. import __version__

    return str(__version__)


def check_fab(content: bytes, *, version: str | None = None) -> dict:
    """Accept the FAB (zip) only if it is this package's own app for ``version`` (default: the installed one);
    return its pyproject, else raise UntrustedAppError with the first reason it is refused."""
    version = installed_version() if version is None else version
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
        names = [info.filename for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, ValueError) as exc:
        raise UntrustedAppError(f"the app bundle is not a valid FAB ({exc})") from None
    if extra := sorted(set(names) - ALLOWED_FILES):
        raise UntrustedAppError(f"the app bundle carries files of its own ({', '.join(extra[:5])}); this lab runs only "
                                "the ClientApp of its installed napari-feddp, whose bundle holds nothing but pyproject.toml")
    if "pyproject.toml" not in names:
        raise UntrustedAppError("the app bundle has no pyproject.toml")
    try:
        pyproject = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UntrustedAppError(f"the app bundle's pyproject.toml is unreadable ({exc})") from None
    project = pyproject.get("project", {})
    app = pyproject.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components", {})
    expected = {"publisher": (app.get("publisher"), APP_PUBLISHER), "name": (project.get("name"), APP_NAME),
                "clientapp": (components.get("clientapp"), CLIENT_APP_REF),
                "serverapp": (components.get("serverapp"), SERVER_APP_REF)}  # fmt: skip
    for field, (got, want) in expected.items():
        if got != want:
            raise UntrustedAppError(f"the app bundle's {field} is {got!r}, not napari-feddp's {want!r}")
    if project.get("version") != version:
        raise UntrustedAppError(f"the app bundle is napari-feddp {project.get('version')!r}, this lab runs {version!r}: "
                                "coordinator and labs must install the same version")
    if project.get("dependencies"):
        raise UntrustedAppError("the app bundle declares dependencies; napari-feddp's declares none")
    return pyproject


def record_refusal(reason: str) -> None:
    """Say why on stderr (the lab's ClientApp log) and in the lab's local history."""
    print(f"napari-feddp: refused the run's app bundle: {reason}", file=sys.stderr, flush=True)
    if path := os.environ.get(HISTORY_ENV):
        with contextlib.suppress(OSError):
            append_jsonl(path, {"time": time.time(), "event": "refused-app", "reason": reason})


def install_pin() -> None:
    """Make Flower's ClientApp runner check every bundle before installing it."""
    from flwr.supernode.runtime import run_clientapp as runner

    original = runner.install_from_fab
    if getattr(original, "__feddp_pinned__", False):
        return

    def pinned_install_from_fab(fab_file, *args, **kwargs):
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            check_fab(content)
        except UntrustedAppError as exc:
            record_refusal(str(exc))
            raise
        return original(fab_file, *args, **kwargs)

    pinned_install_from_fab.__feddp_pinned__ = True  # type: ignore[attr-defined]
    runner.install_from_fab = pinned_install_from_fab


def run_pinned_clientapp() -> None:
    """Run Flower's ``flwr-clientapp`` (arguments in ``sys.argv``) with the pin."""
    install_pin()
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


def write_launcher(directory: str | os.PathLike) -> Path:
    """Write ``directory/flwr-clientapp``: Flower's ClientApp entry point with the pin; return the file.

    Put ``directory`` first on the lab SuperExec's ``PATH``. The script runs
    with this interpreter and its first ``sys.path`` entry is ``directory``,
    never the working directory.
    """
    launcher = Path(directory) / "flwr-clientapp"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(f"#!{sys.executable}\nfrom {__name__} import run_pinned_clientapp\nrun_pinned_clientapp()\n")
    launcher.chmod(0o700)
    return launcher
