"""Attacks on a real federation (TLS, node authentication, loopback), each one refused.

One federation serves the module: a coordinator (SuperLink on loopback, its
SuperExec, the Fleet gateway) and four labs, three honest and ``poison``,
which sends weights of 1e30 and claims a billion examples. While its runs go
on, three rogue ``flower-superexec`` processes try to take tasks: one at the
public gateway address, one at the SuperLink's loopback Runtime API without
the shared secret, one at a lab's Runtime API without that lab's secret.

The adversaries:

* an outsider holding the public ``ca.pem`` (``flwr`` commands and a
  SuperExec at the address labs dial);
* a malicious coordinator (an app bundle with its own ClientApp code, run
  configs that switch DP off, weaken delta or ask for a huge model);
* a malicious lab (poisoned updates);
* another process on a lab machine (a SuperExec at the lab's Runtime API).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from napari_feddp.federation.app_bundle import render_pyproject
from napari_feddp.federation.certs import create_node_keys
from napari_feddp.federation.demo import make_synthetic_lab
from napari_feddp.federation.flwr_cli import FlowerCli, write_flower_config
from napari_feddp.federation.pilot import LabSpec, LocalFederation
from napari_feddp.federation.processes import ManagedProcess, flower_env, flower_executable
from napari_feddp.models import load_checkpoint

from .conftest import HERE, tiny_settings, wait_no_processes

pytestmark = pytest.mark.slow

HONEST = ("lab-a", "lab-b", "lab-c")


def _rogue_superexec(name: str, address: str, root: Path, *, ca: Path | None) -> tuple[ManagedProcess, Path]:
    home = root / "rogues" / name
    tls = ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    proc = ManagedProcess(
        name=f"rogue {name}",
        argv=[flower_executable("flower-superexec"), "--runtime-api-address", address, *tls],
        log_path=root / "rogues" / f"{name}.log",
        env=flower_env(home),
    ).start()
    return proc, home


def _wait_until_quiet(read, quiet: float = 5.0, timeout: float = 60.0) -> None:
    """Return once ``read()`` has not changed for ``quiet`` seconds (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.5)
        now = read()
        if now != last:
            last, since = now, time.monotonic()


def _hostile_app(directory: Path, settings, marker: Path, *, shadow: bool) -> Path:
    """An app bundle whose code writes ``marker`` when a lab imports it.

    ``shadow=False``: its own ClientApp module (``evil_app:clientapp``).
    ``shadow=True``: napari-feddp's exact pyproject plus a ``napari_feddp``
    package of its own that would shadow the installed one.

    ``flwr run`` imports the components on the submitter's machine too, so the
    payload fires only inside a lab's processes (their Flower home is under
    ``supernodes/``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    payload = (
        "import os\nfrom pathlib import Path\n"
        f"if 'supernodes' in os.environ.get('FLWR_HOME', ''):\n    Path({str(marker)!r}).write_text('pwned')\n"
    )
    pyproject = render_pyproject(settings)
    if shadow:
        package = directory / "napari_feddp" / "federation"
        package.mkdir(parents=True, exist_ok=True)
        (directory / "napari_feddp" / "__init__.py").write_text(payload)
        (package / "__init__.py").write_text("")
        (package / "client_app.py").write_text("from flwr.clientapp import ClientApp\napp = ClientApp()\n")
        (package / "server_app.py").write_text("from flwr.serverapp import ServerApp\napp = ServerApp()\n")
    else:
        (directory / "evil_app.py").write_text(payload + "from flwr.clientapp import ClientApp\nclientapp = ClientApp()\n")
        pyproject = pyproject.replace('clientapp = "napari_feddp.federation.client_app:app"',
                                      'clientapp = "evil_app:clientapp"')
        pyproject = pyproject.replace('publisher = "napari-feddp"', 'publisher = "friendly-coordinator"')
    (directory / "pyproject.toml").write_text(pyproject)
    return directory


def _acquire_task(address: str, ca: Path) -> None:
    """Ask the SuperLink's Runtime API for the next ServerApp task, as a SuperExec without the secret."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=False, root_certificates=Path(ca).read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )  # fmt: skip
    try:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
    finally:
        client.close()


def _history(fed: LocalFederation, lab: str) -> list[dict]:
    path = fed.workdir / "supernodes" / lab / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    env = {"PYTHONPATH": str(HERE)}
    labs = [LabSpec(name, make_synthetic_lab(root / "data" / name, n_tiles=4, size=32, seed=i))
            for i, name in enumerate(HONEST)]
    labs.append(LabSpec("poison", make_synthetic_lab(root / "data" / "poison", n_tiles=4, size=32, seed=9),
                        train_fn="fault_trainers:huge_update", extra_env=env))
    result = {"root": root}
    with LocalFederation(workdir=root / "federation", labs=labs, keep_workdir=True) as fed:
        ca = fed.pki.ca.cert
        result["ids"] = {name: node.node_id for name, node in fed.supernodes.items()}
        result["fleet"], result["control"] = fed.coordinator.fleet_address, fed.coordinator.address
        result["ca"] = ca

        # Outsider with the public CA certificate, at the address labs dial.
        outsider = FlowerCli(root / "outsider", timeout=60)
        write_flower_config(outsider.flwr_home, fed.coordinator.fleet_address, root_cert=ca)
        result["outsider"] = outsider
        result["outsider_app"] = _hostile_app(root / "outsider-app", tiny_settings(), root / "outsider-marker",
                                              shadow=False)

        def attempt(action) -> str:
            try:
                action()
            except Exception as exc:
                return f"refused: {exc}"
            return "accepted"

        outsider_key = create_node_keys(root / "outsider-keys", "outsider")
        result["outsider_attempts"] = {
            "supernode-list": attempt(outsider.list_nodes),
            "supernode-register": attempt(lambda: outsider.register_node(outsider_key.public_key, name="outsider")),
            "run": attempt(lambda: outsider.start_run(result["outsider_app"])),
            "list": attempt(lambda: outsider.run_info(1)),
            "log": attempt(lambda: outsider._run(["log", "1", outsider.connection, "--show"], json_output=False)),
        }
        result["registered_nodes"] = {n.get("node-id") for n in fed.cli.list_nodes()}
        result["raw_control"] = {  # the same Control request, at the public address and at the SuperLink
            where: httpx.post(f"https://{address}/v1/control/list-nodes", verify=str(ca), timeout=30).status_code
            for where, address in (("gateway", fed.coordinator.fleet_address), ("superlink", fed.coordinator.address))
        }
        superlink = psutil.Process(fed.coordinator.superlink.pid)
        result["listening"] = [c.laddr for p in (superlink, *superlink.children(recursive=True))
                               for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]  # fmt: skip
        result["acquire_without_secret"] = attempt(lambda: _acquire_task(fed.coordinator.address, ca))

        rogues = {
            "gateway": _rogue_superexec("gateway", fed.coordinator.fleet_address, root, ca=ca),
            "superlink": _rogue_superexec("superlink", fed.coordinator.address, root, ca=ca),
            "lab": _rogue_superexec("lab", f"127.0.0.1:{fed.supernodes['lab-a'].runtime_port}", root, ca=None),
        }
        result["rogue_homes"] = {name: home for name, (_, home) in rogues.items()}

        # A malicious lab among four: 2 rounds with the mean, in the clear (the server checks every
        # update) and with secure aggregation (the server sees only the sum; each coordinate is bounded).
        result["poisoned"] = fed.run(
            tiny_settings(min_clients=4, num_rounds=2, round_timeout=90.0, checkpoint_dir=str(root / "poisoned"),
                          secure_aggregation="off"),
            timeout=400,
        )
        result["poisoned_secure"] = fed.run(
            tiny_settings(min_clients=4, num_rounds=2, round_timeout=90.0, final_evaluation=False,
                          checkpoint_dir=str(root / "poisoned-secure")),
            timeout=400,
        )
        result["stores"] = {name: sorted(p.name for p in (fed.workdir / "model-stores" / name).glob("*"))
                            for name in (*HONEST, "poison")}  # fmt: skip

        # A malicious coordinator switches DP off: every lab declines, nothing trains.
        ledgers = fed.workdir / "ledgers"
        before = sorted(p.read_bytes() for p in ledgers.rglob("*.jsonl"))
        result["dp_off"] = fed.run(
            tiny_settings(min_clients=4, num_rounds=1, dp_mode="none", final_evaluation=False,
                          checkpoint_dir=str(root / "dp-off")),
            timeout=300,
        )  # fmt: skip
        result["ledgers_unchanged"] = before == sorted(p.read_bytes() for p in ledgers.rglob("*.jsonl"))

        # A malicious coordinator submits app bundles carrying their own code.
        for kind in ("own-clientapp", "shadowing-package"):
            marker = root / f"{kind}-marker"
            app = _hostile_app(root / kind, tiny_settings(min_clients=4, num_rounds=1, round_timeout=60.0,
                                                          checkpoint_dir=str(root / kind / "ckpt")),
                               marker, shadow=kind == "shadowing-package")  # fmt: skip
            run_id = fed.cli.start_run(app)
            # The shadowing bundle also replaces the coordinator's ServerApp with a bare one, which
            # asks a single lab; the other bundle's (real) ServerApp asks every lab.
            expected = HONEST if kind == "own-clientapp" else (*HONEST, "poison")
            quorum = all if kind == "own-clientapp" else any

            def refusals(expected=expected):
                return {lab: r["reason"] for lab in expected for r in _history(fed, lab)
                        if r.get("event") == "refused-app"}  # fmt: skip

            refused = _wait_for(lambda quorum=quorum, expected=expected: quorum(lab in refusals() for lab in expected), 120)
            fed.cli.stop_run(run_id)
            _wait_until_quiet(lambda: [_history(fed, lab) for lab in (*HONEST, "poison")])  # late refusals land here
            result[kind] = {"marker": marker, "refused": refused, "reasons": list(refusals().values())}
            for lab in (*HONEST, "poison"):  # the next hostile run starts from a clean history
                (fed.workdir / "supernodes" / lab / "history.jsonl").unlink(missing_ok=True)

        for proc, _ in rogues.values():
            proc.stop()
        result["rogue_logs"] = {name: proc.read_log() for name, (proc, _) in rogues.items()}
    result["left"] = wait_no_processes(str(root / "federation"))
    return result


# ----------------------------------------------------------------------- outsider on the network


@pytest.mark.parametrize("command", ["supernode-list", "supernode-register", "run", "list", "log"])
def test_an_outsider_with_the_ca_cannot_use_the_control_api(attacked, command):
    outcome = attacked["outsider_attempts"][command]
    assert outcome.startswith("refused"), outcome
    assert "404" in outcome or "not found" in outcome.lower() or "unavailable" in outcome.lower(), outcome
    assert not (attacked["root"] / "outsider-marker").exists()
    assert "outsider" not in str(attacked["registered_nodes"])
    assert len(attacked["registered_nodes"]) == 4  # the four labs, nothing the outsider added


def test_the_gateway_answers_control_requests_with_404(attacked):
    codes = attacked["raw_control"]
    assert codes["gateway"] == 404
    assert codes["superlink"] != 404  # the route exists behind it, on loopback only


def test_the_superlink_listens_on_loopback_only(attacked):
    assert attacked["listening"] and all(address.ip == "127.0.0.1" for address in attacked["listening"])
    assert attacked["control"] != attacked["fleet"]


def test_rogue_superexecs_never_receive_a_task(attacked):
    # A SuperExec installs the run's app bundle in its Flower home when it takes a task.
    for name, home in attacked["rogue_homes"].items():
        assert not list((home / "apps").glob("*")), f"rogue {name} received a task"
    assert "404" in attacked["rogue_logs"]["gateway"]  # the gateway does not expose the Runtime API
    assert attacked["poisoned"].status == "finished:completed"


def test_task_pickup_without_the_secret_is_refused(attacked):
    outcome = attacked["acquire_without_secret"]
    assert outcome.startswith("refused") and "401 Unauthorized" in outcome, outcome


# ----------------------------------------------------------------------- malicious coordinator


@pytest.mark.parametrize("kind", ["own-clientapp", "shadowing-package"])
def test_labs_run_only_their_installed_clientapp(attacked, kind):
    outcome = attacked[kind]
    assert outcome["refused"] and outcome["reasons"], "labs did not record refusing the bundle"
    assert not outcome["marker"].exists(), "the bundle's code ran"
    expected = "evil_app.py" if kind == "own-clientapp" else "napari_feddp/__init__.py"
    assert all(expected in reason for reason in outcome["reasons"]), outcome["reasons"]


def test_labs_decline_a_run_that_switches_dp_off(attacked):
    run = attacked["dp_off"]
    ids = attacked["ids"]
    record = run.rounds[0]
    assert not record["aggregated"] and not record["accepted"]
    for name in HONEST:
        assert "dp-mode 'none' is not accepted" in record["declined"][str(ids[name])]
    assert attacked["ledgers_unchanged"]


# ----------------------------------------------------------------------- malicious lab


def test_a_poisoning_lab_cannot_take_over_the_global_model(attacked):
    run = attacked["poisoned"]
    ids = attacked["ids"]
    honest = {ids[name] for name in HONEST}
    for record in run.rounds:
        assert record["aggregated"]
        assert honest <= set(record["accepted"]) | {int(k) for k in record.get("clipped", {})}
        assert not any("non-finite" in reason for node, reason in record["rejected"].items()
                       if int(node.split("#")[0]) in honest)  # fmt: skip
    model, _ = load_checkpoint(run.checkpoint_dir / "final.safetensors")
    weights = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    assert np.all(np.isfinite(weights)) and np.abs(weights).max() < 100


def test_under_secure_aggregation_a_poisoning_lab_moves_each_weight_by_a_bounded_amount(attacked):
    run = attacked["poisoned_secure"]
    assert [r["aggregation"] for r in run.rounds] == ["secure-mean"] * 2 and all(r["aggregated"] for r in run.rounds)
    start, _ = load_checkpoint(run.checkpoint_dir / "round-000.safetensors")
    final, _ = load_checkpoint(run.checkpoint_dir / "final.safetensors")
    bound = tiny_settings().secure_clipping_range * len(run.rounds)  # every coordinate of the mean is within it
    moved = max(float((p - q).abs().max()) for p, q in zip(final.parameters(), start.parameters(), strict=True))
    assert 0 < moved <= bound + 1e-4


def test_a_model_that_fails_the_labs_check_never_becomes_its_default(attacked):
    # Every lab keeps its received models; a refused one lands under refused/, never the default.
    for name, entries in attacked["stores"].items():
        promoted = [e for e in entries if e.endswith(".safetensors")]
        assert all(e.startswith("federation-") for e in promoted)
        assert promoted or "refused" in entries, f"{name}: final model neither promoted nor refused"


def test_nothing_is_left_running(attacked):
    assert attacked["left"] == []
