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

Result: ``bench/results/latency[_quick].json``; tables with ``python bench/render.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


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
    from yolo_prune.pruning import prune

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
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

    payload = {"benchmark": "latency", "torch_threads_workaround": True, "command": common.command_line(), "machine": common.machine(),
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
                                      progress=False)
            rows = [dict(r.__dict__) for r in res.entries]
            for r in rows:
                r["macs_ratio"] = payload["models"][r["model"]][f"macs_ratio@{imgsz}"]
                r["threads"] = threads
            payload["runs_by_setting"].append({"imgsz": imgsz, "threads": threads, "seconds": round(time.perf_counter() - t0, 1),
                                               "loadavg_1min_before": load0, "loadavg_1min_after": os.getloadavg()[0],
                                               "busy_processes_before": busy, "rows": rows})
            print(res, flush=True)
            common.write_result(name, payload)
    payload["total_seconds"] = round(time.perf_counter() - t_start, 1)
    payload["loadavg_end"] = list(os.getloadavg())
    path = common.write_result(name, payload)
    log(f"done in {payload['total_seconds']:.0f} s -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
