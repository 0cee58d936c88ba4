#!/usr/bin/env python
"""Prune a YOLOv8 checkpoint end to end (sparse -> prune -> finetune -> val -> bench), as a script.

The same job as `yolo-prune pipeline`, with --flags for people who prefer scripts; each flag maps to the
key of the same name in cfg/default.yaml. Example:

    python tools/prune_yolo.py --model best.pt --data data.yaml --target-macs 0.5 --sparse-epochs 30
"""

from __future__ import annotations

import argparse
import sys

from yolo_prune.config import defaults


def parser() -> argparse.ArgumentParser:
    d = defaults()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="ultralytics .pt checkpoint (or model yaml) to prune; with --resume: the run folder")
    p.add_argument("--data", help="dataset yaml: YOLO format or COCO format (train/val + *_json); not with --resume")
    p.add_argument("--method", default=d["method"] or "auto", choices=["auto", "bn", "l1", "l2", "activation", "recon", "random"],
                   help="channel ranking (default: %(default)s)")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--target-macs", type=float, default=d["target_macs"] or 0.5,
                      help="fraction of the original MACs to keep, in (0, 1] (default: %(default)s)")
    goal.add_argument("--ratio", type=float, default=None, help="fraction of prunable channels to remove instead")
    p.add_argument("--sparse-epochs", type=int, default=d["sparse_epochs"],
                   help="sparsity-training epochs before pruning, 0 to skip (default: %(default)s)")
    p.add_argument("--sr", type=float, default=d["sr"],
                   help="sparsity strength; its meaning depends on --sr-mode, see cfg/default.yaml (default: %(default)s)")
    p.add_argument("--sr-mode", default=d["sr_mode"], choices=["proximal", "subgradient", "greg"],
                   help="proximal: soft-threshold the gammas (exact zeros); subgradient: published L1; greg: growing "
                   "L2 on the channels --target-macs would remove (default: %(default)s)")
    p.add_argument("--sr-group", action=argparse.BooleanOptionalAction, default=d["sr_group"],
                   help="proximal: group soft-thresholding over coupled channels (default: %(default)s)")
    p.add_argument("--sr-head", action=argparse.BooleanOptionalAction, default=d["sr_head"],
                   help="also penalise the Detect head's BatchNorms (default: %(default)s)")
    p.add_argument("--sr-schedule", default=d["sr_schedule"], choices=["constant", "linear", "cosine", "ramp"],
                   help="how sr evolves over the sparse epochs (default: %(default)s)")
    p.add_argument("--greg-ramp", type=float, default=d["greg_ramp"],
                   help="greg: fraction of the sparse epochs over which the penalty grows (default: %(default)s)")
    p.add_argument("--gamma-threshold", type=float, default=d["gamma_threshold"],
                   help="|gamma| below which a channel counts as free (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=None,
                   help="prune: remove channels with all coupled gammas below this first, for free (default: "
                   "--gamma-threshold after proximal/greg sparse training)")
    p.add_argument("--finetune-epochs", type=int, default=d["finetune_epochs"],
                   help="fine-tuning epochs after pruning (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d["steps"],
                   help="pruning increments, each followed by --step-epochs of fine-tuning (default: %(default)s)")
    p.add_argument("--step-epochs", type=int, default=d["step_epochs"], help="fine-tuning epochs between steps")
    p.add_argument("--max-map-drop", type=float, default=None,
                   help="with --steps > 1: stop and keep the last model within this mAP50-95 drop")
    p.add_argument("--compensate", default=d["compensate"], choices=["lstsq_seq", "lstsq", "mean", "none"],
                   help="how the pruned model makes up for removed channels on calibration images (default: %(default)s)")
    p.add_argument("--recalibrate", default=str(d["recalibrate"]), choices=["True", "False", "match", "reset"],
                   help="re-estimate BatchNorm statistics after pruning (default: %(default)s)")
    p.add_argument("--allocation", default=d["allocation"], choices=["global", "sensitivity", "search"],
                   help="how the removal is spread over channel groups (default: %(default)s)")
    p.add_argument("--sensitivity", default=None, help="a sensitivity.csv for --allocation sensitivity/search")
    p.add_argument("--calib-images", type=int, default=d["calib_images"],
                   help="train images for compensation, BN re-estimation and allocation (default: %(default)s)")
    p.add_argument("--round-to", type=int, default=d["round_to"], help="channel multiple (default: %(default)s)")
    p.add_argument("--max-layer-ratio", type=float, default=d["max_layer_ratio"],
                   help="largest fraction of a layer's channels that may go (default: %(default)s)")
    p.add_argument("--imgsz", type=int, default=d["imgsz"], help="image size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=d["batch"], help="batch size (default: %(default)s)")
    p.add_argument("--device", default=d["device"], help="cpu, 0, 0,1 ... (default: a GPU if any)")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed (default: %(default)s)")
    p.add_argument("--project", default=d["project"], help="parent of the run folder: --project P --name N writes to P/N "
                   "(default: runs/pipeline)")
    p.add_argument("--name", default=None, help="run folder name: P/N, or runs/pipeline/N without --project "
                   "(default: pipeline; an existing folder gets N2, N3...)")
    p.add_argument("--exist-ok", action="store_true", help="reuse an existing run folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (--model <run folder>, or "
                   "--project/--name) from its last finished stage, with the settings recorded in its pipeline.json")
    p.add_argument("--no-bench", action="store_true", help="skip the latency benchmark")
    p.add_argument("--verbose", action="store_true", help="ultralytics logs and full tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.resume and not (args.model and args.data):
        p.error("--model and --data are required (unless --resume)")
    from yolo_prune.cli import main as cli_main

    keys = ("model", "data", "method", "target_macs", "ratio", "sparse_epochs", "sr", "sr_mode", "sr_group", "sr_head",
            "sr_schedule", "greg_ramp", "gamma_threshold", "threshold", "finetune_epochs", "steps",
            "step_epochs", "max_map_drop", "round_to", "max_layer_ratio", "imgsz", "batch", "device", "seed",
            "project", "name", "exist_ok", "resume", "verbose", "compensate", "recalibrate", "allocation",
            "sensitivity", "calib_images")
    tokens = ["pipeline"] + [f"{k}={getattr(args, k)}" for k in keys if getattr(args, k) is not None]
    if args.no_bench:
        tokens.append("backends=")
    return cli_main(tokens)


if __name__ == "__main__":
    sys.exit(main())
