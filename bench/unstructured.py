#!/usr/bin/env python
"""Unstructured pruning (``yolo_prune.stages.sparsify``) on the fixture: mAP, compressed size, fine-tuning, channels + weights.

The fixture's COCO yolov8n (``../shared/fixtures/weights``, an INT8-rebuilt checkpoint) on the coco128 split of
``common.coco128_split()`` (96 train / 32 val images, COCO evaluation), imgsz 320:

1. **one shot**: ``sparsify(method=l1)`` at 30/50/70/90% of the conv weights, ``scope=global`` against
   ``scope=layer``: mAP50-95 / mAP50 right after (weights only, and with ``data=``: BatchNorm statistics corrected
   on 32 train images), non-zero parameters, checkpoint size raw and gzip -9; the fine-tunes start from the
   corrected checkpoints;
2. **short fine-tune** (``--epochs``, default 8, the frontier benchmark's fixture recipe: AdamW lr0 1e-4, no
   warmup, no mosaic, batch 16 = nbs) of the dense model (reference at the same budget), 50% and 70% global,
   70% per layer, and 70% global reached in 4 steps of ``epochs / 4`` epochs each (``steps=4``, same budget);
   every fine-tuned checkpoint is checked to hold exactly its zeros;
3. **channels, then weights**: ``prune(method=bn, target_macs=0.7, data=...)`` (lstsq compensation), then
   ``sparsify(amount=0.5, data=...)``, against either alone; right after and after the same fine-tune;
4. **latency** (torch eager and onnxruntime, 1 thread, interleaved) of dense, 50% and 90% sparse: it should
   not change (dense runtimes multiply by the zeros too).

Writes ``bench/results/unstructured[_quick].json``; ``python -m bench.render`` renders BENCHMARKS.md.
Run it as ``OMP_NUM_THREADS=1 nice -n 10 python -m bench.unstructured`` (about an hour on a busy 2-core machine);
``--quick`` (50/70% one-shot, 1 epoch, no steps run, 5 latency runs) takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import common

# The fixture fine-tuning recipe of bench/frontier.py (see its comments for how it was chosen).
TRAIN = {"batch": 16, "nbs": 16, "mosaic": 0.0, "workers": 2, "val": False, "seed": 0, "optimizer": "AdamW",
         "lr0": 0.0001, "warmup_epochs": 0, "warmup_bias_lr": 0.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def zeros_of(path: Path) -> dict[str, Any]:
    """Sparsity facts of a checkpoint: zeros of its sparsified parameters, non-zero params, sizes."""
    from ultralytics.nn.tasks import load_checkpoint

    from yolo_prune.pruning.masks import SPARSITY_ATTR, checkpoint_sizes, count_nonzero, global_sparsity, layer_sparsity

    m = load_checkpoint(path)[0]
    info = getattr(m, SPARSITY_ATTR, None) or {}
    rows = layer_sparsity(m, info.get("params"))
    nz, total = count_nonzero(m)
    raw, gz = checkpoint_sizes(path)
    return {"sparsity": global_sparsity(rows), "zeros": sum(r.zeros for r in rows), "nonzero": nz, "params": total,
            "size": raw, "gzip": gz}


def val(model: Any, data: Path, imgsz: int) -> dict[str, float]:
    from yolo_prune.evaluate import evaluate

    v = evaluate(model, data, imgsz=imgsz, batch=16)
    return {"map50_95": v.map50_95, "map50": v.map50}


def tune(src: Path, data: Path, imgsz: int, epochs: int, run: str, work: Path) -> Path:
    """Fine-tune ``src`` and return best.pt (or last.pt); a finished run of the same name, epochs and source
    checkpoint (sha256 recorded in its ``done`` file) is reused."""
    from yolo_prune.io import sha256_file
    from yolo_prune.train import finetune

    run = f"{run}_e{epochs}"
    folder = work / "finetune" / run
    key = sha256_file(src)
    done = folder / "done"
    if done.is_file() and done.read_text().strip() == key:
        for name in ("best.pt", "last.pt"):
            if (folder / "weights" / name).is_file():
                return folder / "weights" / name
    r = finetune(str(src), str(data), epochs=epochs, imgsz=imgsz, project=folder.parent, name=run, exist_ok=True,
                 **{k: v for k, v in TRAIN.items() if k not in ("batch", "seed")}, batch=TRAIN["batch"],
                 seed=TRAIN["seed"])
    done.write_text(key + "\n")
    return r.best or r.last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 prog="python -m bench.unstructured")
    ap.add_argument("--quick", action="store_true", help="50/70%% one-shot, 1 fine-tune epoch, no steps run")
    ap.add_argument("--imgsz", type=int, default=320, help="image size (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs per run (default: %(default)s)")
    ap.add_argument("--latency-runs", type=int, default=60, help="timed passes per model/backend (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.latency_runs = 1, 5
    name = "unstructured_quick" if args.quick else "unstructured"
    from yolo_prune.models import save_checkpoint
    from yolo_prune.stages.prune import prune
    from yolo_prune.stages.sparsify import sparsify

    t_start = time.perf_counter()
    data = common.coco128_split()
    weights = common.WEIGHTS
    work = common.WORK / name
    payload: dict[str, Any] = {
        "benchmark": "unstructured", "command": common.command_line(), "machine": common.machine(),
        "busy_processes_at_start": common.busy_processes(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "imgsz": args.imgsz, "epochs": args.epochs, "data": "coco128 split 96 train / 32 val (common.coco128_split)",
        "weights": weights.name, "train": TRAIN, "method": "l1",
        "env": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0)},
    }

    def save() -> None:
        payload["total_seconds"] = time.perf_counter() - t_start
        common.write_result(name, payload)

    # dense reference, written the way sparsify writes checkpoints (fp16, no optimizer) for a fair size
    from yolo_prune.models import load_model

    dense_pt = save_checkpoint(load_model(str(weights)).model, work / "dense.pt")
    payload["dense"] = {**zeros_of(dense_pt), **val(dense_pt, data, args.imgsz)}
    log(f"dense: {payload['dense']}")
    save()

    # 1. one shot ------------------------------------------------------------------------------------------
    amounts = (0.5, 0.7) if args.quick else (0.3, 0.5, 0.7, 0.9)
    ckpts: dict[str, Path] = {}
    payload["oneshot"] = []
    for scope in ("global", "layer"):
        for amount in amounts:
            key = f"{scope}{int(amount * 100)}"
            t0 = time.perf_counter()  # weights only (no data=)
            r = sparsify(str(weights), amount=amount, scope=scope, method="l1", imgsz=args.imgsz, bench=False,
                         project=work / "oneshot", name=key, exist_ok=True)
            seconds = time.perf_counter() - t0
            row = {"scope": scope, "amount": amount, "seconds": seconds, **zeros_of(r.checkpoint),
                   **val(r.checkpoint, data, args.imgsz)}
            # with data=: BatchNorm statistics corrected on 32 train images (the same zeros)
            rc = sparsify(str(weights), amount=amount, scope=scope, method="l1", data=str(data), imgsz=args.imgsz,
                          bench=False, project=work / "oneshot", name=f"{key}_bn", exist_ok=True)
            row.update(map50_95_bn=rc.map50_95_after, map50_bn=rc.map50_after)
            ckpts[key] = rc.checkpoint
            payload["oneshot"].append(row)
            log(f"one shot {scope} {amount}: {row}")
            save()

    # 2. short fine-tune ---------------------------------------------------------------------------------
    payload["finetune"] = []

    def tuned_row(label: str, src: Path, run: str, before: dict[str, Any], amount: float | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        best = tune(src, data, args.imgsz, args.epochs, run, work)
        after = zeros_of(best)
        row = {"label": label, "amount": amount, "epochs": args.epochs, "seconds": time.perf_counter() - t0,
               "map50_95_before": before["map50_95"], "map50_before": before["map50"],
               **val(best, data, args.imgsz), "sparsity": after["sparsity"], "zeros_before": before.get("zeros"),
               "zeros_after": after["zeros"], "gzip": after["gzip"], "nonzero": after["nonzero"]}
        row["zeros_kept"] = before.get("zeros") is None or after["zeros"] == before["zeros"]
        payload["finetune"].append(row)
        log(f"fine-tune {label}: {row}")
        save()
        return row

    oneshot = {f"{r['scope']}{int(r['amount'] * 100)}": r for r in payload["oneshot"]}
    tuned_row("dense", dense_pt, "dense", {**payload["dense"], "zeros": None}, None)
    runs = [("global70", 0.7)] if args.quick else [("global50", 0.5), ("global70", 0.7), ("layer70", 0.7)]
    for key, amount in runs:  # from the BN-corrected one-shot checkpoints
        start = {**oneshot[key], "map50_95": oneshot[key]["map50_95_bn"], "map50": oneshot[key]["map50_bn"]}
        tuned_row(f"{int(amount * 100)}% {key.rstrip('0123456789')}", ckpts[key], key, start, amount)
    if not args.quick and args.epochs >= 4:
        t0 = time.perf_counter()
        r = sparsify(str(weights), amount=0.7, scope="global", method="l1", data=str(data), steps=4,
                     step_epochs=args.epochs // 4, imgsz=args.imgsz, batch=TRAIN["batch"], workers=TRAIN["workers"],
                     bench=False, project=work, name="steps70", exist_ok=True,
                     resume=(work / "steps70" / "sparsify.json").is_file(),
                     train_args={k: v for k, v in TRAIN.items() if k not in ("batch", "seed", "workers")})
        after = zeros_of(r.checkpoint)
        payload["steps"] = {"amount": 0.7, "steps": 4, "step_epochs": args.epochs // 4,
                            "seconds": time.perf_counter() - t0,
                            "records": [{k: s.get(k) for k in ("step", "amount", "sparsity", "map50_95_sparse",
                                                                "map50_sparse", "map50_95", "map50")} for s in r.steps],
                            "map50_95": r.map50_95_after, "map50": r.map50_after, **after}
        log(f"steps: {payload['steps']}")
        save()

    # 3. channels, then weights ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    ch = prune(str(weights), method="bn", target_macs=0.7, data=str(data), imgsz=args.imgsz, seed=0,
               project=work, name="channels70", exist_ok=True)
    ch_row = {"label": "channels 0.7 MACs", "macs_ratio": ch.macs_ratio, "seconds": time.perf_counter() - t0,
              **zeros_of(ch.checkpoint), **val(ch.checkpoint, data, args.imgsz)}
    both = sparsify(str(ch.checkpoint), amount=0.5, scope="global", method="l1", data=str(data), imgsz=args.imgsz,
                    bench=False, project=work, name="channels70_global50", exist_ok=True)
    both_row = {"label": "channels 0.7 MACs + 50% weights", "macs_ratio": ch.macs_ratio,
                **zeros_of(both.checkpoint), **val(both.checkpoint, data, args.imgsz)}
    g50 = oneshot.get("global50")
    w_row = {"label": "50% weights", "macs_ratio": 1.0, **{k: g50[k] for k in ("sparsity", "zeros", "nonzero", "params",
                                                                                "size", "gzip")},
             "map50_95": g50["map50_95_bn"], "map50": g50["map50_bn"]}
    d_row = {"label": "dense", "macs_ratio": 1.0, **payload["dense"]}
    combo = [d_row, ch_row, w_row, both_row]
    for row, src, run in ((ch_row, ch.checkpoint, "channels70"), (both_row, both.checkpoint, "channels70_global50")):
        best = tune(src, data, args.imgsz, args.epochs, run, work)
        z = zeros_of(best)
        row.update(map50_95_tuned=val(best, data, args.imgsz)["map50_95"], zeros_kept=z["zeros"] == row["zeros"])
    for row, label in ((w_row, "50% global"), (d_row, "dense")):
        ft = next((r for r in payload["finetune"] if r["label"] == label), None)
        row["map50_95_tuned"] = ft["map50_95"] if ft else None
    payload["combo"] = combo
    log(f"combo: {combo}")
    save()

    # 4. latency -----------------------------------------------------------------------------------------------
    from yolo_prune.bench import measure_latency

    models = {"dense": dense_pt, "50% global": ckpts["global50"],
              "90% global" if "global90" in ckpts else "70% global": ckpts.get("global90") or ckpts["global70"]}
    lat = measure_latency(models, imgsz=args.imgsz, backends=("torch", "onnx"), runs=args.latency_runs, warmup=10,
                          threads=1, progress=False)
    payload["latency"] = {"threads": 1, "runs": args.latency_runs, "busy_processes": common.busy_processes(),
                          **lat.to_dict()}
    save()
    log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min -> bench/results/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
