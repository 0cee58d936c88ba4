"""The whole job in one run folder: baseline -> sparse -> prune (-> short fine-tunes) -> finetune -> val -> bench.

A short composition of the stages over the run module (:mod:`yolo_prune.run`): every finished stage is recorded in
``pipeline.json``, so ``resume=True`` continues an interrupted pipeline from the last finished stage; an interrupted
training stage continues from its own ``last.pt``. The run folder ends with ``report.md`` / ``report.json``
(before/after table), ``layers.csv`` and the plots (:mod:`yolo_prune.stages.report`).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from . import run
from .data import resolve_data
from .errors import UsageError
from .evaluate import evaluate
from .logs import LOGGER, listening
from .forms import PRUNABLE_TASKS, model_task
from .latency import build_table
from .models import load_model
from .options import (SCHEMA, BenchOptions, DistillOptions, LatencyOptions, Options, PruneOptions, RunOptions, Settings,
                      SparseOptions, StageOptions, TrainOptions, settings)
from .stages.prune import prune
from .stages.quantize import check_quantize, quantize_stage
from .stages.report import PipelineResult, pipeline_report, val_maps, verdict
from .stages.teacher import pipeline_teacher
from .stats import model_stats
from .train import finetune, sparse_train

STAGES = ("baseline", "sparse", "prune", "finetune", "val", "quantize", "bench")
GROUPS = (PruneOptions, SparseOptions, StageOptions, TrainOptions, DistillOptions, BenchOptions, RunOptions,
          LatencyOptions)
# what a resumed run takes from its pipeline.json (device, workers, verbose, bench settings and data may change;
# int8/runtime/threads, the INT8 stage's, are LatencyOptions)
RESUMED = (PruneOptions, SparseOptions, StageOptions, DistillOptions, LatencyOptions)
STATE_FILE = "pipeline.json"


@dataclasses.dataclass
class _Run:
    """What every stage of one pipeline run reads."""

    s: Settings
    model: Any
    data: Any
    save_dir: Path
    state: run.RunState
    threshold: float | None
    target_macs: float | None
    distill_kw: dict[str, Any]
    train_args: dict[str, Any]
    latency_table: Any = None  # with a latency target: the input model's table (every prune step plans over it)

    @property
    def val_kw(self) -> dict[str, Any]:
        """The evaluation keys; progress lines when someone listens to the ``yolo_prune`` logger (the CLI)."""
        return dict(imgsz=self.s.train.imgsz, batch=self.s.train.batch, device=self.s.train.device,
                    progress=listening())

    @property
    def train_kw(self) -> dict[str, Any]:
        t = self.s.train
        return dict(imgsz=t.imgsz, batch=t.batch, device=t.device, seed=t.seed, verbose=self.s.run.verbose,
                    workers=t.workers, **self.distill_kw, **self.train_args)

    def step(self, k: int) -> str:
        """``[k/N]`` of the log lines: 7 stages with the INT8 stage, else 6."""
        return f"[{k}/{7 if self.s.latency.int8 else 6}]"

    def training(self, mode: str, folder: str, fn: Any, source: Any, epochs: int, **kw: Any) -> dict[str, Any]:
        """Train into ``save_dir/mode/folder``; on resume continue from its last.pt if it has one."""
        return {"mode": mode, **run.train_stage(fn, source, self.data, self.save_dir / mode / folder, epochs,
                                                resume=self.s.run.resume, **self.train_kw, **kw)}


def pipeline(model: Any, data: str | Path | None, *options: Options, train_args: dict[str, Any] | None = None,
             save_dir: str | Path | None = None, bench: bool = True, **overrides: Any) -> PipelineResult:
    """Sparsity-train, prune, fine-tune, validate and benchmark ``model`` on ``data`` in one run folder.

    ``options`` are typed option objects (:class:`~yolo_prune.options.PruneOptions`, ``SparseOptions``,
    ``StageOptions``, ``TrainOptions``, ``DistillOptions``, ``BenchOptions``, ``RunOptions``); ``overrides`` are
    any of their keys by name (``target_macs=0.3, finetune_epochs=20``), as documented in ``yolo-prune cfg``.

    The run folder is ``project/name`` (default ``runs/pipeline/pipeline``; or ``save_dir``). ``target_macs`` (or
    ``ratio``) is reached in ``steps`` increments, each but the last followed by ``step_epochs`` of fine-tuning;
    a step that drops mAP50-95 by more than ``max_map_drop`` is rejected and the run keeps the step before.
    ``train_args`` are extra ultralytics train keys for every training stage. ``resume=True`` continues the run
    folder's ``pipeline.json`` with the settings recorded there (``model`` and ``data`` may be None).

    Every training stage distils from ``teacher``: ``"auto"`` (default) is the input model itself unless it has
    other classes than ``data`` or is a yaml; ``"none"`` turns distillation off. The sparse stage
    (``sparse_epochs`` > 0) hands its ``last.pt`` to pruning, which first removes, for free, every channel whose
    coupled gammas are all below ``threshold`` (default: ``gamma_threshold`` after ``proximal`` or ``greg``).
    """
    t_start = time.perf_counter()
    s = settings(GROUPS, options, overrides, where="pipeline")
    folder = run.open_folder("pipeline", project=s.run.project, name=s.run.name, exist_ok=s.run.exist_ok,
                             resume=s.run.resume, state_file=STATE_FILE, save_dir=save_dir)
    if s.run.resume:
        model, data, s, train_args = _resumed(folder, model, data, s)
    ctx = _start(model, data, s, folder, train_args or {})
    LOGGER.info("pipeline: run folder %s", folder)
    base = _baseline(ctx)
    sp = _sparse(ctx)
    current = (sp.get("last") or sp.get("best")) if sp else None
    pr = _prune(ctx, current or model, base)
    kept = next(r for r in pr["steps"] if r["step"] == pr["kept_step"])
    ft = _finetune(ctx, pr["checkpoint"])
    final = Path((ft or {}).get("best") or (ft or {}).get("last") or pr["checkpoint"])
    va = _val(ctx, final)
    _quantize(ctx, final)  # (the report reads its record)
    be = None
    if bench and s.bench.backends:
        LOGGER.info("%s bench: CPU latency, dense vs pruned (%s)", ctx.step(7 if s.latency.int8 else 6),
                    s.bench.backends)
        be = run.bench_stage(ctx.state, {"dense": model, "pruned": final}, imgsz=s.train.imgsz,
                             backends=run.backend_list(s.bench.backends), runs=s.bench.bench_runs,
                             warmup=s.bench.bench_warmup, seed=s.train.seed, verbose=s.run.verbose)
    warning = verdict(base, kept, va, target_macs=ctx.target_macs, steps=ctx.s.prune.steps,
                      finetune_epochs=ctx.s.stage.finetune_epochs)
    for i, line in enumerate(warning):  # never silently worse than the model the user gave
        (LOGGER.warning if i == 0 else LOGGER.info)("pipeline: %s" if i == 0 else "  - %s", line)
    return pipeline_report(folder, ctx.state, base=base, sparse=sp, prune=pr, kept=kept, val=va, bench=be, final=final,
                           imgsz=s.train.imgsz, seconds=time.perf_counter() - t_start, warning=warning)


def _resumed(folder: Path, model: Any, data: Any, s: Settings) -> tuple[Any, Any, Settings, dict[str, Any]]:
    """The run continues with the settings it started with, as ultralytics' resume takes its checkpoint's (a data=
    given again wins, e.g. a moved dataset; device, workers, verbose and bench settings may change)."""
    kept = run.recorded_args(folder, STATE_FILE)
    def recorded(cls: type) -> dict[str, Any]:
        return {k: kept[k] for k in cls.names() if k in kept and (kept[k] is not None or SCHEMA[k].optional)}

    groups = [cls.make(getattr(s, cls.GROUP), **recorded(cls)) for cls in RESUMED]
    train = s.train.replace(**{k: kept[k] for k in ("imgsz", "batch", "seed") if k in kept})
    others = [getattr(s, c.GROUP) for c in GROUPS if c not in RESUMED and c is not TrainOptions]
    return kept.get("model", model), data if data is not None else kept.get("data"), \
        Settings([*groups, train, *others]), kept.get("train_args") or {}


def _start(model: Any, data: Any, s: Settings, folder: Path, train_args: dict[str, Any]) -> _Run:
    """Check the data and the options, resolve the teacher, record the settings: the run's context."""
    spec = resolve_data(data)  # fail early on a bad dataset, before any training
    check_quantize(s.latency.int8, s.latency.runtime, data)  # (runtime=torch, openvino missing: before training)
    if s.latency.int8 and (task := model_task(load_model(model, tasks=PRUNABLE_TASKS))) != "detect":
        raise UsageError(f"int8=True quantizes detection models only; this is a {task} model (run without int8)")
    teacher = pipeline_teacher(s.distill.teacher, model, spec.nc, folder)
    if teacher is None and (s.distill.labels is False or s.distill.unlabeled):
        raise UsageError("labels=False trains against a teacher's outputs, but this pipeline has no teacher")
    distill_kw = {**s.distill.to_dict(), "teacher": teacher} if teacher else {}
    threshold = s.prune.threshold
    if threshold is None and s.stage.sparse_epochs > 0 and s.sparse.sr_mode in ("proximal", "greg"):
        threshold = s.sparse.gamma_threshold
    if threshold is not None and s.prune.ratio is not None:
        raise UsageError("threshold (free removal of zeroed channels) combines with target_macs, not with ratio")
    target = None if s.prune.ratio is not None else (s.prune.target_macs if s.prune.target_macs is not None else 0.5)
    if _latency_target(s):
        target = None
        if s.stage.sparse_epochs > 0 and s.sparse.sr_mode == "greg":
            raise UsageError("sr_mode=greg plans toward target_macs; with target_latency/target_ms use sparse_epochs=0 "
                             "or another sr_mode")
    args = {"model": run.absolute(model), "data": run.absolute(data), **s.sparse.to_dict(), **s.stage.to_dict(),
            **s.prune.to_dict(), "threshold": threshold, "target_macs": target, "imgsz": s.train.imgsz,
            "batch": s.train.batch, "seed": s.train.seed, "train_args": dict(train_args),
            **s.distill.to_dict(), "teacher": teacher, **s.latency.to_dict()}
    state = run.start(folder, STATE_FILE, args, resume=s.run.resume)
    return _Run(s=s, model=model, data=data, save_dir=folder, state=state, threshold=threshold, target_macs=target,
                distill_kw=distill_kw, train_args=dict(train_args))


def _baseline(ctx: _Run) -> dict[str, Any]:
    base = ctx.state.done("baseline")
    if base is None:
        LOGGER.info("%s baseline: measuring and validating the dense model", ctx.step(1))
        dense = load_model(ctx.model, tasks=PRUNABLE_TASKS)
        stats = model_stats(dense.model, imgsz=ctx.s.train.imgsz)
        val = evaluate(dense, ctx.data, save_dir=ctx.save_dir / "baseline", **ctx.val_kw)
        base = ctx.state.finish("baseline", {"params": stats.params, "macs": stats.macs, "size_mb": stats.size_mb,
                                             **val_maps(val), "source": str(ctx.model)})
    return base


def _sparse(ctx: _Run) -> dict[str, Any] | None:
    sp = ctx.state.done("sparse")
    s = ctx.s
    if sp is None and s.stage.sparse_epochs > 0:
        LOGGER.info("%s sparse: %d epochs of sparsity training (sr_mode=%s, sr=%s)", ctx.step(2), s.stage.sparse_epochs,
                    s.sparse.sr_mode, s.sparse.sr)
        method = s.prune.method or "auto"
        greg = {"target_macs": ctx.target_macs, "method": method if method in ("bn", "l1", "l2", "random") else "bn",
                "max_layer_ratio": s.prune.max_layer_ratio, "round_to": s.prune.round_to,
                "portable": s.prune.portable} \
            if s.sparse.sr_mode == "greg" else {}
        sp = ctx.state.finish("sparse", ctx.training("sparse", "train", sparse_train, ctx.model, s.stage.sparse_epochs,
                                                     **s.sparse.to_dict(), **greg))
        if sp.get("free_macs_after") is not None:
            LOGGER.info("sparse: %.1f%% of the gammas are 0; pruning at |gamma| < %g frees %.1f%% of the MACs",
                        100 * (sp.get("gamma_zero_after") or 0), s.sparse.gamma_threshold, 100 * sp["free_macs_after"])
    return sp


def _prune(ctx: _Run, source: Any, base: dict[str, Any]) -> dict[str, Any]:
    """Prune in ``steps`` increments, each but a single one followed by a short fine-tune (stage ``prune``)."""
    if ctx.s.prune.steps == "auto":  # (a resumed run reuses its recorded plan)
        _plan_steps(ctx, source, base)
    pr = ctx.state.done("prune")
    if pr is not None:
        return pr
    p = ctx.s.prune
    LOGGER.info("%s prune: method=%s %s in %d step(s)", ctx.step(3), p.method or "auto", _goal(ctx), p.steps)

    def one_step(step: int, current: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
        return _prune_step(ctx, step, current, records[-1]["macs"] if records else base["macs"], base["macs"])

    records, kept = run.stepped(ctx.state, p.steps, one_step, start=source, base_map=base["map50_95"],
                                max_map_drop=ctx.s.stage.max_map_drop, prefix="prune.")
    return ctx.state.finish("prune", {"steps": records, "kept_step": kept["step"],
                                      "checkpoint": kept.get("finetuned") or kept["checkpoint"],
                                      "pruned_checkpoint": kept["checkpoint"]})


def steps_for(retained: float | None) -> int:
    """How many pruning steps a target needs, from the share of mAP50-95 a one-shot trial prune kept."""
    if retained is None or retained >= 0.75:
        return 1
    return 2 if retained >= 0.5 else 3 if retained >= 0.25 else 4


def split_budget(epochs: int, steps: int) -> tuple[int, int]:
    """(epochs after each of ``steps`` prune steps, epochs of the final fine-tune): ``steps * each + final ==
    epochs``, the final fine-tune never shorter than a step's."""
    each = epochs // (steps + 1) if steps > 1 else 0
    return each, epochs - steps * each


def _plan_steps(ctx: _Run, source: Any, base: dict[str, Any]) -> None:
    """``steps=auto``: prune once to the target (the trial), choose the number of steps from the share of mAP it kept,
    and spread ``finetune_epochs`` over them. With one step the trial is that step. Recorded as stage ``plan``."""
    plan = ctx.state.done("plan")
    if plan is None:
        trial_ctx = dataclasses.replace(ctx, s=ctx.s.with_(ctx.s.prune.replace(steps=1)))
        trial = _prune_step(trial_ctx, 1, source, base["macs"], base["macs"], folder="trial")
        dense = base.get("map50_95")
        retained = trial["map50_95_pruned"] / dense if dense else None
        steps = steps_for(retained)
        if steps == 1:  # the trial is step 1: it moves where a one-step run keeps its step
            trial = _moved(trial, ctx.save_dir / "prune" / "trial", ctx.save_dir / "prune" / "step1")
        each, final = split_budget(ctx.s.stage.finetune_epochs, steps)
        plan = ctx.state.finish("plan", {"trial": trial, "retained": retained, "steps": steps, "step_epochs": each,
                                         "finetune_epochs": final, "budget": ctx.s.stage.finetune_epochs})
        LOGGER.info("prune: a one-shot trial kept %s of the mAP50-95: %d step(s), %d epoch(s) after each and %d at "
                    "the end (%d in all, as asked)", "n/a" if retained is None else f"{retained:.0%}", steps, each,
                    final, ctx.s.stage.finetune_epochs)
        if steps == 1:
            ctx.state.finish("prune.step1", trial)
    ctx.s = ctx.s.with_(ctx.s.prune.replace(steps=plan["steps"]),
                        ctx.s.stage.replace(step_epochs=plan["step_epochs"], finetune_epochs=plan["finetune_epochs"]))


def _moved(record: dict[str, Any], src: Path, dst: Path) -> dict[str, Any]:
    """``record`` of a prune step whose folder ``src`` is renamed ``dst`` (replacing an old one), paths updated."""
    if dst.exists():
        shutil.rmtree(dst)
    src.rename(dst)
    ckpt = Path(record["checkpoint"])
    return {**record, "checkpoint": str(dst / ckpt.relative_to(src))}


def _latency_target(s: Settings) -> bool:
    return s.prune.ratio is None and (s.latency.target_latency is not None or s.latency.target_ms is not None)


def _goal(ctx: _Run) -> str:
    p, lat = ctx.s.prune, ctx.s.latency
    if p.ratio is not None:
        return f"ratio={p.ratio}"
    if _latency_target(ctx.s):
        what = (f"target_latency={lat.target_latency}" if lat.target_latency is not None
                else f"target_ms={lat.target_ms}")
        return f"{what} on {lat.runtime}{' INT8' if lat.int8 else ''}"
    return f"target_macs={ctx.target_macs}"


def _step_latency(ctx: _Run, step: int, steps: int) -> LatencyOptions:
    """The latency options of prune step ``step`` of ``steps``: ``1 - (1 - target) * step / steps`` of the dense
    latency of the input model's table (measured once, cached; INT8 kernels with ``int8``)."""
    lat = ctx.s.latency
    if ctx.latency_table is None:
        ctx.latency_table = build_table(ctx.model, imgsz=ctx.s.train.imgsz, runtime=lat.runtime, threads=lat.threads,
                                        int8=lat.int8, progress=listening())
    t = ctx.latency_table
    target = lat.target_latency if lat.target_latency is not None else min(1.0, lat.target_ms / t.dense_ms)
    return lat.replace(target_latency=1 - (1 - target) * step / steps, target_ms=None)


def _prune_step(ctx: _Run, step: int, current: Any, prev_macs: float, base_macs: float, *,
                folder: str | None = None) -> dict[str, Any]:
    p, steps = ctx.s.prune, ctx.s.prune.steps
    lat = ctx.s.latency.replace(target_latency=None, target_ms=None, int8=False)  # (MACs: no table to measure)
    if _latency_target(ctx.s):
        step_kw = {"ratio": None, "target_macs": None}
        lat = _step_latency(ctx, step, steps)
    elif p.ratio is not None:
        step_kw = {"ratio": 1 - (1 - p.ratio) ** (1 / steps), "target_macs": None}
    else:
        goal = 1 - (1 - ctx.target_macs) * step / steps
        step_kw = {"target_macs": min(1.0, goal * base_macs / prev_macs), "ratio": None}
    threshold = ctx.threshold if step == 1 else None
    res = prune(current, p.replace(steps=1, threshold=threshold, **step_kw), lat, data=ctx.data, seed=ctx.s.train.seed,
                imgsz=ctx.s.train.imgsz, project=ctx.save_dir / "prune", name=folder or f"step{step}", exist_ok=True,
                progress=listening(), latency_table=ctx.latency_table)
    record = {"step": step, "checkpoint": str(res.checkpoint), "macs": res.macs_after, "params": res.params_after,
              "size_mb": res.size_mb_after, "macs_fraction": res.macs_after / base_macs, "prune_seconds": res.seconds,
              "prune_timings": res.timings, "prune_total_seconds": res.total_seconds,
              "macs_fraction_free": res.macs_ratio_free, "channels_free": res.channels_free, "latency": res.latency,
              "layers": [dataclasses.asdict(x) for x in res.layers]}
    v = evaluate(res.model, ctx.data, save_dir=res.save_dir / "val", **ctx.val_kw)
    maps = val_maps(v)
    record.update({f"{k}_pruned": x for k, x in maps.items()}, **maps)
    if steps > 1 and ctx.s.stage.step_epochs > 0:
        tuned = ctx.training("finetune", f"step{step}", finetune, res.checkpoint, ctx.s.stage.step_epochs)
        ckpt = tuned.get("best") or tuned.get("last")
        v = evaluate(ckpt, ctx.data, save_dir=Path(tuned["save_dir"]) / "val", **ctx.val_kw)
        record.update(finetuned=str(ckpt), **val_maps(v))
    return record


def _finetune(ctx: _Run, checkpoint: str) -> dict[str, Any] | None:
    ft = ctx.state.done("finetune")
    epochs = ctx.s.stage.finetune_epochs
    if ft is None and epochs > 0:
        LOGGER.info("%s finetune: %d epochs", ctx.step(4), epochs)
        ft = ctx.state.finish("finetune", ctx.training("finetune", "final", finetune, checkpoint, epochs))
    return ft


def _val(ctx: _Run, final: Path) -> dict[str, Any]:
    va = ctx.state.done("val")
    if va is None:
        LOGGER.info("%s val: COCO evaluation of %s", ctx.step(5), final)
        v = evaluate(final, ctx.data, save_dir=ctx.save_dir / "val", **ctx.val_kw)
        st = model_stats(final, imgsz=ctx.s.train.imgsz)
        va = ctx.state.finish("val", {**val_maps(v), "params": st.params, "macs": st.macs,
                                      "size_mb": st.size_mb, "checkpoint": str(final)})
    return va


def _quantize(ctx: _Run, final: Path) -> dict[str, Any] | None:
    """``int8=True``: the final model as an INT8 export for ``runtime``, against the dense FP32 export (stage
    ``quantize``)."""
    q8 = ctx.state.done("quantize")
    lat = ctx.s.latency
    if q8 is None and lat.int8:
        LOGGER.info("%s quantize: INT8 export for %s, COCO evaluation, latency against the dense FP32 export",
                    ctx.step(6), lat.runtime)
        res = quantize_stage(final, ctx.model, ctx.data, runtime=lat.runtime, save_dir=ctx.save_dir / "quantize",
                             imgsz=ctx.s.train.imgsz, calib_images=ctx.s.prune.calib_images, seed=ctx.s.train.seed,
                             threads=lat.threads, bench=ctx.s.bench,
                             val_kw=ctx.val_kw, progress=ctx.s.run.verbose or listening())
        q8 = ctx.state.finish("quantize", res.to_dict())
    return q8


def pipeline_from_cfg(cfg: dict[str, Any], extra: dict[str, Any]) -> PipelineResult:
    """Run :func:`pipeline` from a merged CLI configuration (see :mod:`yolo_prune.config`)."""
    if cfg.get("round_to") == "auto":
        raise UsageError("the pipeline does not take round_to=auto (run 'yolo-prune prune round_to=auto ...', then "
                         "'yolo-prune finetune'); latency targets (target_latency=, target_ms=) it takes")
    resume_dir = cfg["model"] if cfg["resume"] and Path(str(cfg["model"])).is_dir() else None  # model=<run folder>
    return pipeline(cfg["model"], cfg["data"], train_args=extra, save_dir=resume_dir, **config_keys(cfg))


def config_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """The configuration keys the pipeline's option groups hold."""
    return {k: cfg[k] for cls in GROUPS for k in cls.names() if k in cfg}
