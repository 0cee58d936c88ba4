"""Real measured speedup: CPU latency of the dense and pruned yolov8n, torch eager and onnxruntime.

The fixture's COCO yolov8n (``../shared/fixtures/weights``) is pruned with ``yolo_prune.prune`` (``method``, default
``bn``; no fine-tune, speed does not depend on the weights' values) to 0.7 / 0.5 / 0.35 of its MACs, once with
``round_to=8`` and once with ``round_to=None``. All models of one image size are timed in ONE interleaved run of
``yolo_prune.bench.measure_latency`` (batch 1, random input, rotating rounds), so the reported ratio
``median(pruned) / median(dense)`` compares passes taken under the same machine load. Each (imgsz, threads) pair
is one such run. Next to the latency ratio: the MACs ratio and the params ratio.

Workaround for a yolo-prune bug: ``measure_latency(threads=N)`` sets torch's threads BEFORE it exports the ONNX
models, and every ultralytics export calls ``select_device("cpu")``, which resets ``torch.set_num_threads`` to
ultralytics' ``NUM_THREADS`` (cpu_count - 1 = 1 on this machine); so torch eager was always timed with ONE thread.
This script sets ``ultralytics.utils.torch_utils.NUM_THREADS`` to N for the duration of each run so the reset keeps N.

Result: ``bench/results/latency[_quick].json``; tables with ``python -m bench.render``.
This script was ``bench/latency.py`` (the name of ``yolo_prune/latency.py``, hence the rename): the commands
recorded in results made before issue 20 say ``python bench/latency.py``.

``--compare`` (issue 15): MACs targets against measured-latency targets. For the fixture @640 (mAP on the
coco128 split's val @320) and the bccd-fine-tuned yolov8n @416 (``common.bccd_dense()``, bccd val @416), on each
runtime (onnxruntime, OpenVINO) and thread count (1, 2): the runtime's latency table (``yolo_prune.latency``,
cached in ``bench/work/cache/latency``) and its validation on random pruned variants (predicted vs measured), then
four pruned models (method bn, compensate lstsq on 32 train images, no fine-tune):

* ``macs``: ``target_macs=0.5 round_to=8`` (the project's default before issue 15);
* ``macs_auto``: ``target_macs=0.5 round_to=auto`` (the same MACs, widths on the runtime's quanta);
* ``latency``: ``target_latency=0.5 round_to=auto`` (the default: channels ranked by importance, as for MACs);
* ``latency_aware``: the same with ``latency_aware=True`` (ranked by importance per millisecond a channel costs).

All four and the dense model are exported and timed in one interleaved run (clock: CPU time with 1 thread, wall
with 2; medians). Columns: measured latency ratio, the table's predicted ratio, MACs ratio, mAP50-95 right after
pruning. Result: ``bench/results/latency_target[_quick].json``.

``--finetune EPOCHS --name <compare result>`` then gives the chosen ``--arms`` (default ``macs latency``) the same
fine-tune (``yolo_prune.finetune``, batch 16, ``--seed``, distilled from the dense model) and adds mAP50-95 after it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import warnings

from bench import common


ARMS = ("macs", "macs_auto", "latency", "latency_aware")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def ultralytics_threads(n: int):
    """Make ultralytics' ``select_device`` (called by every export) set torch to ``n`` threads instead of its own
    ``NUM_THREADS`` (cpu_count - 1), so ``measure_latency(threads=n)`` really times torch with ``n`` threads."""
    import ultralytics.utils.torch_utils as tu

    old = tu.NUM_THREADS
    tu.NUM_THREADS = n
    try:
        yield
    finally:
        tu.NUM_THREADS = old


def build_models(targets: list[float], round_tos: list[int | None], method: str) -> dict[str, dict]:
    """name -> {model, target, round_to, prune_seconds}; the dense model first (the latency reference)."""
    from yolo_prune.models import load_model
    from yolo_prune.stages.prune import prune

    models = {"dense": {"model": load_model(str(common.WEIGHTS)).model, "target": 1.0, "round_to": None}}
    for rt in round_tos:
        for t in targets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = prune(str(common.WEIGHTS), method=method, target_macs=t, round_to=rt, imgsz=640, save=False)
            name = f"{method}{t}_r{rt if rt else 'none'}"
            models[name] = {"model": p.model.model, "target": t, "round_to": rt, "prune_seconds": p.seconds}
            log(f"pruned {name}: MACs ratio {p.macs_ratio:.3f} ({p.seconds:.2f} s)")
    return models


def _finish(name: str, payload: dict, t_start: float) -> int:
    """Record the total time and the final load average, write the result."""
    payload["total_seconds"] = round(time.perf_counter() - t_start, 1)
    payload["loadavg_end"] = list(os.getloadavg())
    path = common.write_result(name, payload)
    log(f"done in {payload['total_seconds'] / 60:.1f} min -> {path}")
    return 0


def _evaluate(ckpt, data, imgsz: int, save_dir, cache: dict) -> dict:
    """mAP of a checkpoint (memoised by path: the macs arm is the same for every runtime)."""
    from yolo_prune.evaluate import evaluate

    key = (str(ckpt), imgsz)
    if key not in cache:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = evaluate(str(ckpt), str(data), imgsz=imgsz, batch=8, save_dir=save_dir)
        cache[key] = {"map50_95": v.map50_95, "map50": v.map50}
    return cache[key]


def _floor(table) -> float:
    """Predicted latency ratio with every prunable conv side at a quarter of its width (max_layer_ratio 0.75)."""
    import math

    widths = {n: (math.ceil(c.spec.cin / 4) if c.spec.prune_in else c.spec.cin,
                  math.ceil(c.spec.cout / 4) if c.spec.prune_out else c.spec.cout) for n, c in table.convs.items()}
    return table.predict_ms(widths) / table.dense_ms


def compare(args: argparse.Namespace) -> int:
    """``--compare``: MACs targets vs latency targets on onnxruntime / OpenVINO (see the module docstring)."""
    import numpy as np

    from yolo_prune.latency import build_table, measure_models, validate_table
    from yolo_prune.models import load_model
    from yolo_prune.stages.prune import prune

    name = args.name or ("latency_target_quick" if args.quick else "latency_target")
    payload = {"benchmark": "latency_target", "command": common.command_line(), "machine": common.machine(),
               "busy_processes_at_start": common.busy_processes(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "target": args.target, "method": args.method, "runs": args.runs, "variants": args.variants,
               "datasets": {}}
    t_start = time.perf_counter()
    maps: dict = {}
    for ds in args.datasets:
        if ds == "fixture":
            weights, data, imgsz, val_imgsz = common.WEIGHTS, common.coco128_split(96), args.imgsz or 640, 320
        elif ds == "bccd":
            weights, data, imgsz, val_imgsz = common.bccd_dense(), common.bccd(), args.imgsz or 416, 416
        else:
            raise SystemExit(f"unknown dataset {ds}")
        work = common.WORK / "latency_target" / ds
        common_kw = dict(method=args.method, data=str(data), imgsz=imgsz, project=str(work), exist_ok=True,
                         calib_images=32, seed=0)
        entry = payload["datasets"].setdefault(ds, {"imgsz": imgsz, "val_imgsz": val_imgsz, "weights": str(weights),
                                                    "data": str(data), "settings": []})
        entry["dense_map"] = _evaluate(weights, data, val_imgsz, work / "val_dense", maps)
        log(f"{ds}: dense mAP50-95 {entry['dense_map']['map50_95']:.3f}; pruning the MACs arm")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arms = {"macs": prune(str(weights), target_macs=args.target, round_to=8, name="macs", **common_kw)}
        for runtime in args.runtimes:
            for threads in args.threads:
                setting = {"runtime": runtime, "threads": threads, "loadavg_1min_before": os.getloadavg()[0],
                           "busy_processes_before": common.busy_processes()}
                t0 = time.perf_counter()
                log(f"{ds}: latency table {runtime}, {threads} thread(s) @{imgsz}")
                table = build_table(str(weights), imgsz=imgsz, runtime=runtime, threads=threads, progress=True)
                if args.variants and (not table.validation or table.validation.get("n") != args.variants):
                    log(f"{ds}: validating the table on {args.variants} random pruned variants")
                    validate_table(str(weights), table, n=args.variants, runs=args.runs)
                tag = f"{runtime}_t{threads}"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run_arms = dict(arms)
                    if "macs_auto" in args.arms:
                        run_arms["macs_auto"] = prune(str(weights), target_macs=args.target, round_to="auto",
                                                      runtime=runtime, threads=threads, latency_table=table,
                                                      name=f"macs_auto_{tag}", **common_kw)
                    if "latency" in args.arms:
                        run_arms["latency"] = prune(str(weights), target_latency=args.target, round_to="auto",
                                                    runtime=runtime, threads=threads, latency_table=table,
                                                    verify_latency=False, name=f"latency_{tag}", **common_kw)
                    if "latency_aware" in args.arms:
                        run_arms["latency_aware"] = prune(str(weights), target_latency=args.target,
                                                          round_to="auto", runtime=runtime, threads=threads,
                                                          latency_table=table, latency_aware=True,
                                                          verify_latency=False, name=f"latency_aware_{tag}",
                                                          **common_kw)
                log(f"{ds}: timing dense + {', '.join(run_arms)} ({args.runs} interleaved runs)")
                models = {"dense": load_model(str(weights)).model, **{k: r.model.model for k, r in run_arms.items()}}
                times = measure_models(models, runtime=runtime, imgsz=imgsz, threads=threads, runs=args.runs)
                med = {k: float(np.median(v)) for k, v in times.items()}
                log(f"{ds}: mAP of the pruned models @{val_imgsz}")
                rows = []
                for arm, m in models.items():
                    t = np.asarray(times[arm])
                    res = run_arms.get(arm)
                    rows.append({
                        "arm": arm, "checkpoint": str(res.checkpoint) if res else str(weights),
                        "median_ms": med[arm], "ratio": med[arm] / med["dense"],
                        "spread": float((np.percentile(t, 90) - np.percentile(t, 10)) / med[arm]),
                        "predicted_ratio": (table.predict_model(m) / table.dense_ms) if arm != "dense" else 1.0,
                        "macs_ratio": res.macs_ratio if res else 1.0,
                        "params_ratio": res.params_ratio if res else 1.0,
                        "map": (_evaluate(res.checkpoint, data, val_imgsz, res.save_dir / "val", maps) if res
                                else entry["dense_map"]),
                    })
                v = table.validation or {}
                setting.update(
                    rows=rows, seconds=round(time.perf_counter() - t0, 1), loadavg_1min_after=os.getloadavg()[0],
                    clock=table.clock,
                    table={"path": str(table.path), "dense_ms": table.dense_ms, "conv_ms": table.conv_ms,
                           "fixed_ms": table.fixed_ms, "fixed_share": table.fixed_share, "scale": table.scale,
                           "common_quantum": table.common_quantum, "build_seconds": table.build_seconds,
                           "floor_ratio": _floor(table), "calibration": table.calibration,
                           "validation": {k: x for k, x in v.items() if k != "variants"},
                           "validation_variants": v.get("variants")})
                entry["settings"].append(setting)
                for r in rows:
                    print(f"  {ds} {runtime} t{threads} {r['arm']:10s} ratio {r['ratio']:.3f} (pred "
                          f"{r['predicted_ratio']:.3f}) MACs {r['macs_ratio']:.3f} mAP {r['map']['map50_95']:.3f}",
                          flush=True)
                common.write_result(name, payload)
    return _finish(name, payload, t_start)


def finetune_arms(args: argparse.Namespace) -> int:
    """``--finetune EPOCHS [--seed S]``: the same fine-tune for the chosen arms of a ``--compare`` result.

    Every arm's pruned checkpoint is trained ``EPOCHS`` epochs with one recipe: ``yolo_prune.finetune`` on the
    dataset's train split at its mAP image size, batch 16, seed ``S``, distilled from the dense model (output
    distillation, the pipeline's default ``teacher=auto``). A checkpoint shared by several settings (the ``macs``
    arm) is trained once. Each row records every seed's result in ``finetunes`` and their mean in
    ``map_finetuned``."""
    import yolo_prune as yp

    name = args.name or "latency_target"
    res = common.read_result(name)
    if not res:
        raise SystemExit(f"no bench/results/{name}.json: run --compare first")
    t_start = time.perf_counter()
    done: dict[str, dict] = {}
    for ds, entry in res["datasets"].items():
        if args.datasets and ds not in args.datasets:
            continue
        work = common.WORK / "latency_target" / ds
        data = str(common.resolve(entry["data"]))
        for st in entry["settings"]:
            for row in st["rows"]:
                if row["arm"] not in args.arms:
                    continue
                if not row.get("checkpoint"):
                    raise SystemExit(f"{name}: rows without a recorded checkpoint (an older --compare run)")
                ckpt = common.resolve(row["checkpoint"])
                key = str(ckpt)
                if key not in done:
                    run = f"{ckpt.parent.parent.name}_e{args.finetune}" + (f"_s{args.seed}" if args.seed else "")
                    log(f"{ds}: fine-tuning {ckpt} for {args.finetune} epochs @{entry['val_imgsz']} -> {run}")
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        tr = yp.finetune(str(ckpt), data, epochs=args.finetune, imgsz=entry["val_imgsz"],
                                         batch=16, seed=args.seed, teacher=str(common.resolve(entry["weights"])),
                                         project=str(work / "finetune"), name=run, exist_ok=True, val=False)
                        v = yp.validate(str(tr.last), data, imgsz=entry["val_imgsz"])
                    done[key] = {"map50_95": v.map50_95, "map50": v.map50, "epochs": args.finetune,
                                 "checkpoint": str(tr.last), "seconds": round(time.perf_counter() - t0, 1)}
                    log(f"{ds}: {run}: mAP50-95 {v.map50_95:.3f} after {args.finetune} epochs")
                runs = row.setdefault("finetunes", {})
                runs[str(args.seed)] = done[key]
                row["map_finetuned"] = {k: sum(r[k] for r in runs.values()) / len(runs) for k in ("map50_95", "map50")}
                row["finetune"] = {"epochs": args.finetune, "seeds": sorted(int(x) for x in runs),
                                   "recipe": "finetune(batch=16, teacher=dense, distill=output)"}
                common.write_result(name, res)
    res.setdefault("finetune_commands", []).append(common.command_line())
    common.write_result(name, res)
    log(f"fine-tunes done in {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
                                     prog="python -m bench.speedup")
    parser.add_argument("--compare", action="store_true",
                        help="issue 15: target_macs vs target_latency on onnxruntime/OpenVINO (latency_target.json)")
    parser.add_argument("--finetune", type=int, metavar="EPOCHS",
                        help="fine-tune the --arms of the --compare result --name, same recipe for each")
    parser.add_argument("--arms", nargs="+", choices=ARMS,
                        help="--compare: pruned arms (default all); --finetune: arms to fine-tune (macs latency)")
    parser.add_argument("--seed", type=int, default=0, help="--finetune: training seed (%(default)s)")
    parser.add_argument("--datasets", nargs="+", help="--compare: fixture bccd (quick: fixture)")
    parser.add_argument("--runtimes", nargs="+", help="--compare: onnxruntime openvino (quick: onnxruntime)")
    parser.add_argument("--target", type=float, default=0.5, help="--compare: target_macs and target_latency")
    parser.add_argument("--variants", type=int, help="--compare: random variants validating each table (10; quick 3)")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="default mode: wall clock, or process CPU time (1 thread: robust on a busy machine)")
    parser.add_argument("--quick", action="store_true",
                        help="about a minute: imgsz 320 only, target 0.5 only, 15 runs; writes latency_quick.json")
    parser.add_argument("--imgsz", nargs="+", type=int, help="default 640 320 (quick: 320)")
    parser.add_argument("--targets", nargs="+", type=float, help="MACs fractions (default 0.7 0.5 0.35; quick: 0.5)")
    parser.add_argument("--round-to", nargs="+", default=["8", "none"], help="round_to values ('none' = None)")
    parser.add_argument("--method", default="bn", help="pruning criterion (speed hardly depends on it)")
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--threads", nargs="+", type=int,
                        help="intra-op threads of torch and onnxruntime; one interleaved run per value (default 2 1; "
                             "quick: 2)")
    parser.add_argument("--runs", type=int, help="timed runs per model and backend (default 50; quick: 15)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default 10; quick: 3)")
    parser.add_argument("--name", help="result name (default latency / latency_quick)")
    args = parser.parse_args(argv)
    if args.finetune:
        args.arms = args.arms or ["macs", "latency"]
        return finetune_arms(args)
    args.arms = args.arms or list(ARMS)
    if args.compare:
        cdefaults = {"datasets": ["fixture", "bccd"], "runtimes": ["onnxruntime", "openvino"], "threads": [1, 2],
                     "variants": 10, "runs": 20}
        if args.quick:
            cdefaults.update(datasets=["fixture"], runtimes=["onnxruntime"], threads=[1], variants=3, runs=10,
                             imgsz=[320])
        for key, value in cdefaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.imgsz = args.imgsz[0] if args.imgsz else None
        return compare(args)
    defaults = {"imgsz": [640, 320], "targets": [0.7, 0.5, 0.35], "runs": 50, "warmup": 10, "threads": [2, 1]}
    if args.quick:
        defaults.update(imgsz=[320], targets=[0.5], runs=15, warmup=3, threads=[2])
    for key, value in defaults.items():  # explicit options win over --quick
        if getattr(args, key) is None:
            setattr(args, key, value)
    round_tos = [None if str(r).lower() in ("none", "null", "0") else int(r) for r in args.round_to]
    name = args.name or ("latency_quick" if args.quick else "latency")

    from yolo_prune.bench import measure_latency
    from yolo_prune.stats import model_stats

    payload = {"benchmark": "latency", "torch_threads_workaround": True, "clock": args.clock, "command": common.command_line(), "machine": common.machine(),
               "busy_processes_at_start": common.busy_processes(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "method": args.method, "runs": args.runs, "warmup": args.warmup, "batch": 1, "models": {},
               "runs_by_setting": []}
    t_start = time.perf_counter()
    models = build_models(args.targets, round_tos, args.method)
    for imgsz in args.imgsz:
        stats = {n: model_stats(m["model"], imgsz=imgsz) for n, m in models.items()}
        for n, m in models.items():
            entry = payload["models"].setdefault(n, {"target_macs": m["target"], "round_to": m["round_to"],
                                                     "prune_seconds": m.get("prune_seconds"),
                                                     "params": stats[n].params})
            entry[f"macs@{imgsz}"] = stats[n].macs
            entry[f"macs_ratio@{imgsz}"] = stats[n].macs / stats["dense"].macs
            entry["params_ratio"] = stats[n].params / stats["dense"].params
        for threads in args.threads:
            log(f"imgsz {imgsz}, threads {threads}: {len(models)} models x {args.backends}, {args.runs} runs")
            busy = common.busy_processes()
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            with warnings.catch_warnings(), ultralytics_threads(threads):
                warnings.simplefilter("ignore")
                res = measure_latency({n: m["model"] for n, m in models.items()}, imgsz=imgsz,
                                      backends=args.backends, runs=args.runs, warmup=args.warmup, threads=threads,
                                      progress=False, clock=args.clock)
            rows = [dict(r.__dict__) for r in res.entries]
            for r in rows:
                r["macs_ratio"] = payload["models"][r["model"]][f"macs_ratio@{imgsz}"]
                r["threads"] = threads
            payload["runs_by_setting"].append({"imgsz": imgsz, "threads": threads, "seconds": round(time.perf_counter() - t0, 1),
                                               "loadavg_1min_before": load0, "loadavg_1min_after": os.getloadavg()[0],
                                               "busy_processes_before": busy, "rows": rows})
            print(res, flush=True)
            common.write_result(name, payload)
    return _finish(name, payload, t_start)


if __name__ == "__main__":
    raise SystemExit(main())
