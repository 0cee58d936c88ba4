"""What portable pruning costs (issue 23): mAP right after pruning, ``portable=True`` (stock ultralytics classes:
both halves of every split block lose the same channels, attention keeps its input width) against ``portable=False``
(any widths; the checkpoint needs yolo-prune to load).

Fixture: the COCO yolov8n (``../shared/fixtures``; ``--weights yolo11n`` for the YOLO11n, whose C2PSA attention
keeps its outer width when portable), calibration images from the FIRST 96 coco128 images, COCO mAP50-95 on the
LAST 32 (``common.coco128_split()``), imgsz 320. Each arm is ``yolo_prune.prune(weights, data=..., validate=True,
target_macs=T, portable=P)`` with every other key at its default (recon ranking, sensitivity allocation, sequential
reconstruction, BN re-estimation), no fine-tuning. Arms run one at a time.

    python -m bench.portable                      # yolov8n, targets 0.7 and 0.9, portable and free
    python -m bench.portable --quick              # yolov8n, target 0.9 only
    python -m bench.portable --weights yolo11n    # the YOLO11n fixture (result portable_yolo11n.json)

Results: ``bench/results/portable[_quick|_yolo11n].json`` (rewritten after every arm; finished arms are reused
unless ``--fresh``).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

from bench import common

IMGSZ = 320
WEIGHTS = {"yolov8n": common.WEIGHTS, "yolo11n": common.SHARED / "weights" / "yolo11n_coco_int8rebuild.pt"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stock_only(checkpoint: Any) -> bool:
    """True when the checkpoint's pickle names no yolo_prune class (it loads with ultralytics alone)."""
    from yolo_prune.models import pickled_modules

    return not any(m.split(".")[0] == "yolo_prune" for m in pickled_modules(checkpoint))


def arm(weights: Any, data: Any, target: float, portable: bool, name: str) -> dict[str, Any]:
    """One pruning run, measured right after pruning."""
    import yolo_prune as yp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = yp.prune(weights, data=data, validate=True, target_macs=target, portable=portable, imgsz=IMGSZ,
                     project=common.WORK / "portable", name=name, exist_ok=True)
    return {"target_macs": target, "portable": portable, "macs_ratio": round(r.macs_ratio, 4),
            "params_ratio": round(r.params_ratio, 4), "map50_95_dense": round(r.map50_95_before, 5),
            "map50_dense": round(r.map50_before, 5), "map50_95": round(r.map50_95_after, 5),
            "map50": round(r.map50_after, 5), "prune_seconds": round(r.seconds, 1), "method": r.method,
            "allocation": r.allocation, "compensate": r.compensate, "recalibrate": r.recalibrate,
            "stock_only": stock_only(r.checkpoint), "checkpoint": str(r.checkpoint)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, prog="python -m bench.portable")
    ap.add_argument("--quick", action="store_true", help="target 0.9 only")
    ap.add_argument("--targets", type=float, nargs="+", default=None, help="MACs targets (default 0.7 0.9)")
    ap.add_argument("--weights", choices=sorted(WEIGHTS), default="yolov8n", help="fixture (default: %(default)s)")
    ap.add_argument("--fresh", action="store_true", help="ignore finished arms of a previous run")
    args = ap.parse_args(argv)
    targets = args.targets or ([0.9] if args.quick else [0.7, 0.9])
    name = "portable" + ("_quick" if args.quick else "") + ("" if args.weights == "yolov8n" else f"_{args.weights}")
    previous = None if args.fresh else common.read_result(name)
    payload: dict[str, Any] = {"benchmark": "portable", "command": common.command_line(), "machine": common.machine(),
                               "busy_processes_at_start": common.busy_processes(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "imgsz": IMGSZ,
                               "weights": str(WEIGHTS[args.weights]), "rows": {}}
    if previous:
        payload["rows"] = previous.get("rows", {})
    data = common.coco128_split()
    payload["data"] = str(data)
    for target in targets:
        for portable in (True, False):
            key = f"{target}_{'portable' if portable else 'free'}"
            if key in payload["rows"]:
                continue
            log(f"{args.weights} target_macs={target} portable={portable} ...")
            with common.Timer() as t:
                payload["rows"][key] = arm(WEIGHTS[args.weights], data, target, portable, f"{args.weights}_{key}")
            payload["rows"][key]["total_seconds"] = round(t.seconds, 1)
            common.write_result(name, payload)
            log(json.dumps(payload["rows"][key]))
    print("| MACs target | form | MACs kept | params kept | mAP50-95 | mAP50 | stock classes only |\n"
          "|---|---|---|---|---|---|---|")
    for row in payload["rows"].values():
        print(f"| {row['target_macs']} | {'portable' if row['portable'] else 'free'} | {row['macs_ratio']:.3f} | "
              f"{row['params_ratio']:.3f} | {row['map50_95']:.4f} | {row['map50']:.4f} | {row['stock_only']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
