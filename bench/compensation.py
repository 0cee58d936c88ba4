#!/usr/bin/env python
"""mAP right after pruning (no fine-tuning) with and without compensation of the removed channels.

Real COCO yolov8n (../shared/fixtures); calibration images from the first 96 coco128 images, COCO mAP
on the last 32. For each method and MACs target: compensate=none, mean (bias only) and lstsq (least-
squares refit of the consuming layers). Writes bench/results/compensation.json and prints a table.

    python -m bench.compensation            # full: bn, l1 x 0.9, 0.7, 0.5 x none, mean, lstsq
    python -m bench.compensation --quick    # bn at 0.9 only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
WORK = ROOT / "bench" / "work" / "compensation"
RESULTS = ROOT / "bench" / "results"


def split_coco128(work: Path) -> Path:
    """YOLO-format copy of coco128: first 96 images train, last 32 val (labels copied, never written in shared)."""
    src = FIXTURES / "coco128"
    images = sorted((src / "images" / "train2017").glob("*.jpg"))
    for split, chosen in (("train", images[:96]), ("val", images[96:])):
        (work / "images" / split).mkdir(parents=True, exist_ok=True)
        (work / "labels" / split).mkdir(parents=True, exist_ok=True)
        for im in chosen:
            dst = work / "images" / split / im.name
            if not dst.exists():
                os.symlink(im, dst)
            label = src / "labels" / "train2017" / f"{im.stem}.txt"
            if label.exists():
                shutil.copyfile(label, work / "labels" / split / label.name)
    import yaml

    names = yaml.safe_load((src / "coco128.yaml").read_text())["names"]
    data = work / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(work), "train": "images/train", "val": "images/val", "names": names}))
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 prog="python -m bench.compensation")
    ap.add_argument("--quick", action="store_true", help="bn at 0.9 MACs only")
    ap.add_argument("--imgsz", type=int, default=320, help="image size (default: %(default)s)")
    args = ap.parse_args()
    import yolo_prune as yp

    weights = FIXTURES / "weights" / "yolov8n_coco_int8rebuild.pt"
    data = split_coco128(WORK)
    dense = yp.validate(weights, data, imgsz=args.imgsz)
    rows = [{"method": "dense", "target_macs": 1.0, "compensate": "-", "map50_95": dense.map50_95, "map50": dense.map50}]
    print(f"dense: mAP50-95 {dense.map50_95:.4f}", flush=True)
    methods, targets = (["bn"], [0.9]) if args.quick else (["bn", "l1"], [0.9, 0.7, 0.5])
    for method in methods:
        for target in targets:
            for comp in ("none", "mean", "lstsq"):
                t0 = time.perf_counter()
                r = yp.prune(weights, method=method, target_macs=target, data=data, compensate=comp, calib_images=32,
                             imgsz=args.imgsz, project=WORK / "runs", name=f"{method}_{target}_{comp}", exist_ok=True)
                seconds = time.perf_counter() - t0
                v = yp.validate(r.checkpoint, data, imgsz=args.imgsz)
                rows.append({"method": method, "target_macs": target, "compensate": comp, "macs_ratio": r.macs_ratio,
                             "map50_95": v.map50_95, "map50": v.map50, "prune_seconds": r.seconds,
                             "total_seconds": seconds})
                print(f"{method} {target} {comp}: mAP50-95 {v.map50_95:.4f} mAP50 {v.map50:.4f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("compensation_quick.json" if args.quick else "compensation.json")
    out.write_text(json.dumps({"imgsz": args.imgsz, "rows": rows}, indent=1))
    print("| method | MACs kept | compensate | mAP50-95 | mAP50 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['target_macs']} | {r['compensate']} | {r['map50_95']:.4f} | {r['map50']:.4f} |")


if __name__ == "__main__":
    main()
