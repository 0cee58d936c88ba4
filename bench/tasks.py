"""Segmentation, pose and OBB models pruned to half their MACs, against the dense model at an equal budget (issue 22).

For each task model (default ``yolo11n-seg``, ``yolo11n-pose``, ``yolo11n-obb``; the YOLO26 counterparts can be added
with ``--models``):

1. **dense**: trained from its yaml (random init, ``D`` epochs, the CPU recipe of ``bench/families.py``) on the
   generated data of its task (``make_synthetic(task=...)``; segment in its COCO form, so masks are scored by
   COCOeval ``segm``), once, cached in ``bench/work/tasks/dense``;
2. **pipeline**: ``yolo_prune.pipeline(dense, target_macs=0.5, sparse_epochs=0, finetune_epochs=F)`` with the
   pipeline's defaults otherwise (prune, distilled fine-tune from the dense model, COCO val);
3. **dense + F**: the dense model fine-tuned ``F`` more epochs with the same recipe: the reference at an EQUAL
   training budget;
4. **latency @640**: onnxruntime, dense vs pruned, one interleaved run (batch 1, 1 thread), as ``bench.families``.

Every mAP is yolo-prune's validation (``yolo_prune.evaluate``) of ``last.pt`` on the val split: the box mAP50-95
(COCOeval; an oriented box by its axis-aligned extent) and the task's own (mask: COCOeval segm; pose: ultralytics'
OKS mAP; obb: ultralytics' rotated-IoU mAP). Also recorded: params and GMACs before/after and the widths of the task
head before/after: ``Proto`` (cv1 / upsample / cv2 / cv3 out channels) and the hidden convs of every ``cv4`` branch.

``--quick``: tiny data and 2 + 1 epochs, to check the script end to end (numbers meaningless).
``--estimate``: time one training epoch of each model and print the estimated total, then stop.

Results: ``bench/results/tasks[_quick].json`` (rewritten after every step; ``--resume`` skips finished steps),
table with ``python -m bench.render`` (block ``tasks``). Work files: ``bench/work/tasks``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from bench import common

MODELS = {"yolo11n-seg": ("yolo11n-seg.yaml", "segment"), "yolo11n-pose": ("yolo11n-pose.yaml", "pose"),
          "yolo11n-obb": ("yolo11n-obb.yaml", "obb"), "yolo26n-seg": ("yolo26n-seg.yaml", "segment"),
          "yolo26n-pose": ("yolo26n-pose.yaml", "pose"), "yolo26n-obb": ("yolo26n-obb.yaml", "obb")}
TASK_METRIC = {"segment": "mask", "pose": "pose", "obb": "obb"}
# the families bench's recipe (bench/families.py): one optimizer step per batch of 16, mosaic off, no val in training
COMMON_TRAIN = {"batch": 16, "nbs": 16, "mosaic": 0.0, "val": False, "plots": False}
RECIPE = {"optimizer": "AdamW", "lr0": 0.003, "warmup_epochs": 1}
FULL = {"n_train": 96, "n_val": 32, "data_imgsz": 160, "imgsz": 128, "dense_epochs": 25, "finetune_epochs": 10}
QUICK = {"n_train": 16, "n_val": 8, "data_imgsz": 96, "imgsz": 64, "dense_epochs": 2, "finetune_epochs": 1}
WORK = common.WORK / "tasks"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dataset(task: str, cfg: dict[str, Any]) -> Path:
    """The generated data of ``task``: segment in its COCO form (masks by COCOeval segm), pose/obb in YOLO form."""
    from yolo_prune.data.synthetic import make_synthetic

    root = make_synthetic(common.WORK / "data" / f"synthetic_{task}_{cfg['n_train']}_{cfg['n_val']}_{cfg['data_imgsz']}",
                          n_train=cfg["n_train"], n_val=cfg["n_val"], imgsz=cfg["data_imgsz"], seed=0, task=task)
    coco = Path(root) / "coco.yaml"
    return coco if coco.is_file() else Path(root) / "yolo.yaml"


def evaluate_maps(model: Any, data: Path, imgsz: int) -> dict[str, float | None]:
    """Box and task mAPs (``map50_95``, ``mask_map50_95``...) of ``model`` on ``data``'s val split."""
    from yolo_prune.evaluate import evaluate
    from yolo_prune.stages.report import val_maps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = evaluate(model, data, imgsz=imgsz, batch=16)
    return {k: (None if x is None else round(x, 5)) for k, x in val_maps(v).items()}


def _out(m: Any) -> int:
    conv = getattr(m, "conv", m)  # an ultralytics Conv, or a plain nn.Conv2d / ConvTranspose2d
    return int(conv.out_channels)


def head_widths(model: Any) -> dict[str, Any]:
    """The task head's prunable widths: ``Proto`` (cv1 / upsample / cv2 / cv3 out channels) and, per ``cv4`` branch,
    the out channels of its hidden convs (the last 1x1 conv's outputs are the masks / keypoints / angle: fixed)."""
    from yolo_prune.forms import PRUNABLE_TASKS, as_detection_model

    head = as_detection_model(model, tasks=PRUNABLE_TASKS).model[-1]
    out: dict[str, Any] = {"head": type(head).__name__}
    proto = getattr(head, "proto", None)
    if proto is not None:
        out["proto"] = {k: _out(getattr(proto, k)) for k in ("cv1", "upsample", "cv2", "cv3") if hasattr(proto, k)}
    if hasattr(head, "cv4"):
        out["cv4"] = [[_out(m) for m in branch if hasattr(m, "conv")] for branch in head.cv4]
    return out


def train_dense(key: str, data: Path, cfg: dict[str, Any], workers: int) -> tuple[Path, float]:
    """Train ``key`` from its yaml (cached); return last.pt and the training seconds."""
    from yolo_prune.train import finetune

    folder = WORK / "dense" / f"{key}_{cfg['n_train']}_e{cfg['dense_epochs']}_{cfg['imgsz']}"
    ckpt, meta = folder / "weights" / "last.pt", folder / "bench_meta.json"
    if ckpt.is_file() and meta.is_file():
        return ckpt, json.loads(meta.read_text())["seconds"]
    t0 = time.perf_counter()
    finetune(MODELS[key][0], data, epochs=cfg["dense_epochs"], imgsz=cfg["imgsz"], project=folder.parent,
             name=folder.name, exist_ok=True, seed=0, workers=workers, **{**COMMON_TRAIN, **RECIPE})
    seconds = time.perf_counter() - t0
    meta.write_text(json.dumps({"seconds": seconds}))
    return ckpt, seconds


def estimate(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    """Time one from-scratch training epoch per model; print the estimated cost of a full run."""
    from yolo_prune.train import finetune

    total, epochs = 0.0, cfg["dense_epochs"] + 2 * cfg["finetune_epochs"]
    for key in args.models:
        data = dataset(MODELS[key][1], cfg)
        t0 = time.perf_counter()
        finetune(MODELS[key][0], data, epochs=1, imgsz=cfg["imgsz"], project=WORK / "estimate", name=key,
                 exist_ok=True, seed=0, workers=args.workers, **{**COMMON_TRAIN, **RECIPE})
        sec = time.perf_counter() - t0
        total += sec * epochs
        log(f"{key} @{cfg['imgsz']}: one epoch (with setup) {sec:.0f} s; {epochs} epochs -> ~{sec * epochs / 60:.0f} min")
    log(f"estimated total (training only, no evaluation/latency): ~{total / 60:.0f} min")
    return 0


def finetune_recipe(cfg: dict[str, Any]) -> dict[str, Any]:
    """The recipe of the pipeline's fine-tune and of the dense reference: the dense recipe, ``lr0`` overridden by
    ``--finetune-lr0``."""
    return {**RECIPE, **({"lr0": cfg["finetune_lr0"]} if cfg.get("finetune_lr0") else {})}


def _pipeline_row(dense: Path, data: Path, cfg: dict[str, Any], folder: Path, args: argparse.Namespace) -> dict:
    """Run the pipeline (target_macs 0.5, no sparse stage, F fine-tune epochs) and summarise its report."""
    from yolo_prune.job import pipeline

    t0 = time.perf_counter()
    again = args.resume and (folder / "pipeline.json").is_file()
    if folder.exists() and not again:  # pipeline() would reuse the stages recorded there
        shutil.rmtree(folder)
    train_args = {**COMMON_TRAIN, **finetune_recipe(cfg)}
    train_args.pop("batch")
    p = pipeline(dense, data, target_macs=0.5, sparse_epochs=0, finetune_epochs=cfg["finetune_epochs"],
                 imgsz=cfg["imgsz"], batch=COMMON_TRAIN["batch"], workers=args.workers, seed=0, bench=False,
                 project=folder.parent, name=folder.name, exist_ok=True, resume=again, train_args=train_args)
    st = json.loads((p.save_dir / "report.json").read_text())["stages"]
    step = next(r for r in st["prune"]["steps"] if r["step"] == st["prune"]["kept_step"])
    first = st["prune"]["steps"][0]
    return {"seconds": round(time.perf_counter() - t0, 1), "save_dir": str(p.save_dir), "final": str(p.final),
            "steps": len(st["prune"]["steps"]), "params": st["val"]["params"], "macs": st["val"]["macs"],
            "macs_ratio": st["val"]["macs"] / st["baseline"]["macs"],
            "params_ratio": st["val"]["params"] / st["baseline"]["params"],
            "prune_seconds": round(sum(r["prune_seconds"] for r in st["prune"]["steps"]), 2),
            "pruned": {k.removesuffix("_pruned"): v for k, v in first.items() if k.endswith("_pruned")},
            "pruned_kept_step": {k.removesuffix("_pruned"): v for k, v in step.items() if k.endswith("_pruned")},
            "final_maps": {k: v for k, v in st["val"].items() if k.endswith(("map50_95", "map50"))}}


def run_model(key: str, res: dict[str, Any], cfg: dict[str, Any], args: argparse.Namespace, save: Any) -> None:
    """Every step of one model (dense, pipeline, dense + F, latency @640); finished steps are kept."""
    from yolo_prune.bench import measure_latency
    from yolo_prune.stats import model_stats
    from yolo_prune.train import finetune

    task, imgsz, F = MODELS[key][1], cfg["imgsz"], cfg["finetune_epochs"]
    data = dataset(task, cfg)
    row = res["models"].setdefault(key, {"task": task, "data": str(data)})
    work = WORK / "runs" / res["name"]
    log(f"{key}: dense model ({cfg['dense_epochs']} epochs from {MODELS[key][0]}, cached)")
    dense, dense_sec = train_dense(key, data, cfg, args.workers)
    if "dense" not in row:
        st = model_stats(dense, imgsz=imgsz)
        row["dense"] = {"checkpoint": str(dense), "train_seconds": round(dense_sec, 1), "params": st.params,
                        "macs": st.macs, **evaluate_maps(dense, data, imgsz)}
        save()
    log(f"{key}: dense box mAP50-95 {row['dense']['map50_95']:.4f}, {row['dense']['macs'] / 1e9:.3f} GMACs")
    if "pipeline" not in row:
        log(f"{key}: pipeline target_macs=0.5, 0 sparse + {F} fine-tune epochs")
        row["pipeline"] = _pipeline_row(dense, data, cfg, work / f"{key}_pipeline", args)
        row["widths"] = {"dense": head_widths(dense), "pruned": head_widths(common.resolve(row["pipeline"]["final"]))}
        save()
    pr = row["pipeline"]
    log(f"{key}: MACs {pr['macs_ratio']:.3f}, box mAP50-95 {pr['pruned']['map50_95']:.4f} after pruning -> "
        f"{pr['final_maps']['map50_95']:.4f} after fine-tune")
    if "dense_ft" not in row and not args.skip_reference:
        log(f"{key}: dense reference, {F} more epochs")
        t0 = time.perf_counter()
        r = finetune(dense, data, epochs=F, project=work, name=f"{key}_dense_ft", exist_ok=True, imgsz=imgsz, seed=0,
                     workers=args.workers, **{**COMMON_TRAIN, **finetune_recipe(cfg)})
        row["dense_ft"] = {"seconds": round(time.perf_counter() - t0, 1), "checkpoint": str(r.last),
                           **evaluate_maps(r.last, data, imgsz)}
        save()
    if "latency640" not in row and args.runs > 0:
        log(f"{key}: onnxruntime latency @640, dense vs pruned (interleaved)")
        lat = measure_latency({"dense": dense, "pruned": str(common.resolve(pr["final"]))}, imgsz=640,
                              backends=("onnx",), runs=args.runs, warmup=max(2, args.runs // 5), threads=1,
                              progress=False)
        med = {e["model"]: e["median_ms"] for e in lat.to_dict()["entries"]}
        row["latency640"] = {"dense_ms": med["dense"], "pruned_ms": med["pruned"],
                             "ratio": med["pruned"] / med["dense"], "runs": args.runs, "threads": 1}
        save()


def run(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    name = args.name or ("tasks_quick" if args.quick else "tasks")
    old = common.read_result(name) if args.resume else None
    res = old or {"models": {}}
    before = (old or {}).get("total_seconds", 0)  # the time of the earlier runs this one resumes
    if old and "runs" not in old:  # a result written before runs were recorded one by one
        old["runs"] = [{"command": old.get("command"), "started": old.get("started"), "models": list(old["models"]),
                        "loadavg_start": old.get("machine", {}).get("loadavg_start"), "seconds": before}]
    this_run = {"command": common.command_line(), "started": time.strftime("%Y-%m-%d %H:%M"), "models": args.models,
                "loadavg_start": list(os.getloadavg())}
    res.setdefault("runs", []).append(this_run)
    res.update(name=name, command=common.command_line(), machine=common.machine(),
               busy_processes_at_start=common.busy_processes(), started=time.strftime("%Y-%m-%d %H:%M"),
               quick=args.quick, complete=False, recipe={**COMMON_TRAIN, **RECIPE}, config=cfg,
               threads=os.environ.get("OMP_NUM_THREADS"))
    t_all = time.perf_counter()

    def save() -> None:
        res["total_seconds"] = round(time.perf_counter() - t_all + before, 1)
        res["loadavg_now"] = list(os.getloadavg())
        common.write_result(name, res)

    for key in args.models:
        run_model(key, res, cfg, args, save)
    res["complete"] = True
    this_run["seconds"] = round(time.perf_counter() - t_all, 1)
    save()
    log(f"done: bench/results/{name}.json ({res['total_seconds'] / 60:.1f} min); render with python -m bench.render")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
                                     prog="python -m bench.tasks")
    parser.add_argument("--quick", action="store_true", help="16 train / 8 val images, 2 dense + 1 epochs at imgsz 64")
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=["yolo11n-seg", "yolo11n-pose", "yolo11n-obb"])
    parser.add_argument("--imgsz", type=int, help=f"training/val image size (default {FULL['imgsz']})")
    parser.add_argument("--dense-epochs", dest="dense_epochs", type=int, help=f"D (default {FULL['dense_epochs']})")
    parser.add_argument("--finetune-epochs", dest="finetune_epochs", type=int,
                        help=f"F (default {FULL['finetune_epochs']})")
    parser.add_argument("--finetune-lr0", dest="finetune_lr0", type=float,
                        help=f"lr0 of the pipeline's fine-tune and of the reference (default the dense {RECIPE['lr0']})")
    parser.add_argument("--runs", type=int, default=30, help="latency runs per model @640 (0: none)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-reference", action="store_true", help="no dense + F reference run")
    parser.add_argument("--estimate", action="store_true", help="time one epoch per model, print the cost")
    parser.add_argument("--name", help="result name (default tasks / tasks_quick)")
    parser.add_argument("--resume", action="store_true", help="keep finished steps of an earlier run of the same name")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("imgsz", "dense_epochs", "finetune_epochs", "finetune_lr0"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.quick:
        args.runs = min(args.runs, 5)
    logging.getLogger("ultralytics").setLevel(logging.WARNING)
    return estimate(args, cfg) if args.estimate else run(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
