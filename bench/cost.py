"""What the method costs: pruning wall time, sparsity-training overhead, COCO evaluation time.

1. ``prune``: wall time of ``yolo_prune.pruning.prune_model`` (prepare + dependency-graph build + ranking + channel
   removal) on random-init yolov8n / s / m (BN statistics randomised so that the ranking has no ties), median of
   ``--repeats``; plus the whole ``yolo_prune.prune()`` call on the fixture's COCO yolov8n (load, stats before and
   after, checkpoint, report).
2. ``sparse``: seconds per epoch of ``sparse_train`` (sr > 0) vs ``finetune`` (same settings, same data, same
   seed: the coco128 96-image split at imgsz 320), run alternately (plain, sparse, plain, sparse, ...) so that
   machine-load drift hits both. Per-epoch time from ultralytics' ``results.csv`` (first epoch excluded: it
   includes dataloader start-up). Also a micro-benchmark of the penalty itself: ``add_l1_subgradient`` over
   every BN gamma of yolov8n vs one forward+backward.
3. ``eval``: ``yolo_prune.evaluate.coco_eval`` on the fixture's predictions for all 128 coco128 images (imgsz 640)
   with ``pycocotools`` vs ``faster-coco-eval``, median of ``--repeats``; the mAPs of both must agree.

Result: ``bench/results/cost[_quick].json``; tables with ``python -m bench.render``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from bench import common


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def randomize_bn(model, seed: int = 0):
    """Distinct BN gammas/betas/statistics (random init has gamma == 1 everywhere: every channel would tie)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) * 1.4 + 0.1
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model


# --------------------------------------------------------------------------------------------- 1. pruning time
def bench_prune(scales: list[str], repeats: int, target: float, method: str,
                threads: list[int]) -> dict[str, Any]:
    import torch

    from yolo_prune.bench import torch_threads

    out: dict[str, Any] = {"target_macs": target, "method": method, "repeats": repeats, "by_threads": {}}
    for n in threads:
        with torch_threads(n):
            log(f"pruning time with {torch.get_num_threads()} torch thread(s)")
            out["by_threads"][str(n)] = _bench_prune(scales, repeats, target, method)
    return out


def _bench_prune(scales: list[str], repeats: int, target: float, method: str) -> dict[str, Any]:
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from yolo_prune.pruning import prune_model
    from yolo_prune.stages.prune import prune
    from yolo_prune.stats import model_stats

    out: dict[str, Any] = {"threads": torch.get_num_threads(), "loadavg_1min_before": os.getloadavg()[0],
                           "busy_processes_before": common.busy_processes(), "models": {}}
    for scale in scales:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = randomize_bn(DetectionModel(f"yolov8{scale}.yaml", verbose=False)).eval()
        before = model_stats(base, imgsz=640)
        times = []
        for _ in range(repeats):
            m = copy.deepcopy(base)
            for p in m.parameters():
                p.requires_grad_(True)
            t0 = time.perf_counter()
            outcome = prune_model(m, method=method, target_macs=target)
            times.append(time.perf_counter() - t0)
        after = model_stats(m, imgsz=640)
        out["models"][f"yolov8{scale}"] = {
            "seconds": times, "median_s": statistics.median(times), "params": before.params,
            "gmacs@640": before.gmacs, "macs_ratio": after.macs / before.macs,
            "channels_removed": sum(s.channels_removed for s in outcome.steps)}
        log(f"prune_model yolov8{scale}: median {statistics.median(times):.2f} s of {[round(t, 2) for t in times]}")
    # the user-facing call on the real checkpoint, everything included
    times, inner = [], []
    work = common.WORK / "cost_prune"
    for i in range(repeats):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = prune(str(common.WEIGHTS), method=method, target_macs=target, imgsz=640, project=str(work),
                      name="api", exist_ok=True)
        times.append(time.perf_counter() - t0)
        inner.append(r.seconds)
    out["prune_api_fixture_yolov8n"] = {"seconds": times, "median_s": statistics.median(times),
                                        "prune_model_seconds": inner, "macs_ratio": r.macs_ratio}
    log(f"prune() API on the fixture: median {statistics.median(times):.2f} s (prune_model part "
        f"{statistics.median(inner):.2f} s)")
    return out


# --------------------------------------------------------------------------------------------- 2. sparsity overhead
def _tensors_sum(out: Any):
    """Sum of the means of every tensor in a (nested) model output (ultralytics 8.4 returns dicts in train mode)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.float().mean()
    if isinstance(out, dict):
        out = list(out.values())
    return sum(_tensors_sum(o) for o in out)


def epoch_times(results_csv: Path) -> list[float]:
    with open(results_csv, newline="") as f:
        cum = [float(row["time"]) for row in csv.DictReader(f)]
    return [b - a for a, b in zip([0.0] + cum[:-1], cum)]


def bench_sparse(epochs: int, pairs: int, sr: float, imgsz: int) -> dict[str, Any]:
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from yolo_prune.train import add_l1_subgradient, bn_layers, finetune, sparse_train

    data = common.coco128_split(96)
    train = {"batch": 16, "nbs": 16, "mosaic": 0.0, "workers": 2, "val": False, "optimizer": "AdamW", "lr0": 1e-4,
                 "warmup_epochs": 0, "warmup_bias_lr": 0.0}
    work = common.WORK / "cost_sparse"
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "sparse": []}
    for i in range(pairs):
        for kind in ("plain", "sparse"):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if kind == "plain":
                    r = finetune(str(common.WEIGHTS), data, epochs=epochs, imgsz=imgsz, project=str(work),
                                 name=f"plain{i}", exist_ok=True, **train)
                else:
                    r = sparse_train(str(common.WEIGHTS), data, sr=sr, epochs=epochs, imgsz=imgsz,
                                     project=str(work), name=f"sparse{i}", exist_ok=True, **train)
            wall = time.perf_counter() - t0
            ep = epoch_times(Path(r.save_dir) / "results.csv")
            runs[kind].append({"wall_s": wall, "epoch_s": ep})
            log(f"{kind} run {i}: {wall:.1f} s wall, epochs {[round(e, 1) for e in ep]}")
    per_epoch = {k: statistics.median([e for run in v for e in run["epoch_s"][1:]]) for k, v in runs.items()}
    wall = {k: statistics.median([run["wall_s"] for run in v]) for k, v in runs.items()}
    # the penalty alone: one add_l1_subgradient over every BN gamma vs one forward+backward of yolov8n
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = DetectionModel("yolov8n.yaml", verbose=False).train()
    x = torch.rand(16, 3, imgsz, imgsz)
    gammas = [b.weight for b in bn_layers(m)]
    fb = []
    for _ in range(3):
        t0 = time.perf_counter()
        _tensors_sum(m(x)).backward()
        fb.append(time.perf_counter() - t0)
    l1 = []
    for _ in range(50):
        t0 = time.perf_counter()
        add_l1_subgradient(gammas, sr)
        l1.append(time.perf_counter() - t0)
    return {
        "data": common.rel(data), "imgsz": imgsz, "epochs": epochs, "pairs": pairs, "sr": sr,
        "train_args": train, "runs": runs, "median_epoch_s": per_epoch, "median_wall_s": wall,
        "overhead_pct_epoch": 100 * (per_epoch["sparse"] / per_epoch["plain"] - 1),
        "overhead_pct_wall": 100 * (wall["sparse"] / wall["plain"] - 1),
        "l1_subgradient_ms": 1e3 * statistics.median(l1), "forward_backward_b16_ms": 1e3 * statistics.median(fb),
        "bn_gamma_tensors": len(gammas), "bn_gamma_values": sum(g.numel() for g in gammas),
    }


# --------------------------------------------------------------------------------------------- 3. COCO eval time
def bench_eval(repeats: int, imgsz: int) -> dict[str, Any]:
    from yolo_prune.data import resolve_data
    from yolo_prune.evaluate import coco_eval, evaluate

    data = common.coco128_full()
    out_dir = common.WORK / "cost_eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = evaluate(str(common.WEIGHTS), data, imgsz=imgsz, batch=8, save_dir=out_dir)
    gt = resolve_data(data).val_json
    res: dict[str, Any] = {"data": "coco128 (128 images, 939 annotations)", "imgsz": imgsz,
                           "n_predictions": v.n_predictions, "validator_seconds": v.val_seconds, "backends": {}}
    for backend in ("pycocotools", "faster"):
        times, m = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            m = coco_eval(gt, v.predictions_json, backend=backend)
            times.append(time.perf_counter() - t0)
        res["backends"][m["backend"]] = {"seconds": times, "median_s": statistics.median(times),
                                         "map50_95": m["map50_95"], "map50": m["map50"]}
        log(f"coco_eval {m['backend']}: median {statistics.median(times):.3f} s, mAP50-95 {m['map50_95']:.4f}")
    b = res["backends"]
    res["speedup"] = b["pycocotools"]["median_s"] / b["faster-coco-eval"]["median_s"]
    res["map_abs_diff"] = abs(b["pycocotools"]["map50_95"] - b["faster-coco-eval"]["map50_95"])
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
                                     prog="python -m bench.cost")
    parser.add_argument("--quick", action="store_true",
                        help="about two minutes: yolov8n only, 1 repeat, 1 pair of 2-epoch runs; writes cost_quick.json")
    parser.add_argument("--parts", nargs="+", choices=["prune", "sparse", "eval"], default=["prune", "sparse", "eval"])
    parser.add_argument("--scales", nargs="+", help="yolov8 scales for the pruning time (default n s m; quick: n)")
    parser.add_argument("--repeats", type=int, help="repeats of each timing (default 3; quick: 1)")
    parser.add_argument("--target", type=float, default=0.5, help="MACs fraction kept when timing the pruning")
    parser.add_argument("--prune-threads", nargs="+", type=int, default=[2, 1],
                        help="torch intra-op threads for the pruning timings, one series per value (default 2 1)")
    parser.add_argument("--method", default="bn")
    parser.add_argument("--epochs", type=int, help="epochs per training run, sparse part (default 4; quick: 2)")
    parser.add_argument("--pairs", type=int, help="alternating plain/sparse run pairs (default 2; quick: 1)")
    parser.add_argument("--sr", type=float, default=0.01)
    parser.add_argument("--imgsz", type=int, default=320, help="training image size (sparse part)")
    parser.add_argument("--eval-imgsz", type=int, default=640)
    parser.add_argument("--name", help="result name (default cost / cost_quick)")
    args = parser.parse_args(argv)
    defaults = {"scales": ["n", "s", "m"], "repeats": 3, "epochs": 4, "pairs": 2}
    if args.quick:
        defaults.update(scales=["n"], repeats=1, epochs=2, pairs=1)
    for key, value in defaults.items():  # explicit options win over --quick
        if getattr(args, key) is None:
            setattr(args, key, value)
    name = args.name or ("cost_quick" if args.quick else "cost")
    payload: dict[str, Any] = {"benchmark": "cost", "command": common.command_line(), "machine": common.machine(),
                               "busy_processes_at_start": common.busy_processes(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    if "prune" in args.parts:
        payload["prune"] = bench_prune(args.scales, args.repeats, args.target, args.method, args.prune_threads)
        common.write_result(name, payload)
    if "sparse" in args.parts:
        payload["sparse"] = bench_sparse(args.epochs, args.pairs, args.sr, args.imgsz)
        common.write_result(name, payload)
    if "eval" in args.parts:
        payload["eval"] = bench_eval(max(args.repeats, 3), args.eval_imgsz)
    payload["total_seconds"] = round(time.perf_counter() - t0, 1)
    payload["loadavg_end"] = list(os.getloadavg())
    path = common.write_result(name, payload)
    log(f"done in {payload['total_seconds']:.0f} s -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
