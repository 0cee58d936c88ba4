"""The prune stage: ``prune()``, the user-facing pruning operation (load -> rank -> remove -> measure -> save),
over the engine of :mod:`yolo_prune.pruning`."""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from ..data import resolve_data
from ..errors import UsageError
from ..evaluate import evaluate
from ..bench import check_threads
from ..io import run_dir, write_json, write_text, write_yaml
from ..latency import NOISY, LatencyCost, LatencyTable, build_table, check_runtime, measure_models
from ..logs import LOGGER, Timings, format_seconds, progress_output
from ..forms import PRUNABLE_TASKS
from ..models import load_model, save_checkpoint, wrap_model
from ..modules import stock_problems, to_stock
from ..options import LatencyOptions, Options, PruneOptions, RunOptions, TrainOptions, settings, target_macs
from ..provenance import provenance
from ..report import plot_layer_channels, prune_report_markdown
from ..results import Result, table
from ..stats import model_stats
from ..data.calibration import load_calibration_images
from ..pruning.engine import PruneOutcome, Reference, StepRecord, layer_widths, prune_model
from ..pruning.recovery import normalize_compensation, normalize_recalibration
from ..pruning.graph import build_graph
from ..pruning.importance import resolve_method
from ..pruning.threshold import remove_free_channels


@dataclasses.dataclass
class LayerChange:
    name: str
    channels_before: int
    channels_after: int


@dataclasses.dataclass
class PruneResult(Result):
    """What :func:`prune` did. ``str()`` prints the before/after table."""

    model: Any = dataclasses.field(repr=False)  # the pruned ultralytics YOLO object
    method: str
    target_macs: float | None
    ratio: float | None
    imgsz: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_mb_before: float
    size_mb_after: float
    seconds: float
    save_dir: Path | None = None
    checkpoint: Path | None = None
    map50_95_before: float | None = None
    map50_95_after: float | None = None
    map50_before: float | None = None
    map50_after: float | None = None
    threshold: float | None = None  # channels whose coupled gammas were all below it went first, for free
    macs_ratio_free: float | None = None  # conv MACs fraction right after that free removal
    channels_free: int | None = None  # channels it removed
    map50_95_no_recalibration: float | None = None  # the same pruned model before BN re-estimation
    map50_no_recalibration: float | None = None
    compensate: str | None = None
    recalibrate: str | None = None
    allocation: str = "global"
    portable: bool = False  # saved in stock ultralytics classes only (loads without yolo-prune)
    layers: list[LayerChange] = dataclasses.field(default_factory=list, repr=False)
    steps: list[StepRecord] = dataclasses.field(default_factory=list, repr=False)
    provenance: dict = dataclasses.field(default_factory=dict, repr=False)
    # latency targets / round_to=auto: runtime, threads, target, predicted and measured latency (see to_dict)
    latency: dict | None = dataclasses.field(default=None, repr=False)
    # wall seconds of every sub-step that ran (load, calibration, ranking, sensitivity, compensation, ...; see prune)
    timings: dict[str, float] = dataclasses.field(default_factory=dict, repr=False)
    total_seconds: float | None = None  # the whole prune() call, report writing left out

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    def comparison(self) -> list[tuple[str, Any, Any, Any]]:
        """Rows (metric, before, after, after/before) of the before/after table."""

        def row(label, a, b):
            return (label, a, b, (b / a) if a and b is not None else None)

        rows = [
            row("params (M)", self.params_before / 1e6, self.params_after / 1e6),
            row(f"GMACs @{self.imgsz}", self.macs_before / 1e9, self.macs_after / 1e9),
            row("size (MB)", self.size_mb_before, self.size_mb_after),
        ]
        if self.map50_95_before is not None:
            rows.append(row("mAP50-95", self.map50_95_before, self.map50_95_after))
            rows.append(row("mAP50", self.map50_before, self.map50_after))
        if self.map50_95_no_recalibration is not None:
            rows.append(row("mAP50-95 without BN re-estimation", self.map50_95_before, self.map50_95_no_recalibration))
            rows.append(row("mAP50 without BN re-estimation", self.map50_before, self.map50_no_recalibration))
        lat = self.latency or {}
        where = f"{lat.get('runtime')}{' INT8' if lat.get('int8') else ''} {lat.get('threads') or 'default'} thr"
        if lat.get("predicted_ms") is not None:
            rows.append(row(f"latency {where} predicted (ms)", lat["dense_ms"], lat["predicted_ms"]))
        if lat.get("measured_ms") is not None:
            rows.append((f"latency {where} measured (ms)",
                         lat["measured_dense_ms"], lat["measured_ms"], lat["measured_ratio"]))
        return rows

    @property
    def goal(self) -> str:
        """The pruning goal as the user stated it."""
        if self.ratio is not None:
            return f"ratio={self.ratio}"
        lat = self.latency or {}
        if lat.get("target_ms") is not None:
            return f"target_ms={lat['target_ms']} ({lat['runtime']})"
        if lat.get("target_latency") is not None:
            return f"target_latency={lat['target_latency']} ({lat['runtime']})"
        return f"target_macs={self.target_macs}"

    def __str__(self) -> str:
        goal = self.goal
        if self.threshold is not None:
            free = f"threshold={self.threshold:g} ({self.channels_free} zeroed channels removed for free, conv MACs " \
                   f"{self.macs_ratio_free:.3f})"
            goal = free if self.target_macs is None and self.ratio is None else f"{free}, then {goal}"
        head = f"PruneResult: method={self.method} {goal}, {self.seconds:.2f} s"
        if self.compensate and self.compensate != "none" or self.recalibrate or self.allocation != "global":
            head += (f"\ncompensate={self.compensate}, recalibrate={self.recalibrate or False}, "
                     f"allocation={self.allocation}")
        if self.checkpoint:
            head += f"\ncheckpoint: {self.checkpoint}"
        return head + "\n" + table(self.comparison(), header=("", "before", "after", "ratio"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target_macs": self.target_macs,
            "ratio": self.ratio,
            "threshold": self.threshold,
            "macs_ratio_free": self.macs_ratio_free,
            "channels_free": self.channels_free,
            "imgsz": self.imgsz,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_ratio,
            "size_mb_before": self.size_mb_before,
            "size_mb_after": self.size_mb_after,
            "map50_95_before": self.map50_95_before,
            "map50_95_after": self.map50_95_after,
            "map50_before": self.map50_before,
            "map50_after": self.map50_after,
            "map50_95_no_recalibration": self.map50_95_no_recalibration,
            "map50_no_recalibration": self.map50_no_recalibration,
            "compensate": self.compensate,
            "recalibrate": self.recalibrate,
            "allocation": self.allocation,
            "portable": self.portable,
            "prune_seconds": self.seconds,
            "total_seconds": self.total_seconds,
            "timings": dict(self.timings),
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "steps": [dataclasses.asdict(s) for s in self.steps],
            "latency": self.latency,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "provenance": self.provenance,
        }


def _calibration(method: str, data: Any, *, n: int, imgsz: int, seed: int, progress: bool,
                 timings: Timings) -> torch.Tensor | None:
    """Calibration images from the data's train split: needed by method=activation|recon, used by compensation."""
    if data is None:
        if method in ("activation", "recon"):
            raise UsageError(f"method={method} ranks channels on real images: pass data=<dataset yaml>")
        return None
    if n <= 0:
        if method in ("activation", "recon"):
            raise UsageError(f"method={method} needs calib_images > 0")
        return None
    with timings("calibration"):
        return load_calibration_images(resolve_data(data).train_images, n=n, imgsz=imgsz, seed=seed,
                                       progress=progress)


GROUPS = (PruneOptions, LatencyOptions, TrainOptions, RunOptions)


def prune(model: Any, *options: Options, data: str | Path | None = None, validate: bool = False, save: bool = True,
          progress: bool = False, latency_table: Any = None, **overrides: Any) -> PruneResult:
    """Prune ``model`` (path, yaml, YOLO or DetectionModel; a detection, segmentation, pose or oriented-box model)
    and return a :class:`PruneResult`.

    ``options`` are typed option objects (:class:`~yolo_prune.options.PruneOptions`, ``LatencyOptions``,
    ``TrainOptions`` for ``imgsz``/``batch``/``device``/``seed``, ``RunOptions`` for ``project``/``name``/
    ``exist_ok``); ``overrides`` are any of their keys by name (``method="bn", target_macs=0.5``). Every key is
    documented in ``yolo-prune cfg``.

    The input is never modified. With ``save`` the run folder ``project/name`` (default ``runs/prune/prune``) receives
    ``weights/pruned.pt`` (a normal ultralytics checkpoint), ``report.json`` and ``layers.csv``, and
    ``result.model`` is ``YOLO(".../pruned.pt")``. With ``validate`` and ``data``, mAP is measured before and after
    (COCO evaluation). With ``data``, ``calib_images`` train images are used by ``method=activation|recon``, by
    ``compensate`` (``lstsq_seq``, ``lstsq``, ``mean``, ``none``) and by ``recalibrate`` (BN statistics re-estimated
    afterwards; with ``validate`` the report also gives the mAP before it). ``allocation`` spreads the removal over
    the channel groups; ``sensitivity`` is a ``sensitivity.csv`` to use instead of measuring.

    With ``threshold``, every channel whose coupled BN gammas are all below it is removed first, its constant output
    folded into its consumers (:func:`~yolo_prune.pruning.threshold.remove_free_channels`); then, if the MACs are
    still above ``target_macs``, the remaining channels are ranked with ``method`` to reach it.
    ``target_macs=None`` with a threshold removes only the free channels.

    ``target_latency`` (a fraction of the dense model's latency) or ``target_ms`` replaces ``target_macs`` by a
    latency target on ``runtime`` with ``threads`` threads: a latency table of the model is measured on this machine
    (:mod:`yolo_prune.latency`, cached; or ``latency_table``, a table or its json) and the schedule solves for its
    prediction; ``latency_aware`` ranks channels by importance per millisecond; with ``verify_latency`` the pruned
    model is exported and measured against the dense one. ``round_to="auto"`` keeps each group at the width
    multiple its convs run fastest at on ``runtime``.

    ``progress`` logs what runs on the ``yolo_prune`` logger: every long sub-step (calibration images, ranking,
    sensitivity probes, sequential refit layer by layer, BN re-estimation, validation, latency table) as
    ``sub-step: i/N  elapsed, ETA`` lines, at most one every few seconds (:class:`~yolo_prune.logs.Progress`), and
    where the time went at the end; without a handler on that logger (a plain script) they go to stderr. The default
    is quiet. ``result.timings`` (and ``report.json``/``report.md``) give the wall seconds of every sub-step that
    ran (``load``, ``calibration``, ``trace``, ``ranking``, ``sensitivity``, ``planning``, ``removal``,
    ``compensation``, ``recalibration``, ``stats``, ``save``, ``validation``...), ``result.total_seconds`` the whole
    call.

    With ``portable`` (the default) the pruned model is saved in stock ultralytics classes only (C2f, C3k2, C2,
    C2PSA, Attention), so that ``YOLO(path)`` loads, predicts, validates and exports it where yolo-prune is not
    installed: both halves of every split block lose the same channel count and attention blocks keep their input
    width (:mod:`yolo_prune.pruning.portable`). ``portable=False`` prunes any width (the free form, whose
    checkpoint needs ``yolo_prune.modules`` to load).
    """
    s = settings(GROUPS, options, overrides, where="prune")
    p, lat, t = s.prune, s.latency, s.train
    if p.ratio is None:  # an empty target_macs means 0.5, except with a threshold (only the free channels go)
        p = p.replace(target_macs=target_macs({**p.to_dict(), "mode": "prune"}))
    if p.steps == "auto":  # steps=auto spreads steps over a fine-tune budget: without one, a single step
        p = p.replace(steps=1)
    _check_threshold(p)
    t_start, timings = time.perf_counter(), Timings()
    with progress_output(progress):
        with timings("load"):
            yolo = load_model(model, tasks=PRUNABLE_TASKS)
            _check_task(yolo.task, validate=validate and data is not None)
            if p.portable:
                _check_portable(yolo.model, model)
            module = copy.deepcopy(yolo.model).float().cpu().eval()
            for param in module.parameters():
                param.requires_grad_(True)
        latency = _latency_cost(yolo.model, lat, round_to=p.round_to, ratio=p.ratio, imgsz=t.imgsz,
                                table=latency_table, progress=progress, timings=timings)
        calib = _calibration(p.method or "auto", data, n=p.calib_images, imgsz=t.imgsz, seed=t.seed,
                             progress=progress, timings=timings)
        save_dir = run_dir(s.run.project, "prune", s.run.name, exist_ok=s.run.exist_ok) if save else None
        with timings("stats"):
            before = model_stats(module, imgsz=t.imgsz)
        torch.manual_seed(t.seed)
        snapshot: dict[str, torch.nn.Module] = {}

        def keep_stats(m: torch.nn.Module) -> None:
            if validate and data is not None:
                snapshot["model"] = copy.deepcopy(m)

        t0 = time.perf_counter()
        outcome, free = _remove(module, p, t, calib=calib, latency=latency, progress=progress, keep_stats=keep_stats,
                                timings=timings)
        seconds = time.perf_counter() - t0
        with timings("stats"):
            result = _result(model, module, outcome, free, p, s, before=before, calib=calib, latency=latency,
                             seconds=seconds)
        if p.portable:  # after the measures above, which name convs as in the prunable form
            to_stock(module)
        if latency is not None and lat.verify_latency:
            with timings("latency_verify"):
                _verify_latency(result, yolo.model, module, latency)
        with timings("save"):
            _save(result, yolo, module, data, t.seed, save_dir)
        if validate and data is not None:
            with timings("validation"):
                _validate(result, yolo, module, snapshot, data, t, save_dir, progress=progress)
        result.timings, result.total_seconds = dict(timings), time.perf_counter() - t_start
        if progress:
            LOGGER.info("prune: %s", time_summary(result.timings, result.total_seconds))
        if save_dir is not None:
            write_report(result, save_dir)
    return result


def time_summary(timings: dict[str, float], total: float, n: int = 3) -> str:
    """``3:12 in all; sensitivity 2:01, compensation 0:40, ranking 0:21``: the total and the ``n`` longest
    sub-steps."""
    longest = sorted(timings.items(), key=lambda kv: -kv[1])[:n]
    return f"{format_seconds(total)} in all; " + ", ".join(f"{k} {format_seconds(v)}" for k, v in longest)


def _check_portable(net: torch.nn.Module, source: Any) -> None:
    """A model pruned with ``portable=False`` may hold widths no stock ultralytics class computes."""
    problems = stock_problems(net)
    if problems:
        name = source if isinstance(source, (str, Path)) else "the model"
        raise UsageError(f"portable=True cannot give stock ultralytics classes for {name}, pruned with portable=False "
                         f"({problems[0]}): prune the unpruned model, or pass portable=False")


def _save(result: PruneResult, yolo: Any, module: torch.nn.Module, data: Any, seed: int,
          save_dir: Path | None) -> None:
    """``weights/pruned.pt`` and ``args.yaml`` in ``save_dir`` (``result.model`` loads it); without a folder,
    ``result.model`` wraps the pruned module."""
    if save_dir is None:
        result.model = wrap_model(module)
        return
    write_yaml(save_dir / "args.yaml", {"model": result.provenance["source"], "data": data, "seed": seed,
                                        **result.provenance.get("args", {})})
    report = {k: v for k, v in result.to_dict().items() if k not in ("layers", "timings", "total_seconds")}
    ckpt = save_checkpoint(module, save_dir / "weights" / "pruned.pt", train_args=getattr(yolo.model, "args", None),
                           provenance={**result.provenance, "report": report})
    result.save_dir, result.checkpoint = save_dir, ckpt
    result.model = load_model(ckpt, tasks=PRUNABLE_TASKS)


def _check_task(task: str, *, validate: bool) -> None:
    """Validation measures COCO box mAP of detection models only, so far."""
    if validate and task != "detect":
        raise UsageError(f"validate=True measures detection mAP; it does not handle {task} models yet: prune without "
                         "validate and validate the checkpoint with ultralytics (YOLO(path).val(data=...))")


def _check_threshold(p: PruneOptions) -> None:
    if p.threshold is not None and p.ratio is not None:
        raise UsageError("threshold= combines with target_macs (or nothing), not with ratio=")


def _remove(module: torch.nn.Module, p: PruneOptions, t: Any, *, calib: Any, latency: Any, progress: bool,
            keep_stats: Any, timings: Timings) -> tuple[PruneOutcome, Any]:
    """Remove the free channels (``threshold``), then rank and remove toward the target: the engine's outcome (its
    sub-steps' wall times added to ``timings``)."""
    free = None
    if p.threshold is not None:
        with timings("free_removal"):
            free = remove_free_channels(module, float(p.threshold), round_to=p.round_to, calib_images=calib,
                                        macs_imgsz=t.imgsz, portable=p.portable)
        (LOGGER.info if progress else LOGGER.debug)(
            "threshold %g: %d zeroed channels removed for free, conv MACs %.3f of the original", p.threshold,
            free.channels_removed, free.macs_fraction)
    if free is None or (p.target_macs is not None and free.macs_fraction > p.target_macs):
        recal_mode = normalize_recalibration(p.recalibrate) if calib is not None else None
        outcome: PruneOutcome = prune_model(
            module,
            method=p.method or "auto",
            target_macs=p.target_macs,
            ratio=p.ratio,
            global_pruning=p.global_pruning,
            max_layer_ratio=p.max_layer_ratio,
            round_to=p.round_to,
            steps=p.steps,
            tolerance=p.tolerance,
            seed=t.seed,
            calib_images=calib,
            compensate=p.compensate,
            recalibrate=recal_mode or False,
            allocation=p.allocation,
            sensitivity=p.sensitivity,
            search_candidates=p.search_candidates,
            reference=None if free is None else Reference(free.reference_macs, free.reference_channels),
            macs_imgsz=t.imgsz,
            progress=progress,
            before_recalibration=keep_stats,
            cost=latency,
            portable=p.portable,
        )
        timings.add(outcome.timings)
    else:
        with timings("trace"):
            after_layers = layer_widths(module, build_graph(module))
        outcome = PruneOutcome(steps=[], layers_before=free.layers_before, layers_after=after_layers,
                               reference=Reference(free.reference_macs, free.reference_channels),
                               method=resolve_method(p.method or "auto", calib is not None))
    if free is not None:
        outcome.layers_before = free.layers_before
        outcome.steps.insert(0, StepRecord(step=0, target_macs=None, macs_fraction=free.macs_fraction,
                                           channels_removed=free.channels_removed))
    return outcome, free


def _result(source: Any, module: torch.nn.Module, outcome: PruneOutcome, free: Any, p: PruneOptions, s: Any, *,
            before: Any, calib: Any, latency: Any, seconds: float) -> PruneResult:
    """The result of a pruning run, with its provenance (the settings it ran with)."""
    t, lat = s.train, s.latency
    after = model_stats(module, imgsz=t.imgsz)
    recal_mode = normalize_recalibration(p.recalibrate) if calib is not None else None
    args = dict(method=outcome.method, target_macs=p.target_macs, ratio=p.ratio, threshold=p.threshold,
                imgsz=t.imgsz, global_pruning=p.global_pruning, max_layer_ratio=p.max_layer_ratio,
                round_to=p.round_to, steps=p.steps, calib_images=p.calib_images,
                compensate=normalize_compensation(p.compensate) if calib is not None else "none", recalibrate=recal_mode,
                allocation=outcome.allocation, sensitivity=str(p.sensitivity) if p.sensitivity else None,
                portable=p.portable)
    if latency is not None:
        args.update(target_latency=lat.target_latency, target_ms=lat.target_ms, runtime=latency.table.runtime,
                    threads=latency.table.threads, latency_aware=lat.latency_aware)
    by_latency = latency is not None and latency.target is not None
    return PruneResult(
        model=None, method=outcome.method,
        target_macs=None if p.ratio is not None or by_latency else p.target_macs,
        ratio=p.ratio, imgsz=t.imgsz, params_before=before.params, params_after=after.params,
        macs_before=before.macs, macs_after=after.macs, size_mb_before=before.size_mb, size_mb_after=after.size_mb,
        seconds=seconds, threshold=p.threshold,
        macs_ratio_free=None if free is None else free.macs_fraction,
        channels_free=None if free is None else free.channels_removed,
        layers=[LayerChange(n, c, outcome.layers_after.get(n, 0)) for n, c in outcome.layers_before.items()],
        steps=outcome.steps, provenance=provenance(source, seed=t.seed, stage="prune", args=args),
        compensate=args["compensate"], recalibrate=recal_mode, allocation=outcome.allocation, portable=p.portable,
        latency=_latency_summary(latency, module, lat.target_latency, lat.target_ms) if latency is not None else None,
    )


def _validate(result: PruneResult, yolo: Any, module: torch.nn.Module, snapshot: dict, data: Any, t: Any,
              save_dir: Path | None, *, progress: bool = False) -> None:
    """mAP before and after pruning (and before the BN re-estimation, when there was one)."""
    kw = dict(imgsz=t.imgsz, batch=t.batch, device=t.device, progress=progress)
    vb = evaluate(yolo, data, save_dir=save_dir / "val_before" if save_dir else None, **kw)
    va = evaluate(result.model, data, save_dir=save_dir / "val_after" if save_dir else None, **kw)
    result.map50_95_before, result.map50_before = vb.map50_95, vb.map50
    result.map50_95_after, result.map50_after = va.map50_95, va.map50
    if snapshot:  # the same pruned model with the BN statistics it had before re-estimation
        plain = snapshot["model"]
        vn = evaluate(wrap_model(plain), data, save_dir=save_dir / "val_no_recalibration" if save_dir else None, **kw)
        result.map50_95_no_recalibration, result.map50_no_recalibration = vn.map50_95, vn.map50


def write_report(result: PruneResult, save_dir: Path) -> None:
    """``report.json``, ``report.md`` and ``layers.csv`` of a pruning run."""
    write_json(save_dir / "report.json", result.to_dict())
    lines = ["name,channels_before,channels_after"]
    lines += [f"{layer.name},{layer.channels_before},{layer.channels_after}" for layer in result.layers]
    write_text(save_dir / "layers.csv", "\n".join(lines) + "\n")

    write_text(save_dir / "report.md", prune_report_markdown(result))
    plot_layer_channels(result.layers, save_dir / "channels.png")


def _latency_cost(dense: Any, lat: LatencyOptions, *, round_to: Any, ratio: float | None, imgsz: int, table: Any,
                  progress: bool, timings: Timings) -> Any:
    """The latency model for a latency target or round_to=auto (None when neither is asked for), on ``lat.runtime``
    (INT8 kernels with ``lat.int8``). The values were checked by the schema (``lat``); only their combination is
    checked here."""
    target_latency, target_ms, int8 = lat.target_latency, lat.target_ms, lat.int8
    if target_latency is not None and target_ms is not None:
        raise UsageError("give target_latency (a fraction of the dense latency) or target_ms, not both")
    runtime = check_runtime(lat.runtime)
    threads = check_threads(lat.threads)
    wants_target = ratio is None and (target_latency is not None or target_ms is not None)
    if not wants_target and round_to != "auto":
        if int8:
            LOGGER.warning("int8=True in mode prune measures latency targets and round_to=auto on INT8 kernels; "
                           "without either it changes nothing (export the pruned model with int8=True)")
        return None
    with timings("latency_table"):
        if isinstance(table, (str, Path)):
            table = LatencyTable.load(table)
        if table is None:
            table = build_table(dense, imgsz=imgsz, runtime=runtime, threads=threads, progress=progress, int8=int8)
    if bool(table.int8) != bool(int8):
        raise UsageError(f"the latency table {table.path or ''} was measured {'in INT8' if table.int8 else 'in FP32'}"
                         f" but int8={int8}: give a table measured with int8={not table.int8}, or none")
    target = None
    if wants_target:
        target = float(target_latency) if target_latency is not None else min(1.0, float(target_ms) / table.dense_ms)
    return LatencyCost(table, target, aware=lat.latency_aware)


def _latency_summary(latency: Any, module: Any, target_latency: float | None, target_ms: float | None) -> dict:
    t = latency.table
    predicted = t.predict_model(module)
    return {"runtime": t.runtime, "runtime_version": t.runtime_version, "int8": t.int8, "threads": t.threads,
            "imgsz": t.imgsz,
            "clock": t.clock, "cpu": t.cpu, "target_latency": target_latency, "target_ms": target_ms,
            "target_fraction": latency.target, "latency_aware": latency.aware, "dense_ms": t.dense_ms,
            "fixed_ms": t.fixed_ms, "fixed_share": t.fixed_share, "predicted_ms": predicted,
            "predicted_ratio": predicted / t.dense_ms, "table": str(t.path) if t.path else None,
            "table_validation": ({k: v for k, v in t.validation.items() if k != "variants"} if t.validation else None),
            "measured_dense_ms": None, "measured_ms": None, "measured_ratio": None}


def _verify_latency(result: PruneResult, dense: Any, pruned: Any, latency: Any, runs: int = 20) -> None:
    """Measure the exported dense and pruned models in the table's runtime, interleaved (medians); with an INT8
    table, both as INT8 exports (predicted from the INT8 table vs measured on the INT8 models)."""
    import numpy as np

    t = latency.table
    times = measure_models({"dense": dense, "pruned": pruned}, runtime=t.runtime, imgsz=t.imgsz, threads=t.threads,
                           clock=t.clock, runs=runs, int8=t.int8)
    d, p = float(np.median(times["dense"])), float(np.median(times["pruned"]))
    spread = {k: float((np.percentile(v, 90) - np.percentile(v, 10)) / np.median(v)) for k, v in times.items()}
    result.latency.update(measured_dense_ms=d, measured_ms=p, measured_ratio=p / d, measured_runs=runs,
                          measured_spread=spread)
    LOGGER.info("latency on %s%s: predicted %.3f, measured %.3f of the dense model (%.1f -> %.1f ms)", t.runtime,
                " INT8" if t.int8 else "",
                result.latency["predicted_ratio"], p / d, d, p)
    if max(spread.values()) > NOISY:
        LOGGER.warning("the latency measurements varied by up to %.0f%%: the machine is busy, measured and predicted "
                       "latency are unreliable", 100 * max(spread.values()))
