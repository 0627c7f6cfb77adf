"""``napari-feddp evaluate --data DIR --json OUT.json``: score a model on image/mask pairs."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    from . import add_tta_option

    parser = subparsers.add_parser(
        "evaluate", help="score a model (Dice, Jaccard, pixel accuracy) on a folder of images/ and masks/")
    parser.add_argument("--data", required=True, help="folder with images/ and masks/ (matching file stems)")
    parser.add_argument("--model", help="checkpoint (default: federation latest, else the bundled model)")
    parser.add_argument("--mpp", type=float, help="µm per pixel of the images (default: the model's)")
    parser.add_argument("--json", required=True, dest="json_out", help="where to write the scores")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="evaluate only these file stems")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--batch-size", type=int, default=8)
    add_tta_option(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation import evaluate_folder
    from ..segmentation import check_output_path, load_model
    from . import CommandError

    if args.mpp is not None and args.mpp <= 0:
        raise CommandError(f"--mpp: expected a positive number, received {args.mpp}")
    # Before scoring, which can take minutes: the scores must have somewhere to go.
    out = check_output_path(args.json_out, "--json")
    report = evaluate_folder(args.data, load_model(args.model), mpp=args.mpp, names=args.only,
                             batch_size=args.batch_size, device=args.device, augment=args.tta)
    try:
        out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    except OSError as exc:
        raise CommandError(f"--json: cannot write {out}: {exc.strerror or exc}") from None
    objects = ""
    if report.instances is not None:
        objects = f"  AJI {report.instances['aji']:.4f}  PQ {report.instances['pq']:.4f}"
    print(f"{report.n_images} images: Dice {report.dice:.4f}  Jaccard {report.jaccard:.4f}  "
          f"accuracy {report.accuracy:.4f}{objects}  ({report.seconds:.1f} s) -> {out}")
    return 0
