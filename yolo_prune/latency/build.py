"""Measuring a latency table: :func:`build_table` (cached), :func:`calibrate_table`, :func:`validate_table`, and
:func:`measure_models` (whole models, interleaved) under them."""

from __future__ import annotations

import dataclasses
import copy
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..bench import check_threads, export_runner, interleaved_times, make_runner, torch_threads
from ..deploy import export_model
from ..errors import UsageError
from ..logs import LOGGER, Progress
from ..pruning.graph import build_graph, prepare
from ..quantize import quantize_export
from ..forms import as_detection_model
from ..stats import input_channels
from .convs import ConvSpec, architecture_hash, conv_specs
from .measure import NOISY, measure_conv, pool_quanta, probe_quanta
from .probe import cache_dir, check_runtime, cpu_model, resolve_clock, runtime_version
from .table import TABLE_VERSION, ConvTable, LatencyTable, group_quantum, model_widths

_BACKEND = {"onnxruntime": "onnx", "openvino": "openvino", "torch": "torch"}  # names in yolo_prune.bench


def dense_model(model: Any) -> nn.Module:
    """An FP32 eval copy of ``model`` as given (the reference users deploy)."""
    return copy.deepcopy(as_detection_model(model)).float().cpu().eval()


def prepared_model(model: Any) -> nn.Module:
    """An FP32 eval copy in yolo-prune's prunable form (C2f's first conv as two convs), names as in pruning."""
    return prepare(dense_model(model))


def table_key(specs: Sequence[ConvSpec], *, imgsz: int, runtime: str, threads: int | None, clock: str,
              points: int, min_fraction: float, in_context: bool = True, calibrate: int = 0, int8: bool = False) -> str:
    """The cache key: architecture, imgsz, runtime (and version), threads, clock, CPU model, grid settings, and
    INT8 (FP32 and INT8 tables never share a key; FP32 keys are those of tables measured before INT8 existed)."""
    return architecture_hash(specs, (imgsz, runtime, runtime_version(runtime), threads, clock, cpu_model(), points,
                                     min_fraction, in_context, calibrate, TABLE_VERSION) + (("int8",) if int8 else ()))


def whole_model_runner(runtime: str, model: nn.Module, imgsz: int, folder: Path, threads: int | None, *,
                       int8: bool = False):
    """A runner of the whole model (exported as users deploy it) in ``runtime``, on a fixed random image;
    ``int8``: its INT8 export (:func:`int8_export`)."""
    x = torch.rand(1, input_channels(model), imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    if int8:
        return export_runner(int8_export(runtime, model, imgsz, folder), x.numpy(), threads)
    return make_runner(_BACKEND[runtime], model, x, folder, threads)


def int8_export(runtime: str, model: nn.Module, imgsz: int, folder: Path, samples: int = 4) -> Path:
    """``model`` exported INT8 for ``runtime`` as ``export int8=True`` does (onnxruntime QDQ / NNCF, Detect's decode
    in float), calibrated on ``samples`` random images: latency does not depend on the calibration's values."""
    if runtime not in ("onnxruntime", "openvino"):
        raise UsageError(f"int8=True latency: runtime={runtime} has no INT8 path here; use onnxruntime or openvino")
    fmt = _BACKEND[runtime]
    fp32 = export_model(model, format=fmt, imgsz=imgsz, save_dir=folder)
    images = np.random.default_rng(0).random((samples, input_channels(model), imgsz, imgsz), dtype=np.float32)
    return quantize_export(fp32, fmt, images, head=len(model.model) - 1)


def measure_models(models: Mapping[str, nn.Module], *, runtime: str, imgsz: int, threads: int | None,
                   clock: str = "auto", runs: int = 20, warmup: int = 3, progress: bool = False,
                   int8: bool = False) -> dict[str, list[float]]:
    """Milliseconds of every model's runs in ``runtime``, interleaved (the first model is usually the dense one);
    ``progress``: progress lines of the rounds; ``int8``: their INT8 exports."""
    runtime = check_runtime(runtime)
    threads = check_threads(threads)
    clock = resolve_clock(clock, threads)
    before = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="yolo-prune-latency-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runners = {name: whole_model_runner(runtime, m, imgsz, Path(tmp) / str(i), threads, int8=int8)
                       for i, (name, m) in enumerate(models.items())}
            with torch_threads(threads or before):
                return interleaved_times(runners, runs=runs, warmup=warmup, progress=progress, clock=clock)
    finally:
        torch.set_num_threads(before)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """How a latency table is measured (see :func:`build_table`)."""

    clock: str = "auto"
    points: int = 4
    min_fraction: float = 0.25
    runs: int = 7
    warmup: int = 2
    dense_runs: int = 20
    in_context: bool = True
    calibrate: int = 6
    trace_imgsz: int = 64


def build_table(model: Any, measurement: Measurement | None = None, *, imgsz: int = 640, runtime: str = "onnxruntime",
                threads: int | None = None, cache: bool = True, rebuild: bool = False, progress: bool = False,
                int8: bool = False, **overrides: Any) -> LatencyTable:
    """Measure (or load from the cache) the latency table of ``model`` at ``imgsz`` on ``runtime``.

    ``model`` is the dense model (path, YOLO or DetectionModel; never modified). ``points`` grid widths per
    prunable side of each conv, from ``min_fraction`` of its width to its width; ``runs``/``warmup`` timed and
    untimed passes per grid point; ``dense_runs`` passes of the whole model for the fixed part; ``in_context``:
    count only each conv's own nodes of its tiny model (see :class:`ConvBench`); ``calibrate``: number of random
    pruned variants measured with the dense model to fit the in-context scale and the fixed part
    (:func:`calibrate_table`; 0: fixed part = dense time - table sum at the dense widths, scale 1). These knobs
    are the fields of :class:`Measurement`, given as an object or by name in ``overrides``.

    ``int8``: the table of the runtime's INT8 kernels (onnxruntime or openvino): every probe conv and every whole
    model quantized as ``export int8=True`` quantizes them; INT8 kernels have their own width quanta and cost
    ratios. Cached apart from the FP32 table.
    """
    m = dataclasses.replace(measurement or Measurement(), **overrides)
    clock, points, min_fraction, runs, warmup = m.clock, m.points, m.min_fraction, m.runs, m.warmup
    dense_runs, in_context, calibrate, trace_imgsz = m.dense_runs, m.in_context, m.calibrate, m.trace_imgsz
    runtime = check_runtime(runtime)
    threads = check_threads(threads)
    clock = resolve_clock(clock, threads)
    if int8 and runtime == "torch":
        raise UsageError("int8=True latency tables: torch has no INT8 path here; use runtime=onnxruntime or "
                         "runtime=openvino")
    if not isinstance(imgsz, int) or imgsz < 32 or imgsz % 32:
        raise UsageError(f"imgsz={imgsz!r} must be a multiple of 32")
    module = prepared_model(model)
    graph = build_graph(module, imgsz=trace_imgsz)
    specs = conv_specs(module, graph, imgsz, trace_imgsz)
    key = table_key(specs, imgsz=imgsz, runtime=runtime, threads=threads, clock=clock, points=points,
                    min_fraction=min_fraction, in_context=in_context, calibrate=calibrate, int8=int8)
    path = cache_dir() / f"{runtime}{'-int8' if int8 else ''}-t{threads or 0}-{clock}-{imgsz}-{key}.json"
    if cache and not rebuild and path.is_file():
        try:
            (LOGGER.info if progress else LOGGER.debug)("latency table: %s (cached)", path)
            return LatencyTable.load(path)
        except (OSError, ValueError, KeyError, TypeError):
            LOGGER.warning("latency table %s is unreadable, measuring it again", path)
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    convs: dict[str, ConvTable] = {}
    kw = dict(clock=clock, runs=runs, warmup=warmup, in_context=in_context, min_fraction=min_fraction, int8=int8)
    try:
        with Progress(f"latency table {runtime}", 2 * len(specs), unit="conv measurements", enabled=progress) as bar:
            probes = {}
            for spec in specs:  # 1. each conv's quanta; the runtime-wide one where a conv is too small to tell
                probes[spec.name] = probe_quanta(spec, runtime, threads, **kw)
                bar.update()
            weights = {s.name: s.cin * s.cout * s.kernel ** 2 * (s.size // s.stride) ** 2 for s in specs}
            probes, common_q = pool_quanta(probes, weights)
            for spec in specs:  # 2. the width grid on multiples of the quanta
                convs[spec.name] = measure_conv(spec, runtime, threads, points=points, probe=probes[spec.name], **kw)
                bar.update()
        # the reference is the model as given (C2f's first conv whole), not its prunable form
        if not calibrate:
            dense = measure_models({"dense": dense_model(model)}, runtime=runtime, imgsz=imgsz, threads=threads,
                                   clock=clock, runs=dense_runs, warmup=warmup, progress=progress, int8=int8)["dense"]
    finally:
        torch.set_num_threads(before)
    dense_ms = float(np.median(dense)) if not calibrate else float("nan")
    conv_ms = sum(c.time(c.spec.cin, c.spec.cout) for c in convs.values())
    result = LatencyTable(
        runtime=runtime, threads=threads, imgsz=imgsz, clock=clock, key=key, cpu=cpu_model(),
        runtime_version=runtime_version(runtime), dense_ms=dense_ms, conv_ms=conv_ms, fixed_ms=dense_ms - conv_ms,
        dense_spread=float((np.percentile(dense, 90) - np.percentile(dense, 10)) / dense_ms) if not calibrate else 0.0,
        build_seconds=time.perf_counter() - t0, created=time.strftime("%Y-%m-%d %H:%M:%S"), common_quantum=common_q,
        convs=convs, int8=int8)
    if calibrate:
        calibrate_table(result, model, n=calibrate, runs=dense_runs, warmup=warmup, progress=progress)
        result.build_seconds = time.perf_counter() - t0
    if result.fixed_ms < -0.05 * result.dense_ms:  # (a few % below 0 is within the fit's noise)
        LOGGER.warning("latency table: the convs alone (%.1f ms scaled) take longer than the whole model (%.1f ms): "
                       "the fixed part is taken as negative; the machine was probably busy while measuring",
                       result.scale * conv_ms, result.dense_ms)
    if cache:
        result.save(path)
    (LOGGER.info if progress else LOGGER.debug)(
        "latency table built in %.0f s: dense %.1f ms, fixed part %.1f ms (%.0f%%), in-context scale %.3f",
        result.build_seconds, result.dense_ms, result.fixed_ms, 100 * result.fixed_share, result.scale)
    return result


def calibrate_table(table: LatencyTable, model: Any, *, n: int = 6, seed: int = 12345, runs: int = 20,
                    warmup: int = 3, progress: bool = False) -> LatencyTable:
    """Fit ``measured = fixed + scale * table sum`` on the dense model and ``n`` random pruned variants.

    A conv timed alone is not exactly a conv in the whole model (caches, fused neighbours, layouts): the fit
    gives the in-context scale of the table and the fixed part (the intercept: the time left with every conv
    gone). The dense model is measured in the same interleaved run and stays the reference (``dense_ms``);
    the fixed part is then set so that the dense model is predicted exactly. A fit outside [0.5, 1.5] (a busy
    machine) falls back to scale 1.
    """
    module = prepared_model(model)
    rng = np.random.default_rng(seed)
    models = {"dense": dense_model(model)}
    sums = {"dense": table.conv_ms}
    for i in range(n):
        v = random_variant(module, table, rng)
        models[f"c{i}"] = v
        sums[f"c{i}"] = table.conv_sum(model_widths(v, table.convs))
    times = measure_models(models, runtime=table.runtime, imgsz=table.imgsz, threads=table.threads,
                           clock=table.clock, runs=runs, warmup=warmup, progress=progress, int8=table.int8)
    med = {k: float(np.median(v)) for k, v in times.items()}
    dense = times["dense"]
    table.dense_ms = med["dense"]
    table.dense_spread = float((np.percentile(dense, 90) - np.percentile(dense, 10)) / table.dense_ms)
    xs, ys = np.asarray([sums[k] for k in med]), np.asarray([med[k] for k in med])
    scale, intercept = np.polyfit(xs, ys, 1) if n >= 2 else (1.0, 0.0)
    resid = ys - (scale * xs + intercept)
    r2 = float(1 - (resid ** 2).sum() / max(((ys - ys.mean()) ** 2).sum(), 1e-12)) if n >= 2 else 1.0
    ok = bool(0.5 <= scale <= 1.5 and r2 >= 0.8)
    table.scale = float(scale) if ok else 1.0
    table.fixed_ms = table.dense_ms - table.scale * table.conv_ms
    spread = {k: float((np.percentile(v, 90) - np.percentile(v, 10)) / np.median(v)) for k, v in times.items()}
    table.calibration = {"n": n, "seed": seed, "runs": runs, "fit_scale": float(scale), "fit_intercept_ms": float(intercept),
                         "fit_r2": r2, "used": ok, "max_spread": max(spread.values()), "fixed_ms_by_subtraction": table.dense_ms - table.conv_ms,
                         "points": [{"name": k, "conv_sum_ms": sums[k], "measured_ms": med[k]} for k in med],
                         "loadavg": list(os.getloadavg())}
    if not ok:
        LOGGER.warning("latency table: the calibration fit (scale %.2f, R^2 %.2f) is implausible; using scale 1",
                       scale, r2)
    if max(spread.values()) > NOISY:
        LOGGER.warning("latency measurements vary by up to %.0f%% (p90-p10 of the median): other processes are using "
                       "the CPU and the table is unreliable; rebuild it on a quiet machine (or time 1 thread: its CPU "
                       "clock hardly minds)", 100 * max(spread.values()))
    return table


def random_variant(model: nn.Module, table: LatencyTable, rng: np.random.Generator, *,
                   min_fraction: float = 0.25, trace_imgsz: int = 64) -> nn.Module:
    """A copy of the prepared dense ``model`` with every group pruned to a random multiple of its quantum."""
    variant = copy.deepcopy(model)
    graph = build_graph(variant, imgsz=trace_imgsz)
    plans = []
    for g in graph.groups():
        q = group_quantum(table, g, graph.names)
        lo = max(q, int(math.ceil(g.channels * min_fraction / q)) * q)
        choices = list(range(lo, g.channels, q)) + [g.channels]
        keep = int(rng.choice(choices))
        if keep < g.channels:
            plans.append((g, sorted(rng.choice(g.channels, g.channels - keep, replace=False).tolist())))
    for g, idxs in plans:
        graph.prune(g, idxs)
    return variant.eval()


def validate_table(model: Any, table: LatencyTable, *, n: int = 10, seed: int = 0, runs: int = 15, warmup: int = 3,
                   save: bool = True) -> dict[str, Any]:
    """Predicted against measured latency of ``n`` randomly pruned variants of ``model`` (and the dense one).

    All models are measured in one interleaved run; errors are on the ratio to the dense model measured in that
    run (``predicted / table.dense_ms`` vs ``measured / measured dense``) and on milliseconds. The result is
    stored in ``table.validation`` (and in the cached table file with ``save``).
    """
    module = prepared_model(model)
    rng = np.random.default_rng(seed)
    variants = {"dense": dense_model(model)}
    for i in range(n):
        variants[f"v{i}"] = random_variant(module, table, rng)
    t0 = time.perf_counter()
    times = measure_models(variants, runtime=table.runtime, imgsz=table.imgsz, threads=table.threads,
                           clock=table.clock, runs=runs, warmup=warmup, int8=table.int8)
    dense_ms = float(np.median(times["dense"]))
    rows = []
    for name, m in variants.items():
        measured = float(np.median(times[name]))
        predicted = table.predict_model(m) if name != "dense" else table.dense_ms
        raw = table.dense_ms - table.conv_ms + table.conv_sum(model_widths(m, table.convs)) if name != "dense" \
            else table.dense_ms
        t = np.asarray(times[name])
        rows.append({"name": name, "predicted_ms": predicted, "measured_ms": measured,
                     "predicted_ratio": predicted / table.dense_ms, "measured_ratio": measured / dense_ms,
                     "spread": float((np.percentile(t, 90) - np.percentile(t, 10)) / measured),
                     "conv_ms": predicted - table.fixed_ms, "uncalibrated_ratio": raw / table.dense_ms,
                     "params": sum(p.numel() for p in m.parameters())})
    errs = [r["predicted_ratio"] - r["measured_ratio"] for r in rows[1:]]
    raw_errs = [r["uncalibrated_ratio"] - r["measured_ratio"] for r in rows[1:]]
    rel = [r["predicted_ms"] / r["measured_ms"] - 1 for r in rows[1:]]
    # measured = a + b * (table's conv sum): b near 1 and a near the fixed part support the decomposition
    b, a = np.polyfit([r["conv_ms"] for r in rows], [r["measured_ms"] for r in rows], 1)
    result = {
        "n": n, "seed": seed, "runs": runs, "seconds": time.perf_counter() - t0,
        "dense_ms_now": dense_ms, "dense_ms_table": table.dense_ms,
        "mean_abs_ratio_error": float(np.mean(np.abs(errs))), "max_abs_ratio_error": float(np.max(np.abs(errs))),
        "mean_ratio_error": float(np.mean(errs)), "mean_abs_ms_error_rel": float(np.mean(np.abs(rel))),
        "uncalibrated_mean_abs_ratio_error": float(np.mean(np.abs(raw_errs))),
        "uncalibrated_max_abs_ratio_error": float(np.max(np.abs(raw_errs))),
        "fit_slope": float(b), "fit_intercept_ms": float(a), "loadavg": list(os.getloadavg()), "variants": rows,
    }
    table.validation = result
    if save and table.path is not None:
        table.save(table.path)
    return result
