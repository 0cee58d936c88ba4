#!/usr/bin/env python
"""Does sparsity training free channels, and do they come out for free? (issue 11)

For each condition: sparsity-train the start model (``yolo_prune.sparse_train``), take ``last.pt``, then
remove every channel whose coupled gammas are all below ``gamma_threshold`` (``yolo_prune.prune(...,
threshold=T, target_macs=None)``, constants folded into the consumers) and evaluate it with no fine-tuning.
Columns: COCO mAP50-95 after the sparse stage, fraction of gammas exactly 0, MACs removable for free, mAP
after removing them, and the largest change of the raw head outputs (interior cells, >= 3 from the border,
and everywhere) on calibration images.

Data: ``fixture`` = the coco128 split (96 train / 32 val) at imgsz 320 from the fixture yolov8n;
``bccd`` = bccd train / val at imgsz 416 from ``common.bccd_dense()`` (the fixture yolov8n fine-tuned on bccd).
Every condition trains with batch 16 and nbs 16 (one optimizer step per batch; ultralytics' nbs=64 would
leave 3 steps per epoch on bccd) and caches its result in ``bench/work/sparsity/<data>/<condition>/``, so
conditions can run in separate processes and ``--collect`` assembles ``bench/results/sparsity_<data>.json``.

    python -m bench.sparsity --data fixture                      # every fixture condition
    python -m bench.sparsity --data bccd --conditions adamw_group_sr0.3,sgd_greg
    python -m bench.sparsity --data bccd --collect               # assemble the JSON from the cached runs
    python -m bench.sparsity --quick                             # 2 tiny conditions on the fixture, 2 epochs
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path
from typing import Any

from bench import common

WORK = common.WORK / "sparsity"

# name -> (label, sparse_train options). optimizer=auto is AdamW for runs this short (ultralytics' rule).
_ADAMW = {"optimizer": "auto"}
# SGD: ultralytics' warmup_bias_lr=0.1 would first throw the biases of an already trained model around
_SGD = {"optimizer": "SGD", "lr0": 0.01, "warmup_bias_lr": 0.0}


def _c(label: str, **opts: Any) -> tuple[str, dict[str, Any]]:
    return label, opts


CONDITIONS: dict[str, tuple[str, dict[str, Any]]] = {
    # controls
    "adamw_sr0": _c("AdamW, no penalty (sr=0)", sr_mode="proximal", sr=0.0, **_ADAMW),
    "sgd_sr0": _c("SGD, no penalty (sr=0)", sr_mode="proximal", sr=0.0, **_SGD),
    "adamw_subgrad": _c("AdamW, subgradient L1 sr=1e-3 (old default)", sr_mode="subgradient", sr=1e-3, **_ADAMW),
    # proximal L1, per BN
    "adamw_bn_sr0.3": _c("AdamW, proximal per-BN sr=0.3", sr_mode="proximal", sr=0.3, **_ADAMW),
    "adamw_bn_sr1": _c("AdamW, proximal per-BN sr=1", sr_mode="proximal", sr=1.0, **_ADAMW),
    "adamw_bn_sr3": _c("AdamW, proximal per-BN sr=3", sr_mode="proximal", sr=3.0, **_ADAMW),
    "sgd_bn_sr0.1": _c("SGD, proximal per-BN sr=0.1", sr_mode="proximal", sr=0.1, **_SGD),
    "sgd_bn_sr0.3": _c("SGD, proximal per-BN sr=0.3", sr_mode="proximal", sr=0.3, **_SGD),
    # proximal, group
    "adamw_group_sr0.3": _c("AdamW, proximal group sr=0.3", sr_mode="proximal", sr_group=True, sr=0.3, **_ADAMW),
    "adamw_group_sr1": _c("AdamW, proximal group sr=1", sr_mode="proximal", sr_group=True, sr=1.0, **_ADAMW),
    "adamw_group_sr3": _c("AdamW, proximal group sr=3", sr_mode="proximal", sr_group=True, sr=3.0, **_ADAMW),
    "adamw_group_sr6": _c("AdamW, proximal group sr=6", sr_mode="proximal", sr_group=True, sr=6.0, **_ADAMW),
    "adamw_group_sr1_ramp": _c("AdamW, proximal group sr=1, ramp", sr_mode="proximal", sr_group=True, sr=1.0,
                               sr_schedule="ramp", **_ADAMW),
    "adamw_group_sr1_nohead": _c("AdamW, proximal group sr=1, head not penalised", sr_mode="proximal",
                                 sr_group=True, sr=1.0, sr_head=False, **_ADAMW),
    "sgd_group_sr0.3": _c("SGD, proximal group sr=0.3", sr_mode="proximal", sr_group=True, sr=0.3, **_SGD),
    # greg toward 60% of the MACs
    "adamw_greg": _c("AdamW, greg target_macs=0.6", sr_mode="greg", sr=0.05, target_macs=0.6, **_ADAMW),
    "sgd_greg": _c("SGD, greg target_macs=0.6", sr_mode="greg", sr=0.05, target_macs=0.6, **_SGD),
    "adamw_greg_sr0.1_r0.3": _c("AdamW, greg target_macs=0.6, sr=0.1, ramp 0.3", sr_mode="greg", sr=0.1,
                                target_macs=0.6, greg_ramp=0.3, **_ADAMW),
    "adamw_greg_r0.2": _c("AdamW, greg target_macs=0.6, sr=0.2, ramp 0.2", sr_mode="greg", sr=0.2,
                          target_macs=0.6, greg_ramp=0.2, **_ADAMW),
    # the baseline greg must beat: prune to the same target at once (bn ranking, lstsq), then fine-tune as long
    "adamw_prune_ft": _c("AdamW, prune(bn, lstsq) to 0.6 at once, then fine-tune (baseline, no sparsity)",
                         prune_first=0.6, **_ADAMW),
    "adamw_greg_nohead": _c("AdamW, greg target_macs=0.6, head not penalised", sr_mode="greg", sr=0.05,
                            target_macs=0.6, sr_head=False, **_ADAMW),
}

DATASETS = {
    "fixture": {"imgsz": 320, "epochs": 10},
    "bccd": {"imgsz": 416, "epochs": 30},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dataset(name: str) -> tuple[Path, Path]:
    """(start checkpoint, data yaml)."""
    if name == "fixture":
        return common.WEIGHTS, common.coco128_split()
    best = common.WORK / "dense" / "bccd_e12_416" / "weights" / "best.pt"
    if not best.is_file():
        raise SystemExit(f"{best} is missing: the dense bccd model is trained by bench/common.py::bccd_dense()")
    return best, common.bccd()


def evaluate_map(model: Any, data: Path, imgsz: int) -> dict[str, float]:
    from yolo_prune.evaluate import evaluate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = evaluate(model, data, imgsz=imgsz, batch=16)
    return {"map50_95": round(v.map50_95, 5), "map50": round(v.map50, 5)}


MARGIN = 4  # "interior": cells at least this far from the border of each output level


def output_change(a: Any, b: Any, images: Any, margin: int = MARGIN) -> dict[str, float]:
    """Largest |change| of the raw head outputs between models ``a`` and ``b``: everywhere and >= ``margin`` cells
    from the border of each level."""
    from yolo_prune.pruning.threshold import output_change as change

    return {"max_abs_change": change(a, b, images), "max_abs_change_interior": change(a, b, images, margin=margin),
            "interior_margin": margin}


def measure_change(sparse_ckpt: Path, pruned_ckpt: Path, data: Path, imgsz: int) -> dict[str, float]:
    """:func:`output_change` between two checkpoints on 4 val images (seed 1)."""
    from yolo_prune.data import resolve_data
    from yolo_prune.models import load_model
    from yolo_prune.pruning.calibration import load_calibration_images

    images = load_calibration_images(resolve_data(data).val_images, n=4, imgsz=imgsz, seed=1)
    a = copy.deepcopy(load_model(sparse_ckpt).model).float().eval()
    b = copy.deepcopy(load_model(pruned_ckpt).model).float().eval()
    return output_change(a, b, images)


def run_condition(folder: Path, ds: str, name: str, epochs: int, imgsz: int, threshold: float,
                  extra: dict[str, Any]) -> dict:
    """Train, measure, remove the free channels, measure again; cached as ``folder/result.json``."""
    import torch

    import yolo_prune as yp

    cached = folder / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    label, opts = CONDITIONS[name]
    start, data = dataset(ds)
    opts = {**opts, **extra}
    log(f"{ds}/{name}: {label}, {epochs} epochs @{imgsz}")
    t0 = time.perf_counter()
    target = opts.pop("prune_first", None)
    if target is not None:  # baseline: prune at once, then the same training without penalty
        pre = yp.prune(str(start), method="bn", target_macs=target, data=str(data), imgsz=imgsz, project=folder,
                       name="pruned_first", exist_ok=True)
        start = pre.checkpoint
        pre_map = evaluate_map(start, data, imgsz)
        log(f"{ds}/{name}: pruned to {pre.macs_ratio:.3f} of the MACs first, mAP50-95 {pre_map['map50_95']:.4f} "
            "right after pruning")
        opts = {**opts, "sr_mode": "proximal", "sr": 0.0}
    res = yp.sparse_train(str(start), str(data), epochs=epochs, imgsz=imgsz, batch=16, nbs=16, workers=2, seed=0,
                          gamma_threshold=threshold, project=folder, name="train", exist_ok=True, **opts)
    train_s = time.perf_counter() - t0
    last = res.last
    sparse_map = evaluate_map(last, data, imgsz)
    log(f"{ds}/{name}: after sparse mAP50-95 {sparse_map['map50_95']:.4f}, zeros {res.gamma_zero_after:.3f}, "
        f"free MACs {res.free_macs_after:.3f}")
    t1 = time.perf_counter()
    pr = yp.prune(str(last), method="bn", target_macs=None, threshold=threshold, data=str(data), imgsz=imgsz,
                  project=folder, name="free", exist_ok=True)
    prune_s = time.perf_counter() - t1
    freed_map = evaluate_map(pr.checkpoint, data, imgsz)
    change = measure_change(last, pr.checkpoint, data, imgsz)
    curve = []
    csv = res.save_dir / "results.csv"
    if csv.is_file():
        import csv as csvlib

        with open(csv, newline="") as f:
            for r in csvlib.DictReader(f):
                r = {k.strip(): v for k, v in r.items()}
                curve.append({"epoch": int(float(r["epoch"])), "map50_95": float(r["metrics/mAP50-95(B)"]),
                              "free_macs": float(r.get("sparsity/free_macs") or "nan"),
                              "gamma_zero": float(r.get("sparsity/gamma_zero") or "nan")})
    out = {
        "name": name, "label": label, "options": opts, "epochs": epochs, "imgsz": imgsz, "threshold": threshold,
        "sparse": {"map": sparse_map, "gamma_zero": res.gamma_zero_after, "gamma_near_zero": res.gamma_near_zero_after,
                   "gamma_mean": res.gamma_mean_after, "free_macs": res.free_macs_after, "train_seconds": train_s,
                   "trainer_map50_95": res.map50_95},
        "freed": {"map": freed_map, "macs_ratio": pr.macs_ratio, "conv_macs_ratio": pr.macs_ratio_free,
                  "channels_removed": pr.channels_free, "params_ratio": pr.params_ratio, "prune_seconds": prune_s,
                  **change},
        "curve": curve,
        "torch_threads": torch.get_num_threads(),
    }
    if target is not None:
        out["freed"]["macs_ratio"] = pre.macs_ratio * pr.macs_ratio  # of the original model
        out["sparse"]["free_macs"] = 1 - pre.macs_ratio  # removed before training
        out["options"]["prune_first"] = target
        out["pruned_first"] = {"macs_ratio": pre.macs_ratio, "map": pre_map}
    log(f"{ds}/{name}: freed MACs ratio {pr.macs_ratio:.3f}, mAP50-95 {freed_map['map50_95']:.4f} "
        f"(interior change {change['max_abs_change_interior']:.2e}, border {change['max_abs_change']:.2e})")
    folder.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(out, indent=1, default=str))
    return out


def prune_compare(folder: Path, ds: str, imgsz: int, threshold: float, target: float) -> list[dict[str, Any]]:
    """Prune the condition's ``last.pt`` to ``target`` MACs with bn / l1 ranking, with and without removing the free
    channels first (``threshold``); mAP right after pruning (lstsq compensation, no fine-tuning). Cached."""
    import yolo_prune as yp

    cached = folder / f"prune_compare_{target}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    last = folder / "train" / "weights" / "last.pt"
    if not last.is_file():
        return []
    _, data = dataset(ds)
    out = []
    for method in ("bn", "l1"):
        for thr in (threshold, None):
            name = f"to{target}_{method}_{'free' if thr else 'rank'}"
            try:
                pr = yp.prune(str(last), method=method, target_macs=target, threshold=thr, data=str(data),
                              imgsz=imgsz, project=folder, name=name, exist_ok=True)
            except Exception as e:  # a target out of reach is a result too
                out.append({"method": method, "threshold": thr, "error": str(e)})
                continue
            out.append({"method": method, "threshold": thr, "macs_ratio": pr.macs_ratio,
                        "macs_ratio_free": pr.macs_ratio_free, "map": evaluate_map(pr.checkpoint, data, imgsz)})
            log(f"{folder.name} -> {target} {method} threshold={thr}: MACs {pr.macs_ratio:.3f} "
                f"mAP50-95 {out[-1]['map']['map50_95']:.4f}")
    cached.write_text(json.dumps(out, indent=1))
    return out


def dense_reference(folder: Path, ds: str, imgsz: int) -> dict[str, Any]:
    cached = folder / f"dense_{imgsz}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    start, data = dataset(ds)
    out = {"checkpoint": str(start), "map": evaluate_map(start, data, imgsz)}
    folder.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, prog="python -m bench.sparsity")
    ap.add_argument("--data", choices=list(DATASETS), default="fixture")
    ap.add_argument("--conditions", help=f"comma-separated subset of: {', '.join(CONDITIONS)}")
    ap.add_argument("--epochs", type=int, help="sparse-training epochs (default: fixture 10, bccd 30)")
    ap.add_argument("--imgsz", type=int, help="image size (default: fixture 320, bccd 416)")
    ap.add_argument("--threshold", type=float, default=0.01, help="gamma threshold (default %(default)s)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra sparse_train options")
    ap.add_argument("--quick", action="store_true", help="2 conditions, 2 epochs, imgsz 160, fixture")
    ap.add_argument("--collect", action="store_true", help="only assemble the JSON from cached conditions")
    ap.add_argument("--prune-target", type=float, action="append", default=[],
                    help="also prune each condition to this MACs fraction with and without taking the free channels "
                    "first (bn and l1 ranking, no fine-tuning); repeatable")
    ap.add_argument("--work", help="work sub-folder (default: <data>, or <data>_quick)")
    ap.add_argument("--name", help="result JSON name (default sparsity_<data>)")
    args = ap.parse_args(argv)
    if args.quick:
        args.data, args.epochs, args.imgsz = "fixture", args.epochs or 2, args.imgsz or 160
        args.conditions = args.conditions or "adamw_bn_sr3,adamw_greg"
    args.epochs = args.epochs or DATASETS[args.data]["epochs"]
    args.imgsz = args.imgsz or DATASETS[args.data]["imgsz"]
    names = args.conditions.split(",") if args.conditions else list(CONDITIONS)
    bad = [n for n in names if n not in CONDITIONS]
    if bad:
        raise SystemExit(f"unknown condition(s): {', '.join(bad)}")
    extra = {}
    for pair in args.set:
        import yaml

        k, _, v = pair.partition("=")
        extra[k] = yaml.safe_load(v)
    ds_key = args.work or (f"{args.data}_quick" if args.quick else args.data)
    meta = {"command": common.command_line(), "machine": common.machine(), "started": time.strftime("%Y-%m-%d %H:%M"),
            "busy_processes_at_start": common.busy_processes(), "epochs": args.epochs, "imgsz": args.imgsz,
            "threshold": args.threshold, "set": extra}
    work = WORK / ds_key
    if not args.collect:
        for n in names:
            run_condition(work / n, args.data, n, args.epochs, args.imgsz, args.threshold, extra)
    rows = []
    for n in names:
        path = work / n / "result.json"
        if not path.is_file():
            continue
        row = json.loads(path.read_text())
        row["prune_compare"] = {str(t): prune_compare(work / n, args.data, row["imgsz"], row["threshold"], t)
                                for t in args.prune_target}
        if row["freed"].get("interior_margin") != MARGIN:  # measured by an older version of this script
            row["freed"].update(measure_change(work / n / "train" / "weights" / "last.pt",
                                               work / n / "free" / "weights" / "pruned.pt", dataset(args.data)[1],
                                               row["imgsz"]))
            path.write_text(json.dumps(row, indent=1, default=str))
        rows.append(row)
    payload = {**meta, "data": args.data, "work": ds_key, "dense": dense_reference(work, args.data, args.imgsz),
               "rows": rows, "total_seconds": sum(r["sparse"]["train_seconds"] + r["freed"]["prune_seconds"]
                                                  for r in rows)}
    path = common.write_result(args.name or f"sparsity_{ds_key}", payload)
    log(f"wrote {path}")
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
