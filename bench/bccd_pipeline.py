#!/usr/bin/env python
"""The realistic case of issue 12: the bccd-tuned yolov8n through ``yolo_prune.job`` with its defaults.

``--dataset fixture`` runs the same arms on the COCO yolov8n fixture and coco128 (96 train / 32 val, imgsz 320;
results in ``bench/results/fixture_pipeline.json``): the 80-class case of issue 24, where one-shot pruning collapses.
``--dataset bccd_e3`` starts from an under-trained user model instead: the fixture fine-tuned only 3 epochs on bccd
(``common.bccd_dense(epochs=3)``; results in ``bench/results/undertrained_pipeline.json``).

Start: ``common.bccd_dense()`` (the fixture COCO yolov8n fine-tuned 12 epochs on bccd train @416, val mAP50-95
0.617). Each arm runs ``yolo_prune.job(dense, bccd, target_macs=T, imgsz=416, ...)`` with the pipeline's
defaults unless ``--set key=value`` overrides them, and records mAP50-95 of the dense model, right after pruning
and after the fine-tune (the pipeline's own COCO evaluation on bccd val), MACs and the training budget. The
reference for "mAP kept" is the dense model trained the same number of extra epochs (``--reference``).

    python -m bench.bccd_pipeline --arm defaults_s6_f10 --set sparse_epochs=6 finetune_epochs=10
    python -m bench.bccd_pipeline --arm prune_first_f16 --set sparse_epochs=0 finetune_epochs=16
    python -m bench.bccd_pipeline --reference 16          # dense + 16 epochs, same recipe
    python -m bench.bccd_pipeline --arm prune_first_f16_nbs16 --set sparse_epochs=0 finetune_epochs=16 "train_args={nbs: 16}"
    python -m bench.bccd_pipeline --reference 16 --set nbs=16   # its reference: the same train keys
    python -m bench.bccd_pipeline --dataset fixture --reference 16 --set nbs=16
    python -m bench.bccd_pipeline --dataset fixture --arm auto_f16 --set sparse_epochs=0 finetune_epochs=16 steps=auto "train_args={nbs: 16}"

Results: ``bench/results/bccd_pipeline.json`` (one entry per arm; the command of each is recorded).
``bench/results/bccd_pipeline_e12b.json``: the same for the bccd model as ``common.bccd_dense()`` trains it since
``nbs=batch`` became the training default (val 0.631; the runs in ``bccd_pipeline.json`` started from a model trained
with ``nbs=64``, val 0.617, no longer kept):

    python -m bench.bccd_pipeline --results bccd_pipeline_e12b --reference 16 --set nbs=16
    python -m bench.bccd_pipeline --results bccd_pipeline_e12b --arm portable_f16_nbs16 --set sparse_epochs=0 finetune_epochs=16 "train_args={nbs: 16}"
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench import common

IMGSZ = 416
NAME = "bccd_pipeline"


def _value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 prog="python -m bench.bccd_pipeline")
    ap.add_argument("--arm", help="name of this pipeline arm")
    ap.add_argument("--target", type=float, default=0.5, help="target_macs (default %(default)s)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="pipeline() keyword overrides")
    ap.add_argument("--reference", type=int, metavar="EPOCHS", help="train the dense model EPOCHS more instead")
    ap.add_argument("--reuse", action="store_true", help="--reference: evaluate an existing training of it again")
    ap.add_argument("--dataset", choices=("bccd", "bccd_e3", "fixture"), default="bccd",
                    help="bccd (the bccd-tuned model @416), bccd_e3 (the same tuned 3 epochs only) or fixture "
                         "(COCO yolov8n on coco128 96/32 @320)")
    ap.add_argument("--results", metavar="NAME", help="write bench/results/NAME.json (and work in bench/work/NAME) "
                    "instead of the dataset's default: runs from another dense model than the recorded ones")
    args = ap.parse_args(argv)
    global IMGSZ, NAME
    if args.dataset == "fixture":
        IMGSZ, NAME = 320, "fixture_pipeline"
    elif args.dataset == "bccd_e3":
        NAME = "undertrained_pipeline"
    NAME = args.results or NAME
    if not args.arm and args.reference is None:
        ap.error("give --arm NAME or --reference EPOCHS")

    import yolo_prune as yp

    if args.dataset == "fixture":
        dense, data = common.WEIGHTS, common.coco128_split()
    else:
        dense, data = common.bccd_dense(epochs=3 if args.dataset == "bccd_e3" else 12), common.bccd()
    res = common.read_result(NAME) or {"arms": {}}
    work = common.WORK / NAME
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"command": common.command_line(), "started": time.strftime("%Y-%m-%d %H:%M"),
                             "machine": common.machine(), "busy_processes_at_start": common.busy_processes()}
    overrides = {k: _value(v) for k, v in (p.partition("=")[::2] for p in args.set)}
    if args.reference is not None:  # --set keys go to finetune (ultralytics train keys), e.g. nbs=16
        key = f"dense_plus_{args.reference}" + "".join(f"_{k}{v}" for k, v in overrides.items())
        last = work / key / "weights" / "last.pt"
        if not (args.reuse and last.is_file()):
            last = yp.finetune(str(dense), data, epochs=args.reference, imgsz=IMGSZ, project=work, name=key,
                               exist_ok=True, val=False, **overrides).last
        v = yp.validate(last, data, imgsz=IMGSZ)
        entry.update(epochs=args.reference, overrides=overrides, map50_95=v.map50_95, map50=v.map50)
    else:
        key = args.arm
        p = yp.pipeline(str(dense), data, target_macs=args.target, imgsz=IMGSZ, project=work, name=key,
                        exist_ok=True, backends=("onnx",), bench_runs=20, **overrides)
        report = json.loads((p.save_dir / "report.json").read_text())
        prune_steps = report["stages"]["prune"]["steps"]
        rows = {r["metric"]: r for r in report["table"]}
        entry.update(target_macs=args.target, overrides=overrides, report=str(p.save_dir / "report.md"),
                     table=report["table"], args=report["args"], sparse_free_macs=report.get("sparse_free_macs"),
                     map50_95_dense=rows["mAP50-95"]["before"], map50_95=rows["mAP50-95"]["after"],
                     map50_95_pruned=prune_steps[-1].get("map50_95_pruned"),
                     macs_ratio=prune_steps[-1].get("macs_fraction"), plan=_plan(report),
                     warning=report.get("warning"),
                     epochs=(report["args"]["sparse_epochs"] + report["args"]["finetune_epochs"]))
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    res = common.read_result(NAME) or {"arms": {}}  # again: arms may run in parallel processes
    res["arms"][key] = entry
    path = common.write_result(NAME, res)
    print(f"{key}: written to {path}")
    return 0


def _plan(report: dict[str, Any]) -> dict[str, Any] | None:
    """What ``steps=auto`` chose (the trial's share of mAP kept, steps, epochs per step and at the end)."""
    plan = report["stages"].get("plan")
    return None if plan is None else {k: plan[k] for k in ("retained", "steps", "step_epochs", "finetune_epochs")}


if __name__ == "__main__":
    raise SystemExit(main())
