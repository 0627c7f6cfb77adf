"""``napari-feddp federation certs|serve|run|join|demo``: federated training with Flower.

* ``certs``  - coordinator: pilot CA and SuperLink certificate.
* ``keys``   - lab: this lab's SuperNode key pair (the public key goes to the coordinator).
* ``serve``  - coordinator: SuperLink on loopback behind a Fleet-only TLS gateway,
  SuperNode authentication, SuperExec authentication.
* ``run``    - coordinator: submit the FedDP run and stream round progress.
* ``join``   - lab: connect this lab's dataset as a SuperNode.
* ``demo``   - a whole federation (SuperLink + N labs) on loopback.

Everything heavy lives in :mod:`napari_feddp.federation`; this module only
parses arguments and prints.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

from . import CommandError


def add_parser(subparsers) -> None:
    """Add ``federation`` and its sub-commands to the top-level parser."""
    parser = subparsers.add_parser(
        "federation",
        help="federated, differentially private training with Flower (certs, keys, serve, run, join, demo)",
        description="Train one model across labs with Flower; no image leaves a lab.",
    )
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    sub = parser.add_subparsers(dest="federation_command", metavar="SUBCOMMAND")
    for add in (_add_certs, _add_keys, _add_serve, _add_run, _add_join, _add_demo):
        add(sub)


# --------------------------------------------------------------------------- shared options


def _add_training_options(parser, **defaults) -> None:
    """An option for every run setting that has a flag; ``defaults`` (by dest) replace the settings' own."""
    from ..federation.settings import RunSettings, add_options

    add_options(parser.add_argument_group("FedDP run"), RunSettings)
    parser.set_defaults(**defaults)


def _settings(args, checkpoint_dir: Path):
    from ..federation.settings import RunSettings, SettingsError, option_errors, options_of

    values = options_of(RunSettings, args)
    if values["resume_from"]:
        values["resume_from"] = str(Path(values["resume_from"]).resolve())
    values["model_groups"] = math.gcd(values["model_base_width"], 8)  # GroupNorm groups must divide every width
    try:
        return RunSettings(**values, checkpoint_dir=str(checkpoint_dir.resolve()))
    except SettingsError as exc:
        raise CommandError(option_errors(RunSettings, exc)) from None


@contextlib.contextmanager
def _session(args):
    """``kill`` runs the same cleanup as Ctrl-C; ``--insecure`` is warned about once, here, not per process."""
    from ..federation.processes import InsecureModeWarning, signals_raise_keyboard_interrupt

    if getattr(args, "insecure", False):
        print("WARNING: --insecure: traffic is NOT encrypted and SuperNodes are NOT authenticated. "
              "Use only for local debugging.", file=sys.stderr)  # fmt: skip
    with signals_raise_keyboard_interrupt(), warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureModeWarning)
        yield


def _check_budget(budget: float, whose: str) -> None:
    if budget < 0:
        raise CommandError("--epsilon-budget must be >= 0 (0: unlimited)")
    if budget == 0:
        print(f"WARNING: --epsilon-budget 0: {whose} privacy budget is UNLIMITED; epsilon keeps growing with every "
              "round trained.", file=sys.stderr)  # fmt: skip


def _print_round(row: dict) -> None:
    from ..federation.demo import round_details, table_row

    print("\n".join([table_row(row), *round_details(row)]), flush=True)


def _report(outcome) -> None:
    from ..federation.demo import evaluation_line

    print(evaluation_line(outcome.evaluation))
    print(f"run {outcome.run_id}: {outcome.status} in {outcome.seconds:.0f} s")
    print(f"checkpoints and model cards: {outcome.checkpoint_dir}")


# --------------------------------------------------------------------------- certs


def _add_certs(sub) -> None:
    p = sub.add_parser("certs", help="coordinator: create a pilot CA and the SuperLink certificate")
    p.add_argument("--out", required=True, help="output folder (pki.json, ca/, superlink/)")
    p.add_argument("--host", action="append", dest="hosts",
                   help="address the labs dial (certificate SAN); repeatable; "
                        "default 127.0.0.1 and localhost (always included)")
    p.add_argument("--days", type=int, default=365, help="certificate validity")
    p.set_defaults(func=run_certs)


def run_certs(args) -> int:
    from ..federation.certs import create_pilot_pki

    try:
        pki = create_pilot_pki(args.out, hosts=args.hosts or (), days=args.days)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    print(f"CA certificate (give to every lab): {pki.ca.cert}")
    print(f"CA private key (keep offline):      {pki.ca.key}")
    print(f"SuperLink certificate / key:        {pki.server.cert} / {pki.server.key}")
    print("Each lab makes its own key pair ('napari-feddp federation keys') and sends you its public key.")
    print(f"manifest: {pki.root / 'pki.json'}  (use: napari-feddp federation serve --pki {pki.root} "
          "--register LAB LAB.pub ...)")
    return 0


# --------------------------------------------------------------------------- keys


def _add_keys(sub) -> None:
    p = sub.add_parser("keys", help="lab: create this lab's key pair (send only the .pub file)")
    p.add_argument("--out", required=True, help="folder for LAB.key (private, stays here) and LAB.pub")
    p.add_argument("--lab", required=True, help="lab name (letters, digits, '_', '.', '-')")
    p.add_argument("--force", action="store_true",
                   help="replace an existing key pair (the coordinator must register the new key)")
    p.set_defaults(func=run_keys)


def run_keys(args) -> int:
    from ..federation.certs import create_node_keys

    try:
        pair = create_node_keys(args.out, args.lab, overwrite=args.force)
    except (ValueError, FileExistsError) as exc:
        raise CommandError(str(exc)) from None
    print(f"private key (keep it in the lab, mode 600): {pair.private_key}")
    print(f"public key (send to the coordinator):       {pair.public_key}")
    return 0


# --------------------------------------------------------------------------- serve


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="start the coordinator (SuperLink on loopback, Fleet gateway for labs)")
    p.add_argument("--pki", help="folder from 'federation certs'")
    p.add_argument("--host", default="127.0.0.1",
                   help="address labs dial: the Fleet gateway binds here (must be in the certificate); "
                        "the SuperLink's Control and Runtime APIs stay on 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="gateway port (default: a free one)")
    p.add_argument("--workdir", default=None, help="logs, Flower homes, connection.json "
                   "(default: a temporary folder)")
    p.add_argument("--register", nargs=2, action="append", metavar=("LAB", "PUBLIC_KEY"),
                   default=[], help="register a lab's public key (from 'federation keys'); repeatable")
    p.add_argument("--insecure", action="store_true", help="plain text, no authentication (debug only)")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from ..federation.certs import load_pilot_pki
    from ..federation.coordinator import Coordinator

    if not args.pki and not args.insecure:
        raise CommandError("--pki is required (create it with 'federation certs'), or pass --insecure")
    pki = load_pilot_pki(args.pki) if args.pki else None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="feddp-superlink-"))
    coordinator = Coordinator(workdir, pki, insecure=args.insecure, host=args.host, port=args.port,
                              public_keys={lab: Path(key) for lab, key in args.register})
    with _session(args):
        try:
            coordinator.start()
            print(f"labs dial {coordinator.fleet_address} (Fleet API only, "
                  f"{'PLAIN TEXT' if args.insecure else 'TLS'}); Control API on {coordinator.address} "
                  "(this machine only)")
            for lab, node_id in coordinator.registered.items():
                print(f"  registered lab {lab} as SuperNode {node_id}")
            print(f"log: {coordinator.superlink.log_path}")
            print(f"start a run:  napari-feddp federation run --connection {workdir} "
                  "--rounds N --min-clients K --checkpoint-dir DIR")
            print("Ctrl-C stops the SuperLink.", flush=True)
            while coordinator.is_running():
                time.sleep(1.0)
            dead = coordinator.gateway if coordinator.superlink.is_running() else coordinator.superlink
            print(f"{dead.name} exited with code {dead.returncode}:\n{dead.log_tail()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping the SuperLink", file=sys.stderr)
            return 0
        finally:
            coordinator.stop()


# --------------------------------------------------------------------------- run


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="submit a FedDP run to a SuperLink and follow its rounds")
    where = p.add_argument_group("SuperLink")
    where.add_argument("--connection", help="work folder of a running 'federation serve'")
    where.add_argument("--superlink", help="HOST:PORT of the SuperLink's Control API on this machine "
                       "(printed by 'federation serve'; instead of --connection)")
    where.add_argument("--ca", help="CA certificate of the federation")
    where.add_argument("--insecure", action="store_true", help="plain text (debug only)")
    p.add_argument("--checkpoint-dir", required=True,
                   help="where the server writes round checkpoints (on the SuperLink machine)")
    p.add_argument("--no-follow", action="store_true", help="print the run id and return")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to follow the run")
    _add_training_options(p)
    p.set_defaults(func=run_run)


def run_run(args) -> int:
    from ..federation.coordinator import FederationRunError, read_connection, submit_run
    from ..federation.demo import table_header
    from ..federation.flwr_cli import FlowerCli, FlowerCliError, write_flower_config

    checkpoint_dir = Path(args.checkpoint_dir)
    settings = _settings(args, checkpoint_dir)
    workdir = Path(tempfile.mkdtemp(prefix="feddp-run-"))
    if args.connection:
        cli = FlowerCli(Path(read_connection(args.connection)["flwr_home"]))
    else:
        if not args.superlink:
            raise CommandError("give --connection DIR (from 'federation serve') or --superlink HOST:PORT")
        if not args.ca and not args.insecure:
            raise CommandError("--ca CA.pem is required unless --insecure")
        cli = FlowerCli(workdir / "flwr-home")
        write_flower_config(cli.flwr_home, args.superlink, root_cert=args.ca, insecure=args.insecure)
    with _session(args):
        try:
            if args.no_follow:
                run_id = submit_run(cli, settings, workdir / "app", follow=False)
                print(f"started run {run_id}; checkpoints will land in {checkpoint_dir.resolve()}")
                return 0
            print(f"checkpoints and model cards go to {checkpoint_dir.resolve()}")
            print(table_header(), flush=True)
            outcome = submit_run(cli, settings, workdir / "app", timeout=args.timeout, on_round=_print_round)
        except (FlowerCliError, FederationRunError) as exc:
            raise CommandError(str(exc)) from None
    _report(outcome)
    return 0


# --------------------------------------------------------------------------- join


def _add_join(sub) -> None:
    from ..federation.lab import CONNECT_TIMEOUT
    from ..federation.settings import NodeSettings, add_options

    p = sub.add_parser("join", help="connect this lab's dataset to a federation (runs a SuperNode)")
    p.add_argument("--superlink", required=True, help="HOST:PORT the coordinator gave (its Fleet gateway)")
    p.add_argument("--ca", help="CA certificate of the federation")
    p.add_argument("--key", help="this lab's private key (from 'federation keys')")
    p.add_argument("--dataset", required=True, help="training folder with images/ and masks/")
    p.add_argument("--eval-dataset", default="", help="held-out tiles: final evaluation and the check "
                   "a received model must pass before it becomes this lab's default")
    p.add_argument("--lab", default=None, help="lab name (default: key file name)")
    p.add_argument("--ledger-dir", default="", help="privacy ledger folder (default: $FEDDP_HOME/ledger, "
                   "$FEDDP_HOME being the per-user data folder unless set)")
    p.add_argument("--model-store", default="", help="where to keep the federation's final model")
    p.add_argument("--workdir", default=None, help="logs and local history")
    p.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT,
                   help="seconds to wait for the coordinator to accept this lab before giving up "
                        f"(default {CONNECT_TIMEOUT:g})")
    p.add_argument("--insecure", action="store_true", help="plain text, no authentication (debug only)")
    add_options(p.add_argument_group(
        "lab privacy policy", "what any run may ask of this lab; a run outside it is declined before training"),
        NodeSettings)
    p.set_defaults(func=run_join)


def policy_from_args(args) -> dict:
    """NodeSettings policy fields from the join options."""
    from ..federation.settings import NodeSettings, options_of

    _check_budget(args.epsilon_budget, "this lab's")
    return options_of(NodeSettings, args)


def run_join(args) -> int:
    from ..federation.lab import CoordinatorUnreachable, LabNode
    from ..federation.processes import FederationProcessError

    if not args.insecure and not (args.ca and args.key):
        raise CommandError("--ca and --key are required unless --insecure")
    if args.connect_timeout <= 0:
        raise CommandError("--connect-timeout must be > 0 seconds")
    policy = policy_from_args(args)
    node = LabNode(superlink=args.superlink, ca=Path(args.ca) if args.ca else None,
                   key=Path(args.key) if args.key else None, dataset=Path(args.dataset), lab=args.lab,
                   epsilon_budget=policy.pop("max_epsilon"), policy=policy, ledger_dir=args.ledger_dir,
                   eval_dataset=args.eval_dataset, model_store=args.model_store,
                   workdir=Path(args.workdir) if args.workdir else None, insecure=args.insecure,
                   connect_timeout=args.connect_timeout)  # fmt: skip
    with _session(args):
        try:
            try:
                node.settings()
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            node.start()
            print(f"lab {node.lab} connected to {args.superlink} as SuperNode {node.node_id}")
            print(f"policy: {node.policy_summary()}")
            print(f"log: {node.process.log_path}; Ctrl-C leaves the federation.", flush=True)
            last = None
            while True:
                status = node.status()
                if (line := f"status: {status.describe()}") != last:
                    print(line, flush=True)
                    last = line
                if status.state in status.FINAL:
                    return 0 if status.state == "stopped" else 1
                time.sleep(1.0)
        except CoordinatorUnreachable as exc:
            # One line instead of the SuperNode's retry log: the address, how long, and why.
            print(exc, file=sys.stderr)
            return 1
        except FederationProcessError as exc:
            raise CommandError(f"could not join: {exc}") from None
        except KeyboardInterrupt:
            print("leaving the federation", file=sys.stderr)
            return 0
        finally:
            node.stop()


# --------------------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run a whole federation (SuperLink + N labs) on loopback")
    p.add_argument("--clients", type=int, default=3, help="number of simulated labs")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where round checkpoints and model cards go (default: checkpoints/ in the "
                        "work folder; without --workdir a new feddp-demo-* folder in the system's "
                        "temporary folder, of which only checkpoints/ is kept)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", default=None,
                        help="dataset folder (images/, masks/) split across the labs by TCGA site, or a "
                             "folder with train/ and test/ such folders, e.g. MoNuSeg (default: synthetic tiles)")
    source.add_argument("--synthetic", action="store_true", help="synthetic tiles (the default without --data)")
    p.add_argument("--tiles", type=int, default=4, help="synthetic tiles per lab")
    p.add_argument("--workdir", default=None, help="keep logs, PKI, Flower homes and checkpoints here")
    p.add_argument("--epsilon-budget", type=float, default=8.0,
                   help="every lab's privacy budget (default 8; 0: unlimited, with a warning)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before giving up")
    p.add_argument("--insecure", action="store_true", help="plain text, no authentication (debug only)")
    _add_training_options(p, rounds=2, min_clients=0)
    p.set_defaults(func=run_demo, max_steps=3, crop_size=64, depth=3, base_width=8)


def run_demo(args) -> int:
    from ..federation.coordinator import FederationRunError
    from ..federation.demo import prepare_demo_labs, table_header
    from ..federation.pilot import LocalFederation
    from ..federation.processes import FederationProcessError

    if args.clients < 1:
        raise CommandError("--clients must be at least 1")
    _check_budget(args.epsilon_budget, "every lab's")
    if args.min_clients == 0:
        args.min_clients = args.clients
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="feddp-demo-"))
    keep = args.workdir is not None
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else workdir / "checkpoints"
    settings = _settings(args, checkpoint_dir)
    print(f"checkpoints and model cards go to {checkpoint_dir.resolve()}", flush=True)
    with _session(args):
        try:
            labs, source = prepare_demo_labs(workdir / "data", args.clients, data=args.data, tiles=args.tiles,
                                             epsilon_budget=args.epsilon_budget)  # fmt: skip
            for lab in labs:  # the demo's labs accept the mode the demo asks for
                lab.policy = {"accept_dp_modes": args.dp_mode}
            if source == "synthetic":  # a dataset keeps --source-mpp (MoNuSeg: 0.25 µm/px, the default)
                settings = settings.replace(source_mpp=settings.mpp)
            print(f"demo: {args.clients} labs ({source} tiles), {args.rounds} rounds, dp-mode "
                  f"{args.dp_mode}, {'PLAIN TEXT' if args.insecure else 'TLS + node authentication'}")
            started = time.monotonic()
            with LocalFederation(workdir=workdir / "federation", labs=labs, insecure=args.insecure,
                                 keep_workdir=True) as fed:
                print(f"SuperLink {fed.coordinator.address} + {len(fed.supernodes)} SuperNodes up in "
                      f"{time.monotonic() - started:.0f} s", flush=True)
                print(table_header(), flush=True)
                outcome = fed.run(settings, timeout=args.timeout, on_round=_print_round)
        except (FederationProcessError, FederationRunError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        except KeyboardInterrupt:
            print("demo interrupted; all federation processes stopped", file=sys.stderr)
            return 130
        finally:
            if not keep:
                _remove_all_but(workdir, checkpoint_dir)
    _report(outcome)
    if keep:
        print(f"logs and Flower homes: {workdir}")
    return 0


def _remove_all_but(workdir: Path, keep: Path) -> None:
    """Delete the demo's temporary work folder, except ``keep`` if it lies inside (its checkpoints)."""
    import shutil

    keep = keep.resolve()
    if not keep.is_relative_to(workdir.resolve()) or not keep.exists():
        shutil.rmtree(workdir, ignore_errors=True)
        return
    for child in workdir.iterdir():
        if child.resolve() != keep and not keep.is_relative_to(child.resolve()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
