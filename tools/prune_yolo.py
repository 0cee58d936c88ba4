#!/usr/bin/env python
"""Prune a YOLO checkpoint end to end (sparse -> prune -> finetune -> val -> bench), as a script.

The same job as `yolo-prune pipeline`, with --flags for people who prefer scripts. The flags are generated from
yolo-prune's options schema (yolo_prune/options.py): every key of mode `pipeline`, as --key-name, with the same
meaning, default and checks as in `yolo-prune cfg`. Example:

    python tools/prune_yolo.py --model best.pt --data data.yaml --target-macs 0.5 --finetune-epochs 30
"""

from __future__ import annotations

import argparse
import sys

from yolo_prune.cli import main as cli_main
from yolo_prune.options import keys_for

MODE = "pipeline"
# flags of the script itself, beside the schema's keys
HELP = {"model": "ultralytics .pt checkpoint (or model yaml) to prune; with --resume: the run folder",
        "data": "dataset yaml: YOLO format or COCO format (train/val + *_json); not needed with --resume"}


def _flag(key) -> tuple[str, dict]:
    """The argparse flag of one schema key; values stay text and are checked by the schema, as on the CLI."""
    text = (HELP.get(key.name) or key.doc).replace("%", "%%")
    kw: dict = {"dest": key.name, "default": None, "help": f"{text} (default: {key.default})"}
    if key.kind == "bool" or (key.kind == "bool|str" and not key.choices):  # --resume: a flag in a script
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["metavar"] = key.type_label().split(",")[0].replace(" ", "").upper()
        if key.choices:
            kw["metavar"] = "{" + ",".join(str(c) for c in key.choices) + "}"
    return "--" + key.name.replace("_", "-"), kw


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key in keys_for(MODE):
        if key.name == "mode":
            continue
        flag, kw = _flag(key)
        p.add_argument(flag, **kw)
    p.add_argument("--no-bench", action="store_true", help="skip the latency benchmark (same as --backends '')")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.resume and not (args.model and args.data):
        p.error("--model and --data are required (unless --resume)")
    tokens = [MODE] + [f"{k}={v}" for k, v in vars(args).items() if v is not None and k != "no_bench"]
    if args.no_bench:
        tokens.append("backends=")
    return cli_main(tokens)


if __name__ == "__main__":
    sys.exit(main())
