"""Accuracy of a pruned real checkpoint, addition by addition (issue 12): right after pruning and after F epochs.

Fixture: the COCO yolov8n (``../shared/fixtures``), calibration on the FIRST 96 coco128 images (train split),
COCO mAP50-95 on the LAST 32 (``common.coco128_split()``), imgsz 320. For each MACs target and each row,
``yolo_prune.prune`` (calibration images from the train split) -> mAP right after pruning -> ``finetune`` for F
epochs (the same recipe for every row) -> mAP of ``last.pt`` (no checkpoint selection on the val split).

Rows are cumulative (each adds one thing to the previous one):

* ``r0_default``  today's default: ``method=bn compensate=lstsq``, no BN re-estimation, global allocation;
* ``r1_recal``    + BN re-estimation (``recalibrate=match``);
* ``r2_seq``      + sequential reconstruction (``compensate=lstsq_seq``);
* ``r3_sens``     + sensitivity allocation (``allocation=sensitivity``, curves from ``yolo_prune.sensitivity``);
* ``r4_recon``    + ranking by the error left after least-squares compensation (``method=recon``, its own curves);

and prune-only rows: ``search`` (r2 with the EagleEye-style ``allocation=search``, 16 candidates) and the ranking
criteria under r2's compensation (``rank_l1``, ``rank_activation``, ``rank_recon``; the fixture's gammas are
estimates). More rows: ``--add-row NAME BASE key=value ...``
(``ft.key=value`` goes to the fine-tune, e.g. ``ft.teacher=...`` for distillation; other keys to ``prune``).

Also: the dense model fine-tuned with the same recipe (reference), the sensitivity proxy's rank correlation with
real mAP (``yolo_prune.sensitivity(..., validate=k)``), and the pruning time of each row.

    python -m bench.accuracy --quick          # 0.7 only, r0 + r4, F=2 (a smoke run)
    python -m bench.accuracy                  # 0.9 / 0.7 / 0.5, every row, F=10
    python -m bench.accuracy --prune-only     # only the mAP right after pruning (cheap)
    python -m bench.accuracy --jobs 2         # two fine-tunes at a time

Results: ``bench/results/accuracy[_quick].json`` (rewritten after every step; finished steps are reused unless
``--fresh``). Render with ``python -m bench.render``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from bench import common

IMGSZ = 320
CALIB = 64
# Fine-tuning a pretrained COCO model on 96 images (see BENCHMARKS.md, frontier): AdamW at a low learning rate,
# no warmup (ultralytics' warmup_bias_lr=0.1 wrecks a pretrained head in one epoch), no mosaic, one optimizer step
# per batch of 16, no validation during training.
RECIPE: dict[str, Any] = {"optimizer": "AdamW", "lr0": 0.0001, "warmup_epochs": 0, "warmup_bias_lr": 0.0,
                          "mosaic": 0.0, "batch": 16, "nbs": 16, "workers": 1, "val": False, "seed": 0}

ROWS: dict[str, dict[str, Any]] = {
    "r0_default": {"label": "today's default (bn, lstsq)", "prune": {"method": "bn", "compensate": "lstsq",
                                                                    "recalibrate": False, "allocation": "global"}},
    "r1_recal": {"label": "+ BN re-estimation", "base": "r0_default", "prune": {"recalibrate": "match"}},
    "r2_seq": {"label": "+ sequential reconstruction", "base": "r1_recal", "prune": {"compensate": "lstsq_seq"}},
    "r3_sens": {"label": "+ sensitivity allocation", "base": "r2_seq", "prune": {"allocation": "sensitivity"}},
    "r4_recon": {"label": "+ recon ranking", "base": "r3_sens", "prune": {"method": "recon"}},
    "search": {"label": "r2 + allocation=search (EagleEye-style, 16 candidates)", "base": "r2_seq",
               "prune": {"allocation": "search"}, "finetune": False},
    "rank_l1": {"label": "r2 with ranking l1", "base": "r2_seq", "prune": {"method": "l1"}, "finetune": False},
    "rank_activation": {"label": "r2 with ranking activation", "base": "r2_seq", "prune": {"method": "activation"},
                        "finetune": False},
    "rank_recon": {"label": "r2 with ranking recon", "base": "r2_seq", "prune": {"method": "recon"},
                   "finetune": False},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def resolve(rows: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """A row's full settings: its base's, then its own (prune and fine-tune keys)."""
    row = rows[name]
    base = resolve(rows, row["base"]) if row.get("base") else {"prune": {}, "ft": {}}
    return {"label": row["label"], "prune": {**base["prune"], **row.get("prune", {})},
            "ft": {**base["ft"], **row.get("ft", {})}, "finetune": row.get("finetune", True)}


def evaluate_map(model: Any, data: Path) -> dict[str, float]:
    from yolo_prune.evaluate import evaluate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = evaluate(model, data, imgsz=IMGSZ, batch=16)
    return {"map50_95": round(v.map50_95, 5), "map50": round(v.map50, 5)}


def finetune_job(model: str, data: str, epochs: int, folder: str, name: str, extra: dict[str, Any]) -> dict[str, Any]:
    """One fine-tune + evaluation of last.pt (runs in a worker process with --jobs > 1)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from yolo_prune.train import finetune

    recipe = {**RECIPE, **extra}
    t0 = time.perf_counter()
    r = finetune(model, data, epochs=epochs, imgsz=IMGSZ, project=folder, name=name, exist_ok=True, **recipe)
    seconds = time.perf_counter() - t0
    return {"final": evaluate_map(r.last, Path(data)), "train_seconds": round(seconds, 1), "checkpoint": str(r.last)}


class Store:
    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.data: dict[str, Any] = {}
        if path.is_file() and not fresh:
            self.data = json.loads(path.read_text(encoding="utf-8"))
        self.data.setdefault("rows", {})

    def save(self) -> None:
        common.write_result(self.path.stem, self.data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, prog="python -m bench.accuracy")
    ap.add_argument("--quick", action="store_true", help="target 0.7, rows r0_default and r4_recon, F=2")
    ap.add_argument("--targets", type=float, nargs="+", default=None, help="MACs targets (default 0.9 0.7 0.5)")
    ap.add_argument("--rows", nargs="+", default=None, help=f"rows to run (default: all of {', '.join(ROWS)})")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tune epochs F (default 10; --quick 2)")
    ap.add_argument("--prune-only", action="store_true", help="only the mAP right after pruning")
    ap.add_argument("--add-row", nargs="+", action="append", default=[], metavar="NAME BASE KEY=VALUE",
                    help="an extra row: NAME BASE then prune keys (key=value) and fine-tune keys (ft.key=value)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="fine-tune recipe overrides (every row)")
    ap.add_argument("--sensitivity-validate", type=int, default=8,
                    help="groups pruned for real to check the sensitivity proxy against mAP (0: skip)")
    ap.add_argument("--jobs", type=int, default=1, help="fine-tunes run at a time (default 1)")
    ap.add_argument("--name", default=None, help="result name (default accuracy / accuracy_quick)")
    ap.add_argument("--fresh", action="store_true", help="ignore finished steps of a previous run")
    args = ap.parse_args(argv)

    rows = dict(ROWS)
    for spec in args.add_row:
        if len(spec) < 2:
            raise SystemExit("--add-row needs NAME BASE [key=value ...]")
        name, base, *pairs = spec
        row: dict[str, Any] = {"label": name, "base": base, "prune": {}, "ft": {}}
        for pair in pairs:
            key, _, value = pair.partition("=")
            (row["ft"] if key.startswith("ft.") else row["prune"])[key.removeprefix("ft.")] = parse_value(value)
        rows[name] = row
    targets = args.targets or ([0.7] if args.quick else [0.9, 0.7, 0.5])
    selected = args.rows or (["r0_default", "r4_recon"] if args.quick else list(rows))
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 10)
    recipe_extra = {k: parse_value(v) for k, v in (p.partition("=")[::2] for p in args.set)}
    name = args.name or ("accuracy_quick" if args.quick else "accuracy")
    store = Store(common.RESULTS / f"{name}.json", args.fresh)
    work = common.WORK / "accuracy" / name
    work.mkdir(parents=True, exist_ok=True)

    import yolo_prune as yp

    t_start = time.perf_counter()
    data = common.coco128_split()
    weights = common.WEIGHTS
    d = store.data
    d.update({"command": common.command_line(), "machine": common.machine(),
              "busy_processes_at_start": common.busy_processes(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "imgsz": IMGSZ, "calib_images": CALIB, "epochs": epochs, "recipe": {**RECIPE, **recipe_extra},
              "targets": targets, "data": common.rel(data),
              "row_settings": {k: resolve(rows, k) for k in selected}})
    if "dense" not in d:
        d["dense"] = evaluate_map(str(weights), data)
        store.save()
    log(f"dense mAP50-95 {d['dense']['map50_95']:.4f}")

    # sensitivity (one per ranking method used by an allocation row; also the proxy's check against mAP) ----------
    sens_methods = sorted({resolve(rows, r)["prune"].get("method", "bn") for r in selected
                           if resolve(rows, r)["prune"].get("allocation") in ("sensitivity", "search")})
    sens_csv = {m: work / f"sensitivity_{m}" / "sensitivity.csv" for m in sens_methods}
    d.setdefault("sensitivity", {})
    for method in sens_methods:
        if method in d["sensitivity"] and sens_csv[method].is_file():
            continue
        log(f"sensitivity analysis of the dense model, method={method}")
        t0 = time.perf_counter()
        s = yp.sensitivity(str(weights), data, method=method, imgsz=IMGSZ, calib_images=32,
                           validate=args.sensitivity_validate, project=work, name=f"sensitivity_{method}", exist_ok=True)
        d["sensitivity"][method] = {"seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(s.cpu_seconds, 1),
                                    "rank_correlation": s.rank_correlation, "validation": s.validation,
                                    "map50_95_dense": s.map50_95_dense, "csv": common.rel(s.csv)}
        store.save()
        log(f"sensitivity ({method}): {d['sensitivity'][method]['seconds']} s, Spearman {s.rank_correlation}")

    # prune every (row, target): mAP right after pruning ------------------------------------------------------------
    jobs: list[tuple[str, dict[str, Any], str]] = []
    for target in targets:
        for key in selected:
            cfg = resolve(rows, key)
            rid = f"{key}@{target}"
            row = d["rows"].setdefault(rid, {"row": key, "target_macs": target, "label": cfg["label"]})
            if "pruned" not in row:
                prune_kw = dict(cfg["prune"])
                if prune_kw.get("allocation") in ("sensitivity", "search"):
                    prune_kw["sensitivity"] = sens_csv[prune_kw.get("method", "bn")]
                t0, c0 = time.perf_counter(), time.process_time()
                r = yp.prune(str(weights), target_macs=target, data=data, imgsz=IMGSZ, calib_images=CALIB,
                             validate=True, project=work / "prune", name=rid.replace("@", "_"), exist_ok=True,
                             **prune_kw)
                row.update({"macs_ratio": round(r.macs_ratio, 4), "params_ratio": round(r.params_ratio, 4),
                            "prune_seconds": round(r.seconds, 1), "total_prune_seconds": round(time.perf_counter() - t0, 1),
                            "prune_call_cpu_seconds": round(time.process_time() - c0, 1),
                            "pruned": {"map50_95": r.map50_95_after, "map50": r.map50_after},
                            "pruned_no_recalibration": ({"map50_95": r.map50_95_no_recalibration,
                                                         "map50": r.map50_no_recalibration}
                                                        if r.map50_95_no_recalibration is not None else None),
                            "checkpoint": str(r.checkpoint)})
                store.save()
            log(f"{rid}: MACs {row['macs_ratio']:.3f}, mAP50-95 right after pruning {row['pruned']['map50_95']:.4f} "
                f"({row['prune_seconds']} s)")
            if cfg["finetune"] and not args.prune_only and "final" not in row:
                jobs.append((rid, {**recipe_extra, **cfg["ft"]}, str(common.resolve(row["checkpoint"]))))
    if not args.prune_only and "dense_finetuned" not in d:
        jobs.insert(0, ("dense_finetuned", dict(recipe_extra), str(weights)))

    # fine-tune (F epochs, same recipe) ------------------------------------------------------------------------------
    def record(rid: str, out: dict[str, Any]) -> None:
        if rid == "dense_finetuned":
            d["dense_finetuned"] = out
        else:
            d["rows"][rid].update(out)
        store.save()
        log(f"{rid}: after {epochs} epochs mAP50-95 {out['final']['map50_95']:.4f} ({out['train_seconds']} s)")

    folder = str(work / "finetune")
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(finetune_job, ckpt, str(data), epochs, folder, rid.replace("@", "_"), extra): rid
                       for rid, extra, ckpt in jobs}
            for fut in cf.as_completed(futures):
                record(futures[fut], fut.result())
    else:
        for rid, extra, ckpt in jobs:
            record(rid, finetune_job(ckpt, str(data), epochs, folder, rid.replace("@", "_"), extra))
    d["total_seconds"] = round(time.perf_counter() - t_start, 1)
    store.save()
    log(f"done in {d['total_seconds'] / 60:.1f} min: {store.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
