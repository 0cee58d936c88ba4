"""INT8 on top of pruning (issue 21): a dense model and a pruned one of it, each exported FP32 and INT8, to ONNX
(onnxruntime QDQ) and OpenVINO (NNCF), static ``--imgsz`` (640), batch 1.

For each of the 8 exports: COCO mAP50-95 / mAP50 on the val split of ``--data`` through ``yolo_prune.validate``
of the export itself (ultralytics' AutoBackend, the same evaluator as a ``.pt``), the file size, and the latency
ratio against the dense FP32 export of the same format. Latency: per runtime (onnxruntime; OpenVINO at the CPU
plugin's default inference precision, bf16 where the CPU has it) and per thread count (``--threads``, default 1 and
2), the four exports of that format in interleaved rotating rounds of one run (``yolo_prune.bench.interleaved_times``,
the sessions built as ``yolo_prune.bench`` builds them), on one seeded uniform-random input; medians.

INT8 exports use ``yolo_prune.export(..., int8=True, data=--data, calib_images=--calib)``: calibration on the train
split, Detect's decode in float.

``--max-map-drop D`` adds a ninth export, the pruned model's accuracy-controlled OpenVINO INT8 (row key
``pruned_int8ac_openvino``: ``yolo_prune.export(..., int8=True, max_map_drop=D)``, NNCF keeping layers in FP32 until
the mAP50-95 on ``--calib`` val images is at most D below FP32's), timed with the other OpenVINO exports; its
``int8_report.json`` (FP32 / PTQ / final mAP on that sample, the layers kept in FP32) goes into the row.

Defaults: ``--dense`` = ``common.bccd_dense()`` (the COCO fixture fine-tuned 12 epochs on bccd @416; trained if
absent), ``--data`` = bccd (COCO json form), ``--pruned`` a pipeline's fine-tuned ``best.pt`` (or its run folder).

    python -m bench.int8 --pruned bench/work/bccd_pipeline/portable_f16_nbs16
    python -m bench.int8 --pruned P --smoke      # imgsz 128, 8 calibration images, 5 runs: checks the script only
    python -m bench.int8 --pruned bench/work/bccd_pipeline/portable_f16_nbs16 --max-map-drop 0.01

Results: ``bench/results/int8.json`` (``int8_smoke.json`` with ``--smoke``; ``--name`` for another); exports in
``bench/work/<name>/`` are reused unless ``--fresh``. Run it on a quiet machine: latency with 2 threads on 2 shared
cores measures the other jobs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench import common

MODELS = ("dense", "pruned")
PRECISIONS = ("fp32", "int8")
FORMATS = ("onnx", "openvino")
RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino"}
AC = "pruned_int8ac_openvino"  # the accuracy-controlled arm (--max-map-drop)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def find_pruned(path: Path) -> Path:
    """``path`` if it is a checkpoint, else the fine-tuned ``best.pt`` of the pipeline run folder ``path``."""
    if path.is_file():
        return path
    found = sorted(path.glob("finetune/**/weights/best.pt")) or sorted(path.glob("**/weights/best.pt"))
    if not found:
        raise SystemExit(f"no checkpoint at {path} (and no finetune/**/weights/best.pt under it)")
    return found[-1]


def key(model: str, precision: str, fmt: str) -> str:
    return f"{model}_{precision}_{fmt}"


def export_name(stem: str, precision: str, fmt: str) -> str:
    """What ``yolo_prune.export`` names the export of ``<stem>.pt``."""
    tag = "_int8" if precision == "int8" else ""
    return f"{stem}{tag}.onnx" if fmt == "onnx" else f"{stem}{tag}_openvino_model"


def export_all(checkpoints: dict[str, Path], data: Path, work: Path, imgsz: int, calib: int) -> dict[str, Path]:
    """The 8 exports (model x precision x format) under ``work/<model>/``, an existing one reused."""
    import yolo_prune as yp

    out = {}
    for model, ckpt in checkpoints.items():
        for precision in PRECISIONS:
            for fmt in FORMATS:
                path = work / model / export_name(ckpt.stem, precision, fmt)
                if not path.exists():
                    log(f"export {model} {precision} {fmt} ...")
                    int8 = {"int8": True, "data": str(data), "calib_images": calib} if precision == "int8" else {}
                    path = yp.export(str(ckpt), format=fmt, imgsz=imgsz, batch=1, save_dir=work / model, **int8)
                out[key(model, precision, fmt)] = Path(path)
    return out


def export_controlled(ckpt: Path, data: Path, work: Path, imgsz: int, calib: int, max_map_drop: float) -> Path:
    """The accuracy-controlled OpenVINO INT8 export of ``ckpt`` under ``work/pruned_ac/``, an existing one reused."""
    import yolo_prune as yp

    path = work / "pruned_ac" / export_name(ckpt.stem, "int8", "openvino")
    if not path.exists():
        log(f"export pruned int8 openvino, accuracy control max_map_drop={max_map_drop} ...")
        path = yp.export(str(ckpt), format="openvino", imgsz=imgsz, batch=1, save_dir=work / "pruned_ac", int8=True,
                         data=str(data), calib_images=calib, max_map_drop=max_map_drop)
    return Path(path)


def size_mb(path: Path) -> float:
    """Size of an export on disk (an OpenVINO folder: its .xml and .bin)."""
    files = [f for f in path.iterdir() if f.suffix in (".xml", ".bin")] if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files) / 1e6


def accuracy(exports: dict[str, Path], data: Path, imgsz: int) -> dict[str, dict[str, Any]]:
    """mAP of every export on the val split of ``data`` (``yolo_prune.validate`` of the export), and its size."""
    import yolo_prune as yp

    rows = {}
    for k, path in exports.items():
        log(f"val {k} ...")
        with common.Timer() as t:
            v = yp.validate(str(path), str(data), imgsz=imgsz, batch=1)
        rows[k] = {"path": str(path), "size_mb": round(size_mb(path), 3), "map50_95": round(v.map50_95, 5),
                   "map50": round(v.map50, 5), "imgsz": v.imgsz, "val_seconds": round(t.seconds, 1)}
        report = path / "int8_report.json" if path.is_dir() else None
        if report is not None and report.is_file():
            rows[k]["accuracy_control"] = json.loads(report.read_text(encoding="utf-8"))
    return rows


def _runner(fmt: str, path: Path, x: np.ndarray, threads: int) -> Callable[[], Any]:
    """One inference of the export ``path`` on ``x``, built as ``yolo_prune.bench`` builds its sessions."""
    from yolo_prune.bench import onnx_session, openvino_compiled

    if fmt == "onnx":
        session = onnx_session(path, threads)
        feed = {session.get_inputs()[0].name: x}
        return lambda: session.run(None, feed)
    import openvino as ov

    request = openvino_compiled(next(path.glob("*.xml")), threads).create_infer_request()
    request.set_input_tensor(ov.Tensor(x))
    return request.infer


def latency(exports: dict[str, Path], imgsz: int, threads: list[int], runs: int, warmup: int) -> list[dict[str, Any]]:
    """Per format and thread count: the four exports timed in interleaved rounds, ratios to dense FP32."""
    import torch

    from yolo_prune.bench import interleaved_times, summarise

    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0)).numpy()
    rows = []
    for fmt in FORMATS:
        names = [key(m, p, fmt) for m in MODELS for p in PRECISIONS]  # dense FP32 first: the reference
        names += [AC] if fmt == "openvino" and AC in exports else []
        for n in threads:
            log(f"latency {RUNTIME[fmt]} threads={n} ...")
            runners = {(name, fmt): _runner(fmt, exports[name], x, n) for name in names}
            times = interleaved_times(runners, runs=runs, warmup=warmup, progress=False,
                                      label=f"{fmt} {n} threads")
            del runners
            for r in summarise(times, names, [fmt], imgsz):
                rows.append({"export": r.model, "runtime": RUNTIME[fmt], "threads": n,
                             "median_ms": round(r.median_ms, 2), "p90_ms": round(r.p90_ms, 2),
                             "ratio_vs_dense_fp32": round(r.ratio_vs_reference, 4)})
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, prog="python -m bench.int8")
    ap.add_argument("--pruned", type=Path, required=True, help="pruned checkpoint, or a pipeline run folder")
    ap.add_argument("--dense", type=Path, default=None, help="dense checkpoint (default: common.bccd_dense())")
    ap.add_argument("--data", type=Path, default=None, help="data yaml (default: bccd, COCO json form)")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--calib", type=int, default=64, help="calibration images (default %(default)s)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="imgsz 128, 8 calibration images, 5 runs (result int8_smoke)")
    ap.add_argument("--name", default=None, help="result name (default int8, int8_smoke with --smoke)")
    ap.add_argument("--max-map-drop", type=float, default=None,
                    help="add the pruned accuracy-controlled OpenVINO INT8 arm with this max_map_drop (e.g. 0.01)")
    ap.add_argument("--fresh", action="store_true", help="export again instead of reusing bench/work/<name>/")
    args = ap.parse_args(argv)
    if args.smoke:
        args.imgsz, args.calib, args.runs, args.warmup = 128, 8, 5, 2
    args.name = args.name or ("int8_smoke" if args.smoke else "int8")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    dense = (args.dense or common.bccd_dense()).resolve()
    pruned = find_pruned(args.pruned).resolve()
    data = (args.data or common.bccd()).resolve()
    work = common.WORK / args.name
    if args.fresh and work.exists():
        shutil.rmtree(work)
    payload: dict[str, Any] = {"benchmark": "int8", "command": common.command_line(), "machine": common.machine(),
                               "busy_processes_at_start": common.busy_processes(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "imgsz": args.imgsz, "batch": 1,
                               "calib_images": args.calib, "runs": args.runs, "warmup": args.warmup,
                               "dense": str(dense), "pruned": str(pruned), "data": str(data),
                               "max_map_drop": args.max_map_drop}
    with common.Timer() as t:
        exports = export_all({"dense": dense, "pruned": pruned}, data, work, args.imgsz, args.calib)
    payload["export_seconds"] = round(t.seconds, 1)
    if args.max_map_drop is not None:
        with common.Timer() as t:
            exports[AC] = export_controlled(pruned, data, work, args.imgsz, args.calib, args.max_map_drop)
        payload["export_ac_seconds"] = round(t.seconds, 1)
    payload["exports"] = accuracy(exports, data, args.imgsz)
    common.write_result(args.name, payload)
    payload["latency"] = latency(exports, args.imgsz, args.threads, args.runs, args.warmup)
    payload["busy_processes_at_end"] = common.busy_processes()
    path = common.write_result(args.name, payload)
    log(f"written {path}")
    from bench.render import block_int8

    print(block_int8(args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
