"""``napari-feddp info SLIDE``: print what the reader sees in a slide."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="print a slide's metadata (vendor, mpp, levels)")
    parser.add_argument("slide", help="path to a .svs, .ndpi, .scn, .bif or (OME-)TIFF file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..slides import open_slide

    slide = open_slide(args.slide)
    meta = slide.metadata()
    slide.close()
    print(json.dumps(meta, indent=2) if args.json else "\n".join(f"{key:>18}: {value}" for key, value in meta.items()))
    return 0
