"""YOLO11 and YOLO26 pruned to half their MACs with the pipeline, against the dense model at an equal budget.

For each dataset and each family (default ``yolo11n``, ``yolo26n``; ``yolov8n`` can be added as the reference
family):

1. **dense**: the model is trained from its yaml (random init, ``D`` epochs, the CPU recipe of the dataset below),
   once, cached in ``bench/work/families_dense`` (not ``bench/work/dense``, which is shared);
2. **pipeline**: ``yolo_prune.job(dense, target_macs=0.5)``: ``S`` sparsity-training epochs, prune (bn,
   least-squares compensation), ``F`` fine-tune epochs, COCO val, torch / onnxruntime latency at the dataset's
   image size;
3. **dense + S+F**: the dense model fine-tuned for ``S + F`` more epochs with the same recipe: the reference at an
   EQUAL training budget (the pruned model trained ``S + F`` epochs more than the dense checkpoint too);
4. **latency @640**: onnxruntime, dense vs pruned, one interleaved run (batch 1, 1 thread), since the dataset's
   image size is small for a speed comparison.

mAP50-95 is yolo-prune's COCO evaluation (``yolo_prune.evaluate``) on the val split, of ``last.pt`` of every run
(training runs with ``val=False``, so ultralytics' ``best.pt`` is the last epoch as well). Also recorded: params and
GMACs before/after, pruning time, the widths of every attention block before/after (its outer channels and FFN
hidden width are prunable; ``qkv`` outputs, ``pe`` and ``proj`` inputs are not).

Datasets:

* ``synthetic``: ``make_synthetic(n_train=128, n_val=32, imgsz=256)`` (3 classes), imgsz 160;
* ``bccd``: ``../shared/fixtures/bccd`` (blood cells, 3 classes, 205 train / 87 val), through yolo-prune's COCO
  cache, imgsz 320 by default (expensive on this CPU: see ``--estimate``).

``--quick``: the synthetic dataset with few epochs, to check the script end to end (numbers meaningless).
``--estimate``: time one training epoch of each family on each dataset and print the estimated total, then stop.

Results: ``bench/results/families[_quick].json`` (rewritten after every step; ``--resume`` skips finished steps
and keeps the other datasets, so ``--datasets bccd --resume`` adds bccd to an existing synthetic run; each dataset
records every command that ran on it), tables with ``python -m bench.render``.
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

FAMILIES = {"yolo11n": "yolo11n.yaml", "yolo26n": "yolo26n.yaml", "yolov8n": "yolov8n.yaml"}

# ultralytics train keys shared by every training run. nbs=16: one optimizer step per batch of 16 (the nominal 64
# would mean 2-8 steps per epoch here); mosaic off; no val during training (yolo-prune evaluates last.pt).
COMMON_TRAIN = {"batch": 16, "nbs": 16, "mosaic": 0.0, "val": False, "plots": False}
# From random init on a CPU: AdamW at 3e-3 with one warmup epoch (the demo's and the frontier's recipe).
RECIPE = {"optimizer": "AdamW", "lr0": 0.003, "warmup_epochs": 1}
DATASETS: dict[str, dict[str, Any]] = {
    "synthetic": {"imgsz": 160, "dense_epochs": 30, "sparse_epochs": 5, "finetune_epochs": 10, "sr": 0.01},
    "bccd": {"imgsz": 320, "dense_epochs": 20, "sparse_epochs": 3, "finetune_epochs": 7, "sr": 0.01},
}
QUICK = {"imgsz": 128, "dense_epochs": 2, "sparse_epochs": 1, "finetune_epochs": 1, "sr": 0.01}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dataset(name: str, quick: bool) -> Path:
    if name == "bccd":
        return common.bccd()
    return common.synthetic(32, 16, 256) if quick else common.synthetic(128, 32, 256)


def evaluate_map(model: Any, data: Path, imgsz: int) -> dict[str, float]:
    from yolo_prune.evaluate import evaluate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = evaluate(model, data, imgsz=imgsz, batch=16)
    return {"map50_95": round(v.map50_95, 5), "map50": round(v.map50, 5)}


def attention_widths(model: Any) -> list[dict[str, Any]]:
    """Every attention block: outer channels (qkv inputs = proj outputs), FFN hidden width, inner widths."""
    from ultralytics.nn.modules.block import Attention, PSABlock

    from yolo_prune.forms import as_detection_model

    module = as_detection_model(model)
    rows = []
    for name, m in module.named_modules():
        if isinstance(m, PSABlock):
            a: Attention = m.attn
            rows.append({"block": name, "outer": a.qkv.conv.in_channels, "ffn_hidden": m.ffn[0].conv.out_channels,
                         "qkv_out": a.qkv.conv.out_channels, "pe": a.pe.conv.out_channels,
                         "proj_in": a.proj.conv.in_channels, "heads": a.num_heads, "key_dim": a.key_dim,
                         "head_dim": a.head_dim})
    return rows


def train_dense(family: str, data: Path, cfg: dict[str, Any], workers: int) -> tuple[Path, float]:
    """Train ``family`` from its yaml (cached); return last.pt and the training seconds."""
    from yolo_prune.train import finetune

    folder = common.WORK / "families_dense" / f"families_{data.parent.name}_{family}_e{cfg['dense_epochs']}_{cfg['imgsz']}"
    ckpt, meta = folder / "weights" / "last.pt", folder / "bench_meta.json"
    if ckpt.is_file() and meta.is_file():
        return ckpt, json.loads(meta.read_text())["seconds"]
    t0 = time.perf_counter()
    finetune(FAMILIES[family], data, epochs=cfg["dense_epochs"], imgsz=cfg["imgsz"], project=folder.parent,
             name=folder.name, exist_ok=True, seed=0, workers=workers, **{**COMMON_TRAIN, **RECIPE})
    seconds = time.perf_counter() - t0
    meta.write_text(json.dumps({"seconds": seconds}))
    return ckpt, seconds


def estimate(args: argparse.Namespace) -> int:
    """Time one from-scratch training epoch per family and dataset; print the estimated cost of a full run."""
    from yolo_prune.train import finetune

    total = 0.0
    for ds in args.datasets:
        cfg = dict(DATASETS[ds], **({"imgsz": args.imgsz} if args.imgsz else {}))
        data = dataset(ds, False)
        epochs = cfg["dense_epochs"] + 2 * (cfg["sparse_epochs"] + cfg["finetune_epochs"])
        for fam in args.families:
            t0 = time.perf_counter()
            finetune(FAMILIES[fam], data, epochs=1, imgsz=cfg["imgsz"], project=common.WORK / "runs" / "families_est",
                     name=f"{ds}_{fam}", exist_ok=True, seed=0, workers=args.workers, **{**COMMON_TRAIN, **RECIPE})
            sec = time.perf_counter() - t0
            total += sec * epochs
            log(f"{ds} {fam} @{cfg['imgsz']}: one epoch (with setup and final val) {sec:.0f} s; "
                f"{epochs} epochs -> ~{sec * epochs / 60:.0f} min")
    log(f"estimated total (training only, no evaluation/latency): ~{total / 60:.0f} min")
    return 0


def run(args: argparse.Namespace) -> int:
    from yolo_prune.bench import measure_latency
    from yolo_prune.job import pipeline
    from yolo_prune.stats import model_stats
    from yolo_prune.train import finetune

    name = args.name or ("families_quick" if args.quick else "families")
    old = common.read_result(name) if args.resume else None
    res = old or {"datasets": {}}
    for ds in res["datasets"].values():  # a run made before datasets recorded their own commands
        if "runs" not in ds and "command" in res:
            ds["runs"] = [{"command": res["command"], "started": res.get("started"),
                           "loadavg_start": res.get("machine", {}).get("loadavg_start"),
                           "seconds": res.get("total_seconds")}]
    res.update(command=common.command_line(), machine=common.machine(), busy_processes_at_start=common.busy_processes(),
               started=time.strftime("%Y-%m-%d %H:%M"), quick=args.quick, complete=False,
               recipe={**COMMON_TRAIN, **RECIPE}, threads=os.environ.get("OMP_NUM_THREADS"))
    t_all = time.perf_counter()

    def save() -> None:
        res["total_seconds"] = round(time.perf_counter() - t_all + (old or {}).get("total_seconds", 0), 1)
        common.write_result(name, res)

    for ds in args.datasets:
        cfg = dict(QUICK if args.quick else DATASETS[ds])
        if args.imgsz:
            cfg["imgsz"] = args.imgsz
        for key in ("dense_epochs", "sparse_epochs", "finetune_epochs"):
            if getattr(args, key) is not None:
                cfg[key] = getattr(args, key)
        imgsz, S, F = cfg["imgsz"], cfg["sparse_epochs"], cfg["finetune_epochs"]
        data = dataset(ds, args.quick)
        work = common.WORK / "runs" / name / ds
        work.mkdir(parents=True, exist_ok=True)
        dres = res["datasets"].setdefault(ds, {"families": {}})
        this_run = {"command": common.command_line(), "started": time.strftime("%Y-%m-%d %H:%M"),
                    "loadavg_start": list(os.getloadavg()), "busy_processes_at_start": common.busy_processes()}
        dres.setdefault("runs", []).append(this_run)
        dres.update(data=str(data), **cfg)
        t_ds = time.perf_counter()
        train_kw = dict(imgsz=imgsz, seed=0, workers=args.workers, **{**COMMON_TRAIN, **RECIPE})
        for fam in args.families:
            row = dres["families"].setdefault(fam, {})
            log(f"{ds} {fam}: dense model ({cfg['dense_epochs']} epochs from {FAMILIES[fam]}, cached)")
            dense, dense_sec = train_dense(fam, data, cfg, args.workers)
            if "dense" not in row:
                st = model_stats(dense, imgsz=imgsz)
                row["dense"] = {"checkpoint": str(dense), "train_seconds": round(dense_sec, 1), "params": st.params,
                                "macs": st.macs, **evaluate_map(dense, data, imgsz)}
                save()
            log(f"{ds} {fam}: dense mAP50-95 {row['dense']['map50_95']:.4f}, {row['dense']['macs'] / 1e9:.3f} GMACs")

            if "pipeline" not in row:
                log(f"{ds} {fam}: pipeline target_macs=0.5, {S} sparse + {F} fine-tune epochs")
                t0 = time.perf_counter()
                folder = work / f"{fam}_pipeline"
                again = args.resume and (folder / "pipeline.json").is_file()
                if folder.exists() and not again:  # pipeline() would reuse the stages recorded there
                    shutil.rmtree(folder)
                # the sparse stage these rows were measured with (the L1 sub-gradient, before greg became the
                # default); pruning and distillation use the current defaults, as the bccd rows did (the synthetic
                # rows predate them: bn ranking, one-shot lstsq, no teacher)
                p = pipeline(dense, data, target_macs=0.5, sparse_epochs=S, finetune_epochs=F, sr=cfg["sr"],
                             sr_mode="subgradient",
                             imgsz=imgsz, batch=COMMON_TRAIN["batch"], workers=args.workers, seed=0,
                             bench_runs=args.runs, bench_warmup=max(2, args.runs // 5), backends=("torch", "onnx"),
                             project=work, name=folder.name, exist_ok=True, resume=again,
                             train_args={k: v for k, v in train_kw.items()
                                         if k not in ("imgsz", "seed", "workers", "batch")})
                report = json.loads((p.save_dir / "report.json").read_text())
                st = report["stages"]
                step = st["prune"]["steps"][-1]
                lat = {(e["model"], e["backend"]): e["median_ms"] for e in st.get("bench", {}).get("entries", [])}
                row["pipeline"] = {
                    "seconds": round(time.perf_counter() - t0, 1), "save_dir": str(p.save_dir),
                    "final": str(p.final), "params": st["val"]["params"], "macs": st["val"]["macs"],
                    "macs_ratio": st["val"]["macs"] / st["baseline"]["macs"],
                    "params_ratio": st["val"]["params"] / st["baseline"]["params"],
                    "prune_seconds": round(step["prune_seconds"], 2), "map50_95_pruned": step["map50_95_pruned"],
                    "map50_95": st["val"]["map50_95"], "map50": st["val"]["map50"],
                    "latency_ms": {f"{m}_{b}": v for (m, b), v in lat.items()},
                    "onnx_ratio": lat[("pruned", "onnx")] / lat[("dense", "onnx")] if ("dense", "onnx") in lat else None,
                    "torch_ratio": lat[("pruned", "torch")] / lat[("dense", "torch")] if ("dense", "torch") in lat else None,
                }
                row["attention"] = {"dense": attention_widths(dense), "pruned": attention_widths(p.final)}
                save()
            pr = row["pipeline"]
            if "map50_95_sparse" not in pr and S > 0:  # the sparsity-trained model, before pruning
                sparse = common.resolve(pr["save_dir"]) / "sparse" / "train" / "weights" / "best.pt"
                pr["map50_95_sparse"] = evaluate_map(sparse, data, imgsz)["map50_95"] if sparse.is_file() else None
                save()
            log(f"{ds} {fam}: pruned MACs {pr['macs_ratio']:.3f}, params {pr['params_ratio']:.3f}, mAP50-95 "
                f"{pr['map50_95_pruned']:.4f} after pruning -> {pr['map50_95']:.4f} after fine-tune")

            if "dense_ft" not in row and not args.skip_reference:
                log(f"{ds} {fam}: dense reference, {S + F} more epochs")
                t0 = time.perf_counter()
                r = finetune(dense, data, epochs=S + F, project=work, name=f"{fam}_dense_ft", exist_ok=True, **train_kw)
                row["dense_ft"] = {"seconds": round(time.perf_counter() - t0, 1), "checkpoint": str(r.last),
                                   **evaluate_map(r.last, data, imgsz)}
                save()
            if "dense_ft" in row:
                log(f"{ds} {fam}: dense + {S + F} epochs mAP50-95 {row['dense_ft']['map50_95']:.4f}")

            if "latency640" not in row and args.runs > 0:
                log(f"{ds} {fam}: onnxruntime latency @640, dense vs pruned (interleaved)")
                pruned = str(common.resolve(pr["final"]))
                lat = measure_latency({"dense": dense, "pruned": pruned}, imgsz=640, backends=("onnx",),
                                      runs=args.runs, warmup=max(2, args.runs // 5), threads=1, progress=False)
                med = {e["model"]: e["median_ms"] for e in lat.to_dict()["entries"]}
                row["latency640"] = {"dense_ms": med["dense"], "pruned_ms": med["pruned"],
                                     "ratio": med["pruned"] / med["dense"], "runs": args.runs, "threads": 1}
                save()
        this_run["seconds"] = round(time.perf_counter() - t_ds, 1)
        save()
    res["complete"] = True
    save()
    log(f"done: bench/results/{name}.json ({res['total_seconds'] / 60:.1f} min); render with python -m bench.render")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
                                     prog="python -m bench.families")
    parser.add_argument("--quick", action="store_true", help="synthetic data, 2 dense + 1 + 1 epochs at imgsz 128")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), help="default: synthetic")
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=["yolo11n", "yolo26n"])
    parser.add_argument("--imgsz", type=int, help="override the dataset's image size")
    parser.add_argument("--dense-epochs", dest="dense_epochs", type=int, help="D (synthetic 30, bccd 20)")
    parser.add_argument("--sparse-epochs", dest="sparse_epochs", type=int, help="S (synthetic 5, bccd 3)")
    parser.add_argument("--finetune-epochs", dest="finetune_epochs", type=int, help="F (synthetic 10, bccd 7)")
    parser.add_argument("--runs", type=int, default=30, help="latency runs per model (0: no @640 latency)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-reference", action="store_true", help="no dense + S+F reference run")
    parser.add_argument("--estimate", action="store_true", help="time one epoch per family/dataset, print the cost")
    parser.add_argument("--name", help="result name (default families / families_quick)")
    parser.add_argument("--resume", action="store_true", help="keep finished steps of an earlier run of the same name")
    args = parser.parse_args(argv)
    args.datasets = args.datasets or ["synthetic"]
    if args.quick:
        args.datasets = ["synthetic"]
        args.runs = min(args.runs, 5)
    logging.getLogger("ultralytics").setLevel(logging.WARNING)
    return estimate(args) if args.estimate else run(args)


if __name__ == "__main__":
    sys.exit(main())
