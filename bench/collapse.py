#!/usr/bin/env python
"""Why one-shot pruning collapses on some models (issue 24, item 1): mAP right after pruning, no training.

Each row prunes one dense model with ``yolo_prune.prune`` (the pipeline's prune defaults: recon ranking,
sensitivity allocation, ``lstsq_seq``, BN re-estimation, 64 calibration images) with one thing changed, and
records the mAP50-95 right after pruning (before and after BN re-estimation) and where the removal went: the
fraction of channels each part of the network keeps (backbone, neck, and the Detect head's box and class branches
per stride).

Models (``--model``): ``fixture`` (the COCO yolov8n on coco128 96/32 @320), ``bccd`` (the fixture fine-tuned 12
epochs on bccd @416, ``common.bccd_dense()``), ``bccd_e3`` (the same, 3 epochs: the under-trained user model).

    python -m bench.collapse --model fixture --target 0.5 --rows default calib256 reset no_recal max_layer_0.5 global
    python -m bench.collapse --model bccd_e3 --target 0.5 --rows default max_layer_0.5
    python -m bench.collapse --model bccd --target 0.3 --rows default max_layer_0.5

Results: ``bench/results/collapse.json``.
"""

from __future__ import annotations

import argparse
import csv
import re
import time
from pathlib import Path
from typing import Any

from bench import common

NAME = "collapse"

ROWS: dict[str, dict[str, Any]] = {
    "default": {},
    "calib256": {"calib_images": 256},
    "reset": {"recalibrate": "reset"},
    "no_recal": {"recalibrate": False},
    "max_layer_0.5": {"max_layer_ratio": 0.5},
    "global": {"allocation": "global"},
    "bn_global": {"method": "bn", "allocation": "global"},
}


def models(name: str) -> tuple[Path, Path, int]:
    """(dense checkpoint, data yaml, imgsz) of a ``--model`` choice."""
    if name == "fixture":
        return common.WEIGHTS, common.coco128_split(), 320
    if name == "bccd":
        return common.bccd_dense(), common.bccd(), 416
    if name == "bccd_e3":
        return common.bccd_dense(epochs=3), common.bccd(), 416
    raise SystemExit(f"unknown model {name}")


def _part(layer: str) -> str:
    """The part of a yolov8/yolo11 detector a conv belongs to (by its module index and head branch)."""
    m = re.match(r"model\.(\d+)\.(cv[23])\.(\d)\.", layer)
    if m:
        return f"head {'box' if m[2] == 'cv2' else 'class'} P{int(m[3]) + 3}"
    index = int(layer.split(".")[1])
    return "backbone" if index <= 9 else "neck"


def kept_by_part(layers_csv: Path) -> dict[str, float]:
    """Fraction of the channels each part keeps (summed over its convs)."""
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    with layers_csv.open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            part = _part(row["name"])
            before[part] = before.get(part, 0) + int(row["channels_before"])
            after[part] = after.get(part, 0) + int(row["channels_after"])
    return {p: round(after[p] / before[p], 3) for p in before}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, prog="python -m bench.collapse")
    ap.add_argument("--model", choices=("fixture", "bccd", "bccd_e3"), default="fixture")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--rows", nargs="+", default=["default"], choices=sorted(ROWS))
    args = ap.parse_args(argv)

    import yolo_prune as yp

    dense, data, imgsz = models(args.model)
    work = common.WORK / NAME / f"{args.model}_{args.target}"
    for row in args.rows:
        t0 = time.perf_counter()
        keys = {"method": "auto", "compensate": "lstsq_seq", "recalibrate": True, "allocation": "auto", **ROWS[row]}
        r = yp.prune(str(dense), data=data, validate=True, target_macs=args.target, imgsz=imgsz, project=work,
                     name=row, exist_ok=True, **keys)
        entry = {"command": common.command_line(), "started": time.strftime("%Y-%m-%d %H:%M"),
                 "machine": common.machine(), "model": args.model, "dense": dense, "target_macs": args.target,
                 "overrides": ROWS[row], "macs_ratio": round(r.macs_ratio, 4), "map50_95_dense": r.map50_95_before,
                 "map50_95_pruned": r.map50_95_after, "map50_95_before_recalibration": r.map50_95_no_recalibration,
                 "kept": kept_by_part(r.save_dir / "layers.csv"), "checkpoint": r.checkpoint,
                 "seconds": round(time.perf_counter() - t0, 1)}
        out = common.read_result(NAME) or {"rows": {}}
        out["rows"][f"{args.model}/{args.target}/{row}"] = entry
        common.write_result(NAME, out)
        print(f"{args.model} {args.target} {row}: mAP50-95 {r.map50_95_before:.3f} -> {r.map50_95_after:.3f} "
              f"kept {entry['kept']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
