"""The pipeline's INT8 stage: the final model exported INT8 for a runtime, scored and timed against the dense model.

:func:`quantize_stage` exports the final (pruned, fine-tuned) model with ``int8=True`` for ``runtime``
(``openvino`` -> an NNCF-quantized OpenVINO folder, ``onnxruntime`` -> an onnxruntime QDQ ``.onnx``), calibrated on
the pipeline's data (:mod:`yolo_prune.quantize`), evaluates it with the same COCO evaluator as the checkpoints
(:func:`yolo_prune.evaluate.evaluate`), exports the dense input model in FP32 for the same runtime, and times both
exports in interleaved rounds (:func:`yolo_prune.bench.interleaved_times`). The result is typed
(:class:`QuantizeResult`) and JSON-able (recorded as the pipeline's stage ``quantize``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..bench import export_runner, interleaved_times
from ..deploy import export_model
from ..errors import UsageError
from ..evaluate import evaluate
from ..options import BenchOptions
from ..quantize import check_int8

FORMATS = {"openvino": "openvino", "onnxruntime": "onnx"}  # runtime -> export format


@dataclasses.dataclass
class QuantizeResult:
    """The INT8 export of the final model against the dense model's FP32 export on the same runtime."""

    runtime: str
    export: str  # the INT8 export (.onnx file or OpenVINO folder)
    dense_export: str  # the dense model's FP32 export
    map50_95: float
    map50: float
    size_mb: float  # of the INT8 export
    dense_size_mb: float  # of the dense FP32 export
    latency_ms: float  # median on runtime
    dense_latency_ms: float
    threads: int | None
    runs: int

    @property
    def latency_ratio(self) -> float:
        return self.latency_ms / self.dense_latency_ms

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "latency_ratio": self.latency_ratio}


def check_quantize(int8: bool, runtime: str, data: Any) -> str | None:
    """The export format of the INT8 stage (None without ``int8``); a one-line refusal for what cannot work:
    runtime=torch (no INT8 path), or OpenVINO / NNCF missing."""
    if not int8:
        return None
    if runtime not in FORMATS:
        raise UsageError(f"int8=True quantizes for runtime=openvino or runtime=onnxruntime, not runtime={runtime} "
                         "(torch has no INT8 export here)")
    check_int8(FORMATS[runtime], data)
    return FORMATS[runtime]


def export_size_mb(path: str | Path) -> float:
    """Size in MB (1e6 bytes) of an export: a file, or every file of an OpenVINO folder."""
    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files) / 1e6


def time_exports(exports: dict[str, Path], *, imgsz: int, threads: int | None, runs: int, warmup: int, seed: int,
                 progress: bool) -> dict[str, float]:
    """Median milliseconds of each export on one fixed random image, timed in interleaved rounds (with one thread on
    the process's CPU clock, which hardly minds other processes; else the wall clock)."""
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed)).numpy()
    runners = {name: export_runner(path, x, threads) for name, path in exports.items()}
    times = interleaved_times(runners, runs=runs, warmup=warmup, progress=progress, label="bench int8",
                              clock="cpu" if threads == 1 else "wall")
    return {name: float(np.median(t)) for name, t in times.items()}


def quantize_stage(final: Any, dense: Any, data: Any, *, runtime: str, save_dir: Path, imgsz: int,
                   calib_images: int, seed: int, threads: int | None = None, bench: BenchOptions | None = None,
                   val_kw: dict[str, Any] | None = None, progress: bool = False) -> QuantizeResult:
    """Export ``final`` INT8 for ``runtime`` into ``save_dir/int8``, evaluate it on ``data``, export ``dense`` FP32
    into ``save_dir/fp32`` and time both on ``runtime`` (``bench``'s ``bench_runs`` interleaved rounds after
    ``bench_warmup``)."""
    bench = bench or BenchOptions()
    runs = bench.bench_runs
    fmt = check_quantize(True, runtime, data)
    save_dir = Path(save_dir)
    int8 = export_model(final, format=fmt, imgsz=imgsz, save_dir=save_dir / "int8", int8=True, data=data,
                        calib_images=calib_images, seed=seed)
    val = evaluate(int8, data, save_dir=save_dir / "int8" / "val", **{"imgsz": imgsz, **(val_kw or {})})
    fp32 = export_model(dense, format=fmt, imgsz=imgsz, save_dir=save_dir / "fp32")
    ms = time_exports({"dense": fp32, "int8": int8}, imgsz=imgsz, threads=threads, runs=runs, warmup=bench.bench_warmup,
                      seed=seed, progress=progress)
    return QuantizeResult(runtime=runtime, export=str(int8), dense_export=str(fp32), map50_95=val.map50_95,
                          map50=val.map50, size_mb=export_size_mb(int8), dense_size_mb=export_size_mb(fp32),
                          latency_ms=ms["int8"], dense_latency_ms=ms["dense"], threads=threads, runs=runs)
