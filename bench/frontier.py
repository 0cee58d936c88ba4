"""Accuracy-efficiency frontier: COCO mAP50-95 vs MACs kept, yolo-prune against the baselines.

For each dataset and each MACs target (fraction of the dense model's MACs kept), with an EQUAL training budget:

* ``a_sparse_bn``  yolo-prune's method: ``sparse_train`` (S epochs, L1 on BN gammas) -> ``prune(method="bn")``
                   -> ``finetune`` (F epochs);
* ``b_l1``         ``prune(method="l1")`` of the dense model without sparsity training (torch-pruning's
                   YOLOv8 example) -> ``finetune`` (S+F epochs);
* ``c_random``     ``prune(method="random")`` -> ``finetune`` (S+F epochs);
* ``d_narrow``     a narrower YOLOv8 (custom yaml, smaller ``width_multiple`` chosen for about the same
                   MACs), random init, trained for S+F epochs;
* ``dense``        the dense model fine-tuned for S+F epochs (the reference).

mAP50-95 is measured with ``yolo_prune.evaluate.evaluate`` (COCOeval) on the val split right after pruning and
after the fine-tune budget, always on ``last.pt`` (no checkpoint selection on the val split).

Datasets:

* ``fixture``: the real COCO yolov8n weights (``../shared/fixtures/weights``), fine-tuned on the FIRST 96 coco128
  images and evaluated on the LAST 32 (COCO-format split built in ``bench/work``);
* ``synthetic``: ``make_synthetic(n_train=128, n_val=32, imgsz=256)``; its dense model is first trained from
  scratch (``yolov8n.yaml``, 30 epochs at imgsz 160, cached in ``bench/work``).

Results: ``bench/results/frontier[_quick].json`` (rewritten after every step, so a partial run is readable;
``--resume`` skips finished steps) and ``bench/results/frontier[_quick]_<dataset>.png``.
Render the tables with ``python -m bench.render``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from bench import common

ARMS = {
    "a_sparse_bn": "yolo-prune: sparse_train + prune(bn)",
    "b_l1": "prune(l1), no sparsity training",
    "c_random": "prune(random)",
    "d_narrow": "narrower YOLOv8 from scratch",
    "dense": "dense, fine-tuned (reference)",
}

# Training settings shared by every run of a dataset (ultralytics train keys).
#   nbs=16: one optimizer step per batch of 16 (ultralytics' nominal 64 would mean 1-2 steps per epoch here);
#   mosaic off, val off during training (the final model is evaluated with yolo-prune's COCO evaluation).
COMMON_TRAIN = {"batch": 16, "nbs": 16, "mosaic": 0.0, "workers": 2, "val": False, "seed": 0}
DATASETS: dict[str, dict[str, Any]] = {
    "fixture": {
        "imgsz": 320,
        "sparse_epochs": 5,
        "finetune_epochs": 10,
        "sr": 0.01,
        # Fine-tuning a pretrained COCO model on 96 images: AdamW at a low lr and no warmup. Measured on this
        # split (2 epochs of the dense model, mAP50-95 0.454 before): AdamW lr0=1e-4 0.454, SGD lr0=1e-3 0.423,
        # AdamW lr0=1e-3 0.130; SGD lr0=0.01 for 5 epochs 0.155; warmup_bias_lr=0.1 wrecks it in one epoch.
        # (lr0=3e-4 already cost the dense model 0.11 mAP in 2 epochs: a fine-tune must not degrade the reference.)
        "train": {"optimizer": "AdamW", "lr0": 0.0001, "warmup_epochs": 0, "warmup_bias_lr": 0.0},
        # Training from random init (d_narrow): the recipe the synthetic dense model is trained with.
        "scratch": {"optimizer": "AdamW", "lr0": 0.003, "warmup_epochs": 1},
    },
    "synthetic": {
        "imgsz": 160,
        "sparse_epochs": 5,
        "finetune_epochs": 10,
        "sr": 0.01,
        "train": {"optimizer": "AdamW", "lr0": 0.003, "warmup_epochs": 1},  # cfg/demo.yaml's recipe
        "scratch": {"optimizer": "AdamW", "lr0": 0.003, "warmup_epochs": 1},
        "dense_epochs": 30,
    },
}
# Quick: the generated data first (its right-after-pruning mAP separates the methods even with a 1-epoch budget;
# its dense model is trained once, 2-3 min, and cached), then the fixture (checks the real-checkpoint path runs).
QUICK = {"datasets": ["synthetic", "fixture"], "targets": [0.5], "sparse_epochs": 1, "finetune_epochs": 1}

LOG = logging.getLogger("bench.frontier")


# --------------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lr0=0.001", "optimizer=SGD"]`` -> ``{"lr0": 0.001, "optimizer": "SGD"}`` (values parsed as YAML scalars)."""
    import yaml as pyyaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = pyyaml.safe_load(value)
    return out


def evaluate_map(model: Any, data: Path, imgsz: int) -> dict[str, float]:
    from yolo_prune.evaluate import evaluate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = evaluate(model, data, imgsz=imgsz, batch=16)
    return {"map50_95": round(v.map50_95, 5), "map50": round(v.map50, 5), "ul_map50_95": round(v.ul_map50_95, 5)}


def macs_params(model: Any, imgsz: int) -> tuple[int, int]:
    from yolo_prune.stats import model_stats

    s = model_stats(model, imgsz=imgsz)
    return int(s.macs), int(s.params)


def narrow_yaml(target: float, dense_macs: int, nc: int, imgsz: int, folder: Path) -> tuple[Path, float, float]:
    """Write a yolov8 yaml whose width_multiple gives the MACs closest to ``target * dense_macs``.

    Depth (0.33) and max_channels (1024) are yolov8n's; ultralytics rounds widths to multiples of 8, so MACs
    move in steps. Returns the yaml path, its width_multiple and its MACs ratio to the dense model.
    """
    import yaml as pyyaml
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    base = yaml_model_load("yolov8n.yaml")
    cfg = {k: v for k, v in base.items() if k not in ("scales", "scale", "yaml_file")}
    cfg.update(nc=nc, depth_multiple=0.33, max_channels=1024)
    best = None
    for i in range(41):  # width 0.05 .. 0.25 in steps of 0.005
        w = round(0.05 + 0.005 * i, 3)
        cfg["width_multiple"] = w
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = DetectionModel(copy.deepcopy(cfg), nc=nc, verbose=False)
        ratio = macs_params(m, imgsz)[0] / dense_macs
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (w, ratio)
    cfg["width_multiple"] = best[0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"yolov8_w{best[0]:.3f}_nc{nc}.yaml"
    path.write_text(pyyaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path, best[0], best[1]


class Store:
    """The result JSON, rewritten after every step; ``done`` answers whether a step can be skipped."""

    def __init__(self, name: str, meta: dict[str, Any], resume: bool):
        self.name = name
        old = common.read_result(name) if resume else None
        self.data = old if old else {**meta, "datasets": {}}
        self.data.update({k: v for k, v in meta.items() if k not in ("datasets",)})

    def ds(self, dataset: str) -> dict[str, Any]:
        return self.data["datasets"].setdefault(dataset, {"rows": {}})

    def row(self, dataset: str, arm: str, target: float | None) -> dict[str, Any]:
        key = f"{arm}@{target}" if target is not None else arm
        return self.ds(dataset)["rows"].setdefault(key, {"arm": arm, "target_macs": target})

    def save(self) -> None:
        common.write_result(self.name, self.data)


# --------------------------------------------------------------------------------------------- stages
def dense_synthetic(cfg: dict[str, Any], data: Path, work: Path, epochs: int) -> tuple[Path, float]:
    """Train (once, cached) the synthetic dataset's dense yolov8n from scratch; return last.pt and seconds."""
    from ultralytics import YOLO

    folder = work / f"dense_scratch_e{epochs}"
    ckpt, meta = folder / "weights" / "last.pt", folder / "bench_meta.json"
    if ckpt.is_file() and meta.is_file():
        return ckpt, json.loads(meta.read_text())["seconds"]
    t0 = time.perf_counter()
    YOLO("yolov8n.yaml").train(data=str(data), epochs=epochs, imgsz=cfg["imgsz"], plots=False,
                              project=str(work), name=folder.name, exist_ok=True, verbose=False,
                              **{**COMMON_TRAIN, **cfg["scratch"]})
    seconds = time.perf_counter() - t0
    meta.write_text(json.dumps({"seconds": seconds}))
    return ckpt, seconds


def run_dataset(name: str, args: argparse.Namespace, store: Store) -> None:
    from yolo_prune.data import resolve_data
    from yolo_prune.stages.prune import prune
    from yolo_prune.train import finetune, sparse_train

    cfg = dict(DATASETS[name])
    if args.imgsz:
        cfg["imgsz"] = args.imgsz
    S = args.sparse_epochs if args.sparse_epochs is not None else cfg["sparse_epochs"]
    F = args.finetune_epochs if args.finetune_epochs is not None else cfg["finetune_epochs"]
    sr = args.sr if args.sr is not None else cfg["sr"]
    imgsz = cfg["imgsz"]
    work = common.WORK / "runs" / store.name / name
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    train = {**COMMON_TRAIN, **cfg["train"], **overrides(args.set)}
    scratch = {**COMMON_TRAIN, **cfg["scratch"]}
    ds = store.ds(name)
    t_ds = time.perf_counter()

    # data + dense model
    if name == "fixture":
        data = common.coco128_split(96)
        dense, dense_seconds = common.WEIGHTS, None
    else:
        data = common.synthetic(128, 32, 256)
        log(f"{name}: training the dense yolov8n from scratch ({cfg['dense_epochs']} epochs) if not cached")
        dense, dense_seconds = dense_synthetic(cfg, data, common.WORK / "dense", cfg["dense_epochs"])
    spec = resolve_data(data)
    ds.update(data=common.rel(data), imgsz=imgsz, sparse_epochs=S, finetune_epochs=F, sr=sr,
              train_args=train, scratch_train_args=scratch, n_train=len(spec.train_images),
              n_val=len(spec.val_images), dense_checkpoint=str(dense), dense_train_seconds=dense_seconds)
    if "dense_map" not in ds:
        ds["dense_macs"], ds["dense_params"] = macs_params(dense, imgsz)
        ds["dense_map"] = evaluate_map(dense, data, imgsz)
        store.save()
    dmacs = ds["dense_macs"]
    log(f"{name}: dense {dmacs / 1e9:.3f} GMACs @{imgsz}, mAP50-95 {ds['dense_map']['map50_95']:.4f}")

    def trained(row: dict[str, Any]) -> bool:
        return args.resume and "final" in row

    def fine(model: Any, epochs: int, run: str, recipe: dict[str, Any]) -> tuple[Path, float]:
        t0 = time.perf_counter()
        r = finetune(model, data, epochs=epochs, imgsz=imgsz, project=str(work), name=run, exist_ok=True,
                     **{k: v for k, v in recipe.items() if k not in ("batch", "seed")},
                     batch=recipe["batch"], seed=recipe["seed"])
        return r.last, time.perf_counter() - t0

    def record_final(row: dict[str, Any], ckpt: Path, seconds: float, epochs: dict[str, int]) -> None:
        row["final"] = evaluate_map(ckpt, data, imgsz)
        row["train_seconds"] = round(seconds, 1)
        row["epochs"] = epochs
        store.save()

    # dense reference: S+F fine-tune epochs
    if "dense" in args.arms:
        row = store.row(name, "dense", None)
        if not trained(row):
            log(f"{name}: dense fine-tune {S + F} epochs")
            row.update(macs=dmacs, macs_ratio=1.0, params=ds["dense_params"], pruned=ds["dense_map"])
            ckpt, sec = fine(dense, S + F, "dense_ft", train)
            record_final(row, ckpt, sec, {"finetune": S + F})
        log(f"{name}: dense fine-tuned -> {row['final']['map50_95']:.4f}")

    # (a) sparsity training once, shared by all targets
    sparse_ckpt = None
    if "a_sparse_bn" in args.arms:
        srow = ds.setdefault("sparse", {})
        ckpt = work / "sparse" / "sparse" / "weights" / "last.pt"
        if not (args.resume and srow.get("map") and ckpt.is_file()):
            log(f"{name}: sparse_train sr={sr} {S} epochs")
            t0 = time.perf_counter()
            r = sparse_train(dense, data, sr=sr, epochs=S, imgsz=imgsz, project=str(work), name="sparse",
                             exist_ok=True, **{k: v for k, v in train.items() if k not in ("batch", "seed")},
                             batch=train["batch"], seed=train["seed"])
            srow.update(seconds=round(time.perf_counter() - t0, 1), gamma_mean_before=r.gamma_mean_before,
                        gamma_mean_after=r.gamma_mean_after, gamma_near_zero_before=r.gamma_near_zero_before,
                        gamma_near_zero_after=r.gamma_near_zero_after, gamma_threshold=r.gamma_threshold, sr=sr,
                        epochs=S)
            ckpt = Path(r.last)
            srow["map"] = evaluate_map(ckpt, data, imgsz)
            store.save()
        sparse_ckpt = ckpt
        log(f"{name}: sparse model mAP50-95 {srow['map']['map50_95']:.4f}, |gamma|<{srow.get('gamma_threshold')}: "
            f"{srow.get('gamma_near_zero_before')} -> {srow.get('gamma_near_zero_after')}")

    prune_arms = {"a_sparse_bn": ("bn", sparse_ckpt, F), "b_l1": ("l1", dense, S + F),
                  "c_random": ("random", dense, S + F)}
    for target in args.targets:
        for arm, (method, source, epochs) in prune_arms.items():
            if arm not in args.arms:
                continue
            row = store.row(name, arm, target)
            if trained(row):
                continue
            log(f"{name}: {arm} target {target}: prune({method})")
            p = prune(source, method=method, target_macs=target, imgsz=imgsz, project=str(work),
                      name=f"{arm}_{target}", exist_ok=True)
            row.update(method=method, macs=p.macs_after, macs_ratio=p.macs_after / dmacs, params=p.params_after,
                       prune_seconds=round(p.seconds, 3), pruned=evaluate_map(p.checkpoint, data, imgsz))
            store.save()
            log(f"{name}: {arm} @{target}: MACs {row['macs_ratio']:.3f}, after pruning {row['pruned']['map50_95']:.4f};"
                f" fine-tune {epochs} epochs")
            ckpt, sec = fine(p.checkpoint, epochs, f"{arm}_{target}", train)
            record_final(row, ckpt, sec, {"sparse": S, "finetune": F} if arm == "a_sparse_bn" else {"finetune": epochs})
            log(f"{name}: {arm} @{target}: after fine-tune {row['final']['map50_95']:.4f}")
        if "d_narrow" in args.arms:
            row = store.row(name, "d_narrow", target)
            if not trained(row):
                yaml_path, width, ratio = narrow_yaml(target, dmacs, spec.nc, imgsz, work / "narrow_yamls")
                log(f"{name}: d_narrow @{target}: width_multiple {width} (MACs {ratio:.3f}), {S + F} epochs from scratch")
                ckpt, sec = fine(yaml_path, S + F, f"d_narrow_{target}", scratch)
                macs, params = macs_params(ckpt, imgsz)
                row.update(width_multiple=width, macs=macs, macs_ratio=macs / dmacs, params=params,
                           yaml=common.rel(yaml_path))
                record_final(row, ckpt, sec, {"scratch": S + F})
                log(f"{name}: d_narrow @{target}: {row['final']['map50_95']:.4f}")
    ds["seconds"] = round(time.perf_counter() - t_ds, 1)
    store.save()
    plot(store.data, name, common.RESULTS / f"{store.name}_{name}.png")


def prune_only(name: str, args: argparse.Namespace, store: Store) -> None:
    """mAP right after pruning the dense model (no training at all) for bn / l1 / random at ``args.targets``."""
    from yolo_prune.stages.prune import prune

    cfg = DATASETS[name]
    imgsz = args.imgsz or cfg["imgsz"]
    if name == "fixture":
        data, dense = common.coco128_split(96), common.WEIGHTS
    else:
        data = common.synthetic(128, 32, 256)
        dense, _ = dense_synthetic(cfg, data, common.WORK / "dense", cfg["dense_epochs"])
    ds = store.ds(name)
    ds.update(data=common.rel(data), imgsz=imgsz, dense_checkpoint=str(dense))
    if "dense_map" not in ds:
        ds["dense_macs"], ds["dense_params"] = macs_params(dense, imgsz)
        ds["dense_map"] = evaluate_map(dense, data, imgsz)
    for target in args.targets:
        for method in ("bn", "l1", "random"):
            row = store.row(name, f"prune_{method}", target)
            if args.resume and "pruned" in row:
                continue
            p = prune(dense, method=method, target_macs=target, imgsz=imgsz, save=False)
            row.update(method=method, macs_ratio=p.macs_ratio, params=p.params_after, prune_seconds=round(p.seconds, 3),
                       pruned=evaluate_map(p.model, data, imgsz))
            store.save()
            log(f"{name}: prune({method}) @{target}: MACs {p.macs_ratio:.3f}, mAP50-95 {row['pruned']['map50_95']:.4f}")


# --------------------------------------------------------------------------------------------- plot
def plot(data: dict[str, Any], dataset: str, path: Path) -> Path:
    """mAP50-95 vs MACs kept: solid = after the fine-tune budget, dotted/hollow = right after pruning."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ds = data["datasets"][dataset]
    rows = list(ds["rows"].values())
    fig = Figure(figsize=(6.4, 4.2), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"a_sparse_bn": "tab:red", "b_l1": "tab:blue", "c_random": "tab:gray", "d_narrow": "tab:green"}
    for arm, colour in colours.items():
        pts = sorted((r["macs_ratio"], r) for r in rows if r["arm"] == arm and "final" in r)
        if not pts:
            continue
        xs = [x for x, _ in pts]
        ax.plot(xs, [r["final"]["map50_95"] for _, r in pts], "-o", color=colour, label=ARMS[arm])
        if arm != "d_narrow":
            ax.plot(xs, [r["pruned"]["map50_95"] for _, r in pts], ":o", color=colour, mfc="none", alpha=0.7)
    dense = ds["rows"].get("dense")
    ax.plot([1.0], [ds["dense_map"]["map50_95"]], "k*", ms=10, label="dense, as given")
    if dense and "final" in dense:
        ax.axhline(dense["final"]["map50_95"], color="k", ls="--", lw=1, label=ARMS["dense"])
    ax.set_xlabel(f"MACs kept (fraction of dense, imgsz {ds['imgsz']})")
    ax.set_ylabel("COCO mAP50-95 (val split)")
    ax.set_title(f"{dataset}: S={ds['sparse_epochs']} sparse + F={ds['finetune_epochs']} fine-tune epochs "
                 "(dotted: right after pruning)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
                                     prog="python -m bench.frontier")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test size (about 4 min, +2 min the first time for the cached synthetic dense model): both "
                             "datasets, target 0.5, S=1, F=1; writes frontier_quick.json")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), help="default: fixture synthetic")
    parser.add_argument("--targets", nargs="+", type=float, help="MACs fractions to keep (default 0.7 0.5 0.35)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--sparse-epochs", type=int, help="S (default: per dataset, 5)")
    parser.add_argument("--finetune-epochs", type=int, help="F (default: per dataset, 10)")
    parser.add_argument("--sr", type=float, help="sparsity strength of sparse_train (default: per dataset)")
    parser.add_argument("--imgsz", type=int, help="override the per-dataset image size (fixture 320, synthetic 160)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override ultralytics train keys of the training recipe of every arm except the from-scratch "
                             "ones, e.g. --set warmup_bias_lr=0.0 lr0=0.001")
    parser.add_argument("--name", help="result name (default frontier / frontier_quick)")
    parser.add_argument("--prune-only", action="store_true",
                        help="only mAP right after pruning the dense model (bn, l1, random; no training) at --targets;"
                             " writes frontier_pruneonly.json")
    parser.add_argument("--resume", action="store_true", help="keep finished steps of an earlier run of the same name")
    parser.add_argument("--fresh", action="store_true", help="delete this run's work folder first")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets = args.datasets or QUICK["datasets"]
        args.targets = args.targets or QUICK["targets"]
        args.sparse_epochs = QUICK["sparse_epochs"] if args.sparse_epochs is None else args.sparse_epochs
        args.finetune_epochs = QUICK["finetune_epochs"] if args.finetune_epochs is None else args.finetune_epochs
    args.datasets = args.datasets or list(DATASETS)
    args.targets = args.targets or [0.7, 0.5, 0.35]
    name = args.name or ("frontier_pruneonly" if args.prune_only else "frontier_quick" if args.quick else "frontier")
    meta = {"benchmark": "frontier", "command": common.command_line(), "machine": common.machine(),
            "busy_processes_at_start": common.busy_processes(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "quick": args.quick, "targets": args.targets, "arms": args.arms}
    store = Store(name, meta, args.resume)
    store.data["complete"] = False
    store.save()
    t0 = time.perf_counter()
    for ds in args.datasets:
        (prune_only if args.prune_only else run_dataset)(ds, args, store)
    store.data["complete"] = True
    store.data["total_seconds"] = round(time.perf_counter() - t0, 1)
    store.data["loadavg_end"] = list(os.getloadavg())
    store.save()
    log(f"done in {store.data['total_seconds'] / 60:.1f} min -> {common.RESULTS / (name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
