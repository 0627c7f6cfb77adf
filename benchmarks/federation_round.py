"""Benchmark: overhead of a federated round over local training (Flower 1.42, real TLS).

Run from the repository root::

    .venv/bin/python benchmarks/federation_round.py            # 3 labs, ~30 s local training, 3 rounds
    .venv/bin/python benchmarks/federation_round.py --quick    # smoke run: tiny UNet, 1 round

Writes ``benchmarks/results/federation_round.json`` (``--out`` to change; a
``--quick`` run writes ``federation_round.quick.json`` into ``$FEDDP_BENCH_CACHE``
or ``~/.cache/napari-feddp/benchmarks``, so it never overwrites the full result)
and prints a summary.

Set-up: the real deployment of :class:`napari_feddp.federation.LocalFederation`
on 127.0.0.1 - one ``flower-superlink`` with TLS and SuperNode authentication
behind the Fleet gateway, one ``flower-supernode`` per lab (``--isolation
process``: the lab's SuperExec starts one ``flwr-clientapp`` process per
message, cold, through the app pin), ``flwr run`` starting the ServerApp.
Three synthetic labs, default U-Net (depth 4, width 16),
``dp-mode = sample`` (Opacus DP-SGD with each lab's privacy ledger), 1 torch
thread per ClientApp, no final evaluation.

Each lab's ``train-fn`` is :func:`timed_train` from this file (the SuperNodes
get ``benchmarks/`` on ``PYTHONPATH``). It calls the package's
:func:`~napari_feddp.federation.local.default_train` unchanged and records, in
the ClientApp process, wall-clock time stamps (``time.time()``, same clock for
every process on the machine): when the process was created (from
``/proc/self/stat``), when training started and ended, and - by wrapping
Flower's ``push_message`` / push-object function inside that process - when
the reply push started and ended and how many bytes of Flower objects were
actually pushed.

The same federation then runs the same rounds with secure aggregation (Flower's
SecAgg+, ``secure-aggregation on``) unless ``--plain-only``; ``secagg_*`` keys
compare them with the rounds in the clear.

Definitions:

* ``round_seconds``: the ServerApp's own round time (``rounds.jsonl``
  ``seconds``: configure, ``Grid.send_and_receive`` until the last reply,
  validation and FedAvg; the per-round checkpoint write comes after it and is
  reported separately in ``round_period_seconds``).
* ``client_train_seconds``: wall time of the lab's ``train_local`` call
  (``default_train``) measured **inside the ClientApp process** during the
  round. The machine has 2 shared cores, so 3 labs training at once are slower
  than one alone; the denominator is this in-round time, not a solo time.
* ``round_overhead`` = ``round_seconds`` / max over labs of
  ``client_train_seconds`` of the same round (median over rounds; every
  round's value is listed).
* Phase breakdown per lab (medians, seconds). The SuperNode logs are
  time-stamped by a watcher thread (50 ms polling) to split two phases:
  ``supernode_pull`` (round start -> the SuperNode logs "Receiving: train
  message") + ``clientapp_spawn`` (-> process created) = ``dispatch``, and
  ``supernode_forward`` (reply pushed -> the SuperNode logs "Sent
  successfully") + ``grid_pull`` (-> the ServerApp has all replies) =
  ``forward_and_grid_poll``. Phases from the round start: dispatch
  (round start -> ClientApp process created: ServerApp push, SuperNode poll
  every 3 s, SuperExec poll every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``,
  process spawn), ClientApp start (process created -> training starts:
  interpreter, imports, pulling and inflating the message, building the model,
  loading the weights), training, reply (training ends -> reply pushed to the
  SuperNode: state dict to ArrayRecord, deflating, HTTP push),
  forward_and_grid_poll (reply pushed -> the ServerApp has all replies:
  SuperNode forwards to the SuperLink over TLS, ServerApp ``Grid`` pull every
  3 s; for early labs this includes waiting for the slowest lab), aggregate
  (validation + FedAvg). ``critical_path`` gives the
  same phases for the lab whose reply arrived last.
* Bytes: ``bytes_sent_per_client_per_round`` is the sum of the serialized
  Flower objects (message, record dict, array record, arrays) the ClientApp
  pushed to its SuperNode, counted in the process; the SuperNode forwards the
  same objects to the SuperLink over HTTPS. ``model_float32_bytes`` is the
  number of parameters x 4. Also reported: the serialized size of the
  server -> client train message, computed in this process with the same
  Flower code, and (de)serialisation times of the model measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# --------------------------------------------------------------------------- in the ClientApp


def _process_created_wall() -> float:
    """Wall-clock creation time of this process (10 ms resolution)."""
    stat = Path("/proc/self/stat").read_text()
    start_ticks = int(stat[stat.rfind(")") + 2 :].split()[19])
    since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.time() - (since_boot - start_ticks / os.sysconf("SC_CLK_TCK"))


def _record(row: dict) -> None:
    path = os.environ.get("FEDDP_BENCH_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def _instrument_push(row: dict) -> None:
    """Wrap Flower's reply push in this ClientApp process to time it and count bytes."""
    from flwr.supernode.runtime import run_clientapp as rc

    if getattr(rc.push_message, "_feddp_bench", False):
        return
    original_push = rc.push_message
    original_make = rc.make_push_object_fn_protobuf

    def make_counting(*args, **kwargs):
        push = original_make(*args, **kwargs)

        def counting(object_id, content):
            row["pushed_object_bytes"] = row.get("pushed_object_bytes", 0) + len(content)
            row["pushed_objects"] = row.get("pushed_objects", 0) + 1
            return push(object_id, content)

        return counting

    def push_message(client, message, context):
        from flwr.supercore.inflatable.inflatable_object import get_object_tree

        row["push_start"] = time.time()
        row["message_header_bytes"] = len(
            rc.message_to_proto(rc.remove_content_from_message(message)).SerializeToString()
        )
        try:
            return original_push(client, message, context)
        finally:
            row["push_end"] = time.time()
            row["object_tree_bytes"] = len(get_object_tree(message).SerializeToString())
            _record(row)

    push_message._feddp_bench = True
    rc.make_push_object_fn_protobuf = make_counting
    rc.push_message = push_message


def timed_train(request):
    """``train-fn`` of the benchmark labs: ``default_train`` with time stamps."""
    from napari_feddp.federation.local import default_train

    row = {
        "kind": "train",
        "lab": request.node.lab,
        "round": request.server_round,
        "pid": os.getpid(),
        "process_created": _process_created_wall(),
        "train_start": time.time(),
    }
    try:
        _instrument_push(row)
    except Exception as exc:
        row["instrument_error"] = repr(exc)
    update = default_train(request)
    row["train_end"] = time.time()
    row["steps"] = update.steps
    if "push_start" not in row and "instrument_error" in row:
        _record(row)
    return update


# --------------------------------------------------------------------------- driver helpers


def machine_info() -> dict:
    import torch

    try:
        import flwr

        flwr_version = flwr.__version__
    except Exception:
        flwr_version = "?"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "flwr": flwr_version,
        "load_average_1_5_15_before": [round(v, 2) for v in os.getloadavg()],
    }


def model_sizes(settings) -> dict:
    """Parameter bytes, serialized message sizes and (de)serialisation times."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from napari_feddp.federation.local import build_model

    torch.manual_seed(0)
    model = build_model(settings)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    n_state = sum(v.numel() for v in state.values())
    float_bytes = sum(v.numel() * v.element_size() for v in state.values())

    def serialize() -> tuple[int, float]:
        t0 = time.perf_counter()
        record = ArrayRecord(state)
        content = RecordDict({"arrays": record, "config": ConfigRecord({"learning-rate": 0.01})})
        metadata = Metadata(
            run_id=1, message_id="", src_node_id=0, dst_node_id=1, reply_to_message_id="",
            group_id="1", created_at=time.time(), ttl=3600.0, message_type="train",
        )
        msg = Message(content, metadata=metadata)
        objects = get_all_nested_objects(msg)
        total = sum(len(obj.deflate()) for obj in objects.values())
        return total, time.perf_counter() - t0

    def deserialize() -> float:
        record = ArrayRecord(state)
        t0 = time.perf_counter()
        fresh = build_model(settings)
        fresh.load_state_dict(record.to_torch_state_dict(), strict=True)
        return time.perf_counter() - t0

    sizes, ser_times, de_times = [], [], []
    for _ in range(3):
        size, seconds = serialize()
        sizes.append(size)
        ser_times.append(seconds)
        de_times.append(deserialize())
    return {
        "model_parameters": int(n_params),
        "model_state_values": int(n_state),
        "model_float32_bytes": int(n_params * 4),
        "model_state_dict_bytes": int(float_bytes),
        "server_to_client_message_bytes": int(sizes[0]),
        "serialize_seconds": round(statistics.median(ser_times), 4),
        "deserialize_and_build_seconds": round(statistics.median(de_times), 4),
    }


def import_seconds(repeats: int = 3) -> float:
    """Median time for a fresh interpreter to import the ClientApp module."""
    import subprocess

    code = "import napari_feddp.federation.client_app"
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 3)


def calibrate_steps(settings, lab_dir: Path, target_seconds: float, workdir: Path) -> tuple[int, float]:
    """Steps of ``default_train`` that take about ``target_seconds`` here, alone.

    Times 2 and 6 steps in this process (1 torch thread) and extrapolates the
    slope; 3 labs training at once on 2 cores will each take longer.
    """
    import torch

    from napari_feddp.federation.local import LocalRequest, build_model, default_train
    from napari_feddp.federation.settings import NodeSettings

    torch.set_num_threads(1)
    # A copy of the lab's tiles: calibration spends privacy on the copy's own ledger, so the
    # lab's ledger (keyed to the tiles' content and marked in the folder) starts the run clean.
    import shutil

    calib_dir = workdir / "calib-data"
    shutil.copytree(lab_dir, calib_dir, ignore=shutil.ignore_patterns(".feddp"))
    node = NodeSettings(lab="calib", data_dir=str(calib_dir), ledger_dir=str(workdir / "calib-ledger"), max_epsilon=0)
    times = {}
    for steps in (1, 3, 9):  # the first call warms up imports and caches
        request = LocalRequest(
            model=build_model(settings), settings=settings.replace(max_steps=steps), node=node, server_round=1
        )
        t0 = time.perf_counter()
        default_train(request)
        times[steps] = time.perf_counter() - t0
    per_step = max(1e-3, (times[9] - times[3]) / 6)
    fixed = max(0.0, times[3] - 3 * per_step)
    steps = max(2, round((target_seconds - fixed) / per_step))
    return int(steps), per_step


class LogWatcher:
    """Time-stamp SuperNode log lines as they appear (Flower's lines carry no time).

    Polls each log every 50 ms from a thread and keeps ``(wall time, lab, event)``
    for ``Receiving: train message`` (the SuperNode pulled the round's message
    from the SuperLink) and ``Sent successfully`` (it finished forwarding the
    reply to the SuperLink).
    """

    EVENTS: ClassVar[dict[str, str]] = {"Receiving: train message": "received", "Sent successfully": "sent"}

    def __init__(self, logs: dict):
        import threading

        self.logs = {lab: Path(path) for lab, path in logs.items()}
        self.offsets = {lab: path.stat().st_size if path.exists() else 0 for lab, path in self.logs.items()}
        self.events: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self._poll()

    def _poll(self) -> None:
        for lab, path in self.logs.items():
            try:
                with open(path, "rb") as handle:
                    handle.seek(self.offsets[lab])
                    data = handle.read()
            except OSError:
                continue
            cut = data.rfind(b"\n") + 1
            self.offsets[lab] += cut
            now = time.time()
            for line in data[:cut].decode(errors="replace").splitlines():
                for needle, event in self.EVENTS.items():
                    if needle in line:
                        self.events.append((now, lab, event))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(0.05)

    def nth(self, lab: str, event: str, n: int) -> float | None:
        """Time of the ``n``-th (1-based) ``event`` of ``lab``."""
        times = [t for t, who, what in self.events if who == lab and what == event]
        return times[n - 1] if len(times) >= n else None


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def analyse(rounds: list[dict], clients: list[dict], checkpoint_dir: Path, watcher=None) -> dict:
    """Per-round overhead and per-phase breakdown.

    Round start: modification time of the previous round's checkpoint card
    (``round-<n-1>.json``, written by the ServerApp right before round ``n``
    starts). ``rounds.jsonl`` ``started`` is when the replies were in (the
    report is created when aggregation starts).
    """
    per_round = []
    phases_all: dict[str, list[float]] = {}
    critical: dict[str, list[float]] = {}
    bytes_sent = []
    objects_sent = []
    for row in rounds:
        rnd = int(row["round"])
        card = Path(checkpoint_dir) / f"round-{rnd - 1:03d}.json"
        replies_in = float(row["started"])
        start = card.stat().st_mtime if card.exists() else replies_in - float(row["seconds"])
        end = start + float(row["seconds"])
        mine = [c for c in clients if c.get("round") == rnd]
        if not mine:
            continue
        train = {c["lab"]: c["train_end"] - c["train_start"] for c in mine}
        slowest = max(train.values())
        lab_phases = {}
        first_round = min(int(r["round"]) for r in rounds)
        for c in mine:
            push_end = c.get("push_end", c["train_end"])
            nth = rnd - first_round + 1
            received = watcher.nth(c["lab"], "received", nth) if watcher else None
            sent = watcher.nth(c["lab"], "sent", nth) if watcher else None
            phases = {"dispatch": c["process_created"] - start}
            if received is not None:
                phases["supernode_pull"] = received - start
                phases["clientapp_spawn"] = c["process_created"] - received
            phases.update(
                clientapp_start=c["train_start"] - c["process_created"],
                train=c["train_end"] - c["train_start"],
                reply_push=push_end - c["train_end"],
                forward_and_grid_poll=replies_in - push_end,
            )
            if sent is not None:
                phases["supernode_forward"] = sent - push_end
                phases["grid_pull"] = replies_in - sent
            phases["aggregate"] = end - replies_in
            lab_phases[c["lab"]] = {k: round(v, 3) for k, v in phases.items()}
            for key, value in phases.items():
                phases_all.setdefault(key, []).append(value)
            if "pushed_objects" in c:
                objects_sent.append(c["pushed_objects"])
            if "pushed_object_bytes" in c:
                bytes_sent.append(
                    c["pushed_object_bytes"] + c.get("message_header_bytes", 0) + c.get("object_tree_bytes", 0)
                )
        last = max(mine, key=lambda c: c.get("push_end", c["train_end"]))
        for key, value in lab_phases[last["lab"]].items():
            critical.setdefault(key, []).append(value)
        per_round.append(
            {
                "round": rnd,
                "round_seconds": round(float(row["seconds"]), 3),
                "slowest_client_train_seconds": round(slowest, 3),
                "round_overhead": round(float(row["seconds"]) / slowest, 4),
                "overhead_seconds": round(float(row["seconds"]) - slowest, 3),
                "client_train_seconds": {k: round(v, 3) for k, v in train.items()},
                "accepted": len(row.get("accepted", [])),
                "phases_seconds": lab_phases,
                "last_reply_lab": last["lab"],
            }
        )
    starts = [float(r["started"]) for r in rounds]  # replies-in times: same spacing
    periods = [b - a for a, b in zip(starts, starts[1:])]
    return {
        "per_round": per_round,
        "phases_median_seconds": {k: _median(v) for k, v in phases_all.items()},
        "critical_path_median_seconds": {k: _median(v) for k, v in critical.items()},
        "round_period_seconds": [round(p, 3) for p in periods],
        "bytes_sent": bytes_sent,
        "objects_pushed_per_client_per_round": int(statistics.median(objects_sent)) if objects_sent else None,
    }


def secure_summary(plain: list[dict], secure: list[dict]) -> dict:
    """Secure aggregation against plain rounds of the same federation: ``secagg_round_overhead`` is the
    median secure round time over the median plain round time (target 1.3); per-round figures as for plain."""
    if not secure:
        return {}
    plain_median = statistics.median(r["round_seconds"] for r in plain)
    secure_median = statistics.median(r["round_seconds"] for r in secure)
    ratio = secure_median / plain_median
    # Training time varies with machine load from round to round; the time a round spends
    # outside training does not depend on it, so also compare that.
    added = statistics.median(r["overhead_seconds"] for r in secure) - statistics.median(
        r["overhead_seconds"] for r in plain)
    keep = ("round", "round_seconds", "slowest_client_train_seconds", "round_overhead", "overhead_seconds", "accepted")
    return {
        "secagg_round_overhead": round(ratio, 4),
        "secagg_round_overhead_target": 1.3,
        "secagg_target_met": ratio <= 1.3,
        "secagg_added_seconds": round(added, 3),
        "secagg_round_overhead_same_training": round((plain_median + added) / plain_median, 4),
        "secure_round_seconds_median": round(secure_median, 3),
        "secure_round_overhead": round(statistics.median(r["round_overhead"] for r in secure), 4),
        "secure_per_round": [{k: r[k] for k in keep} for r in secure],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet, ~5 s training, 1 round")
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (default 3; quick 1)")
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="target local training time per round, one lab alone (default 30; quick 5)")
    parser.add_argument("--labs", type=int, default=3)
    parser.add_argument("--plain-only", action="store_true", help="skip the rounds with secure aggregation")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep-workdir", action="store_true")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    from napari_feddp.federation.demo import make_synthetic_lab
    from napari_feddp.federation.pilot import LabSpec, LocalFederation
    from napari_feddp.federation.processes import FLOWER_ENV_DEFAULTS
    from napari_feddp.federation.settings import RunSettings

    rounds = args.rounds or (1 if args.quick else 3)
    target = args.train_seconds or (5.0 if args.quick else 30.0)
    cache = Path(os.environ.get("FEDDP_BENCH_CACHE") or Path.home() / ".cache" / "napari-feddp" / "benchmarks")
    out = args.out or (cache / "federation_round.quick.json" if args.quick else HERE / "results" / "federation_round.json")
    arch = dict(model_depth=2, model_base_width=8, crop_size=32) if args.quick else {}
    settings = RunSettings(
        num_rounds=rounds,
        min_clients=args.labs,
        min_updates=args.labs,
        dp_mode="sample",
        batch_size=4,
        final_evaluation=False,
        round_timeout=600.0,
        node_wait_timeout=300.0,
        **arch,
    )
    info = machine_info()
    t_all = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="feddp-bench-fed-"))
    print(f"workdir {workdir}", flush=True)
    labs_root = workdir / "data"
    lab_dirs = [
        make_synthetic_lab(labs_root / f"lab{i}", n_tiles=8, size=2 * settings.crop_size, seed=i)
        for i in range(args.labs)
    ]
    steps, per_step = calibrate_steps(settings, lab_dirs[0], target, workdir)
    settings = settings.replace(max_steps=steps)
    print(f"calibrated: {per_step:.3f} s/step alone -> max-steps {steps} (~{target:.0f} s)", flush=True)

    log_path = workdir / "client-timings.jsonl"
    env = {
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "FEDDP_BENCH_LOG": str(log_path),
    }
    labs = [
        LabSpec(name=f"lab{i}", data_dir=d, train_fn="federation_round:timed_train", extra_env=env)
        for i, d in enumerate(lab_dirs)
    ]
    t0 = time.monotonic()
    with LocalFederation(workdir=workdir / "fed", labs=labs, threads=1, keep_workdir=True) as fed:
        startup = time.monotonic() - t0
        print(f"federation up in {startup:.1f} s; running {rounds} round(s) in the clear", flush=True)
        logs = {name: node.process.log_path for name, node in fed.supernodes.items()}
        with LogWatcher(logs) as watcher:
            plain = settings.replace(secure_aggregation="off", checkpoint_dir=str(workdir / "plain"))
            outcome = fed.run(plain, timeout=600.0 + rounds * 20 * target,
                              on_round=lambda r: print(f"  round {r['round']}: {r['seconds']:.1f} s", flush=True))
        split = time.time()
        secure = None
        if not args.plain_only:
            print(f"running {rounds} round(s) with secure aggregation (SecAgg+)", flush=True)
            on = settings.replace(secure_aggregation="on", checkpoint_dir=str(workdir / "secure"))
            secure = fed.run(on, timeout=600.0 + rounds * 30 * target,
                             on_round=lambda r: print(f"  round {r['round']}: {r['seconds']:.1f} s", flush=True))
    clients = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    analysis = analyse(outcome.rounds, [c for c in clients if c["train_start"] < split], outcome.checkpoint_dir,
                       watcher)
    secure_rounds = []
    if secure is not None:
        secure_rounds = analyse(secure.rounds, [c for c in clients if c["train_start"] >= split],
                                secure.checkpoint_dir)["per_round"]
    sizes = model_sizes(settings)
    imports = import_seconds()

    per_round = analysis["per_round"]
    overheads = [r["round_overhead"] for r in per_round]
    bytes_sent = analysis.pop("bytes_sent")
    result = {
        "benchmark": "federation_round",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "command": "python benchmarks/federation_round.py" + (" --quick" if args.quick else ""),
        "round_overhead": round(statistics.median(overheads), 4) if overheads else None,
        "round_overhead_max": round(max(overheads), 4) if overheads else None,
        "round_overhead_target": 1.25,
        "target_met": bool(overheads) and statistics.median(overheads) <= 1.25,
        **secure_summary(per_round, secure_rounds),
        "round_seconds_median": _median([r["round_seconds"] for r in per_round]),
        "slowest_client_train_seconds_median": _median([r["slowest_client_train_seconds"] for r in per_round]),
        "overhead_seconds_median": _median([r["overhead_seconds"] for r in per_round]),
        "bytes_sent_per_client_per_round": int(statistics.median(bytes_sent)) if bytes_sent else None,
        "model_float32_bytes": sizes["model_float32_bytes"],
        "bytes_ratio_to_model": round(statistics.median(bytes_sent) / sizes["model_float32_bytes"], 4)
        if bytes_sent else None,
        **{k: v for k, v in sizes.items() if k != "model_float32_bytes"},
        "clientapp_import_seconds_idle_process": imports,
        **analysis,
        "setup": {
            "labs": args.labs,
            "rounds": rounds,
            "tls": True,
            "supernode_auth": True,
            "isolation": "process (one flwr-clientapp process per message, started through the app pin)",
            "dp_mode": settings.dp_mode,
            "max_steps": steps,
            "calibrated_seconds_per_step_alone": round(per_step, 4),
            "target_train_seconds_alone": target,
            "batch_size": settings.batch_size,
            "crop_size": settings.crop_size,
            "unet": settings.unet_params,
            "torch_threads_per_clientapp": 1,
            "final_evaluation": False,
            "flower_env": {k: v for k, v in FLOWER_ENV_DEFAULTS.items() if k.startswith("FLWR_SUPEREXEC")},
            "flower_hardcoded_polls_seconds": {"supernode_pull_when_idle": 3.0, "serverapp_grid_pull": 3.0},
            "federation_startup_seconds": round(startup, 2),
            "run_seconds": round(outcome.seconds, 2),
        },
        "definitions": {
            "secagg_round_overhead": "median ServerApp round time with secure aggregation (SecAgg+: setup, "
            "key sharing, training with masking, unmasking) / the same without it, in one federation",
            "secagg_added_seconds": "median time outside training (round - slowest lab's training) with "
            "secure aggregation minus the same without it",
            "secagg_round_overhead_same_training": "(plain round median + secagg_added_seconds) / plain round "
            "median: the ratio at equal training time",
            "round_overhead": "ServerApp round time (rounds.jsonl 'seconds') / max over labs of the "
            "wall time of default_train/train_local measured inside each ClientApp process in that "
            "round (3 labs share 2 cores); median over rounds",
            "bytes_sent_per_client_per_round": "bytes of Flower objects + message header + object tree "
            "pushed by the ClientApp (same objects forwarded by the SuperNode to the SuperLink over HTTPS; "
            "TLS/HTTP framing not counted)",
        },
        "machine": info,
    }
    result["machine"]["load_average_1_5_15_after"] = [round(v, 2) for v in os.getloadavg()]
    result["total_seconds"] = round(time.monotonic() - t_all, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep_workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({k: result.get(k) for k in (
        "round_overhead", "round_overhead_max", "round_seconds_median", "secagg_round_overhead",
        "secure_round_seconds_median", "secure_round_overhead",
        "slowest_client_train_seconds_median", "overhead_seconds_median",
        "bytes_sent_per_client_per_round", "model_float32_bytes", "bytes_ratio_to_model",
        "phases_median_seconds", "critical_path_median_seconds")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
