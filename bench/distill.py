#!/usr/bin/env python
"""Distillation from the dense model while fine-tuning a pruned one: mAP50-95 after F fine-tune epochs, per arm.

Setups (the "fixture" and "bccd" setups of issue 12):

* fixture: the COCO yolov8n of ../shared/fixtures pruned with ``prune(method="bn", target_macs=T, data=split)``
  (default compensation, lstsq) on the coco128 split (96 train / 32 val, ``common.coco128_split()``), imgsz 320;
  the teacher is the same unpruned checkpoint.
* bccd: ``common.bccd_dense()`` (the fixture yolov8n fine-tuned on bccd train) pruned the same way on bccd train,
  fine-tuned on bccd train, evaluated on bccd val at imgsz 416; the teacher is that dense model.

Arms (same training recipe in every arm of a setup; recorded in the JSON):

* ``none``: plain fine-tuning (ground truth only);
* ``output``: + output distillation (``teacher=dense, distill=output``: class scores and DFL box distributions);
* ``feature``: + ultralytics' feature distillation instead (``distill=feature``, ``dis`` 6);
* ``labelfree``: no labels at all (``labels=False, unlabeled=<the train images>``): the teacher alone teaches.

mAP is yolo-prune's COCO evaluation of each run's ``best.pt`` on the val split (``val=False`` while training, so
``best.pt`` is the last epoch). Arms run in ``--jobs`` worker processes (one torch thread each).
Writes ``bench/results/<name>.json`` (default ``distill``, ``distill_quick`` with --quick) after every arm.

    python -m bench.distill                            # fixture, targets 0.7 and 0.5, 4 arms, F=10
    python -m bench.distill --setups bccd --targets 0.5 --arms none output --resume   # add the bccd pair
    python -m bench.distill --quick                    # fixture 0.7, arms none/output, F=1
    python -m bench.distill --targets 0.7 --arms none output --set lr0=0.001 --resume   # a recipe variant
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import common

WORK = common.WORK / "distill"
ARMS = ("none", "output", "feature", "labelfree")
# Fine-tuning a pretrained detector on little data (see bench/frontier.py for the fixture probes): AdamW at a low
# lr0, no high warmup bias lr (ultralytics' warmup_bias_lr=0.1 wrecks a pretrained model in one epoch), mosaic
# off (close_mosaic=10 would switch it off for the whole of a 10-epoch run anyway), one optimizer step per
# batch of 16 (nbs=16), no validation during training.
COMMON = {"batch": 16, "nbs": 16, "mosaic": 0.0, "val": False, "seed": 0, "optimizer": "AdamW", "warmup_bias_lr": 0.0}
SETUPS: dict[str, dict[str, Any]] = {
    "fixture": {"imgsz": 320, "recipe": {**COMMON, "lr0": 1e-4, "warmup_epochs": 0}},
    # bccd: the pruned model has more to recover and 205 images give 13 steps per epoch: AdamW at 1e-3 (the dense
    # model was trained at ultralytics' auto lr 1.4e-3) after one warmup epoch
    "bccd": {"imgsz": 416, "recipe": {**COMMON, "lr0": 1e-3, "warmup_epochs": 1}},
}


def setup_paths(setup: str) -> tuple[Path, Path, Path]:
    """(data yaml, teacher = dense checkpoint, training images folder for label-free) of a setup."""
    if setup == "fixture":
        data = common.coco128_split()
        return data, common.WEIGHTS, data.parent / "images" / "train"
    if setup == "bccd":
        from yolo_prune.data import resolve_data

        data = common.bccd()
        train = resolve_data(data).train_images
        return data, common.bccd_dense(), train[0].parent
    raise SystemExit(f"unknown setup {setup}")


def arm_kwargs(arm: str, teacher: Path, train_images: Path) -> dict[str, Any]:
    if arm == "none":
        return {}
    if arm == "output":
        return {"teacher": str(teacher), "distill": "output"}
    if arm == "feature":
        return {"teacher": str(teacher), "distill": "feature"}
    if arm == "labelfree":
        return {"teacher": str(teacher), "distill": "output", "labels": False, "unlabeled": str(train_images)}
    raise SystemExit(f"unknown arm {arm}")


def last_losses(csv_path: Path) -> dict[str, float]:
    if not csv_path.is_file():
        return {}
    with open(csv_path, newline="") as f:
        rows = [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(f)]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("train/")} if rows else {}


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["lr0=0.001"]`` -> ``{"lr0": 0.001}`` (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_arm(setup: str, target: float, arm: str, pruned: str, epochs: int, overrides: dict[str, Any],
            tag: str) -> dict[str, Any]:
    """Fine-tune one arm (in a worker process) and evaluate its best.pt."""
    import yolo_prune as yp

    data, teacher, images = setup_paths(setup)
    cfg = SETUPS[setup]
    kw = arm_kwargs(arm, teacher, images)
    recipe = {**cfg["recipe"], **overrides}
    t0 = time.perf_counter()
    r = yp.finetune(pruned, data, epochs=epochs, imgsz=cfg["imgsz"], project=WORK / "runs" / setup,
                    name=f"T{target}_{arm}_F{epochs}{tag}", exist_ok=True, **recipe, **kw)
    train_s = time.perf_counter() - t0
    v = yp.validate(r.best or r.last, data, imgsz=cfg["imgsz"])
    return {"setup": setup, "target_macs": target, "arm": arm, "epochs": epochs, "options": kw, "recipe": recipe,
            "variant": tag.lstrip("_") or None,
            "map50_95": v.map50_95, "map50": v.map50, "train_seconds": train_s, "checkpoint": str(r.best or r.last),
            "final_losses": last_losses(r.save_dir / "results.csv")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, prog="python -m bench.distill")
    ap.add_argument("--quick", action="store_true", help="fixture, target 0.7, arms none and output, F=1")
    ap.add_argument("--setups", nargs="+", default=["fixture"], choices=list(SETUPS))
    ap.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--epochs", type=int, default=10, help="fine-tune epochs F (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="arms trained at once (default %(default)s)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override recipe keys in every arm (a variant: its rows are keyed apart), e.g. lr0=0.001")
    ap.add_argument("--name", help="result name (default distill / distill_quick)")
    ap.add_argument("--resume", action="store_true", help="keep the rows of an existing result, run the missing ones")
    args = ap.parse_args(argv)
    if args.quick:
        args.setups, args.targets, args.arms, args.epochs = ["fixture"], [0.7], ["none", "output"], 1
    name = args.name or ("distill_quick" if args.quick else "distill")
    overrides = parse_set(args.set)
    tag = "".join(f"_{k}={v}" for k, v in sorted(overrides.items()))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import yolo_prune as yp

    old = common.read_result(name) if args.resume else None
    payload: dict[str, Any] = old or {"benchmark": "distill", "rows": {}, "setups": {}}
    started = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    payload.update(command=common.command_line(), machine=common.machine(),
                   busy_processes_at_start=common.busy_processes(), started=payload.get("started") or started)
    payload.setdefault("invocations", []).append({"command": common.command_line(), "started": started,
                                                  "loadavg_start": payload["machine"]["loadavg_start"],
                                                  "busy_processes_at_start": payload["busy_processes_at_start"]})
    t_start = time.perf_counter()
    total0 = payload.get("total_seconds") or 0.0

    def save() -> None:
        payload["total_seconds"] = total0 + time.perf_counter() - t_start
        common.write_result(name, payload)

    jobs = []
    for setup in args.setups:
        data, teacher, _ = setup_paths(setup)
        cfg = SETUPS[setup]
        info = payload["setups"].setdefault(setup, {"imgsz": cfg["imgsz"], "recipe": cfg["recipe"], "data": str(data),
                                                    "teacher": str(teacher), "targets": {}})
        if "dense" not in info:
            v = yp.validate(teacher, data, imgsz=cfg["imgsz"])
            info["dense"] = {"map50_95": v.map50_95, "map50": v.map50}
            print(f"{setup} dense: {v.map50_95:.4f}", flush=True)
        for target in args.targets:
            key = str(target)
            t = info["targets"].get(key)
            if t is None:
                pr = yp.prune(str(teacher), method="bn", target_macs=target, data=data, imgsz=cfg["imgsz"],
                              project=WORK / "prune" / setup, name=f"bn_{target}", exist_ok=True)
                v = yp.validate(pr.checkpoint, data, imgsz=cfg["imgsz"])
                t = info["targets"][key] = {"checkpoint": str(pr.checkpoint), "macs_ratio": pr.macs_ratio,
                                            "map50_95_pruned": v.map50_95, "map50_pruned": v.map50,
                                            "prune_seconds": pr.seconds}
                print(f"{setup} T={target}: pruned {pr.macs_ratio:.3f} MACs, mAP {v.map50_95:.4f}", flush=True)
                save()
            for arm in args.arms:
                row_key = f"{setup}@{target}/{arm}/F{args.epochs}{tag}"
                if row_key not in payload["rows"]:
                    jobs.append((row_key, setup, target, arm, str(common.resolve(t["checkpoint"]))))
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that already ran torch threads
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx, initializer=_init_worker) as pool:
        futures = {pool.submit(run_arm, setup, target, arm, ckpt, args.epochs, overrides, tag): key
                   for key, setup, target, arm, ckpt in jobs}
        for fut in as_completed(futures):
            key = futures[fut]
            try:
                row = fut.result()
            except Exception as e:  # a failed arm is a finding too
                row = {"error": f"{type(e).__name__}: {e}"}
            row["command"] = common.command_line()
            payload["rows"][key] = row
            save()
            print(f"{key}: " + (f"mAP50-95 {row['map50_95']:.4f} ({row['train_seconds'] / 60:.1f} min)"
                                if "error" not in row else row["error"]), flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
