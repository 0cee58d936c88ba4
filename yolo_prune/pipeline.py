"""The whole job in one run folder: baseline -> sparse -> prune (-> short fine-tunes) -> finetune -> val -> bench.

Every finished stage is recorded in ``pipeline.json`` (written atomically), so ``resume=True`` continues an
interrupted pipeline from the last finished stage; an interrupted training stage continues from its own
``last.pt``. The run folder ends with ``report.md`` / ``report.json`` (before/after table), ``layers.csv``
and the plots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from .errors import UsageError
from .io import run_dir, run_path, write_json, write_text, write_yaml
from .results import Result, markdown_table, table

LOGGER = logging.getLogger("yolo_prune")

STAGES = ("baseline", "sparse", "prune", "finetune", "val", "bench")


@dataclasses.dataclass
class PipelineResult(Result):
    """The before/after table of a pipeline run; ``model`` is the final ultralytics ``YOLO``."""

    save_dir: Path
    final: Path
    rows_: list[tuple[str, Any, Any, Any]] = dataclasses.field(repr=False)
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)
    seconds: float = 0.0

    @property
    def model(self) -> Any:
        from .models import load_model

        return load_model(self.final)

    def rows(self) -> list[tuple[str, Any]]:
        return [(r[0], r[2]) for r in self.rows_]

    def __str__(self) -> str:
        return (f"PipelineResult: {self.save_dir} ({self.seconds / 60:.1f} min)\nfinal model: {self.final}\n"
                + table(self.rows_, header=("", "before", "after", "ratio")))


class _State:
    """``pipeline.json``: the outputs of every finished stage. Only a resumed run (``load``) reads an existing file;
    a new run in a reused folder (``exist_ok=True``) deletes it and starts from nothing."""

    def __init__(self, path: Path, args: dict[str, Any], *, load: bool):
        self.path = path
        self.data: dict[str, Any] = {"args": args, "stages": {}}
        if load and path.is_file():
            self.data = json.loads(path.read_text(encoding="utf-8"))
        elif not load:
            path.unlink(missing_ok=True)

    def done(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)

    def finish(self, stage: str, outputs: dict[str, Any]) -> dict[str, Any]:
        self.data["stages"][stage] = outputs
        write_json(self.path, self.data)
        return outputs


def _ratio(a: Any, b: Any) -> float | None:
    return (b / a) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else None


def pipeline(
    model: Any,
    data: str | Path,
    *,
    sparse_epochs: int = 0,
    sr: float = 0.05,
    sr_schedule: str = "constant",
    sr_mode: str = "greg",
    sr_group: bool = False,
    sr_head: bool = True,
    greg_ramp: float = 0.5,
    gamma_threshold: float = 0.01,
    target_macs: float | None = 0.5,
    ratio: float | None = None,
    threshold: float | None = None,
    steps: int = 1,
    step_epochs: int = 1,
    max_map_drop: float | None = None,
    finetune_epochs: int = 10,
    teacher: Any = "auto",
    distill: str = "output",
    distill_cls: float = 1.0,
    distill_box: float = 1.0,
    distill_temp: float = 1.0,
    labels: bool = True,
    unlabeled: Any = None,
    imgsz: int = 640,
    batch: int = 16,
    workers: int = 2,
    device: str | None = None,
    seed: int = 0,
    bench: bool = True,
    bench_runs: int = 30,
    bench_warmup: int = 5,
    backends: tuple[str, ...] = ("torch", "onnx"),
    project: str | Path | None = None,
    name: str | None = None,
    exist_ok: bool = False,
    resume: bool = False,
    verbose: bool = False,
    train_args: dict[str, Any] | None = None,
    save_dir: str | Path | None = None,
    **prune_options: Any,
) -> PipelineResult:
    """Sparsity-train, prune, fine-tune, validate and benchmark ``model`` on ``data`` in one run folder.

    The run folder is ``project/name`` (default ``runs/pipeline/pipeline``; or ``save_dir`` when given); see the module docstring
    for its contents. ``target_macs`` (or ``ratio``) is reached in ``steps`` increments, each but the last
    followed by ``step_epochs`` of fine-tuning; ``prune_options`` go to :func:`yolo_prune.pruning.prune`
    (``method``, ``global_pruning``, ``max_layer_ratio``, ``round_to``, ``tolerance``, ``calib_images``,
    ``compensate``). ``train_args`` are extra ultralytics train keys for every training stage.
    ``resume=True`` continues the run folder's ``pipeline.json`` with the settings recorded there (``model``
    and ``data`` may be None); only ``device``, ``workers``, ``verbose``, the bench settings and ``data`` may change.

    Every training stage (sparse, the fine-tunes between steps, the final fine-tune) distils from ``teacher``:
    ``"auto"`` (default) is the input model itself - the dense checkpoint - unless it has other classes than
    ``data`` or is a yaml (random init); ``None`` / ``"none"`` turns distillation off; a path uses that
    checkpoint. ``distill``, ``distill_cls``, ``distill_box``, ``distill_temp``, ``labels`` and ``unlabeled`` are
    as in :func:`yolo_prune.train.finetune`.

    The sparse stage (``sparse_epochs`` > 0) trains with ``sr_mode`` / ``sr`` / ``sr_group`` / ``sr_head`` /
    ``sr_schedule`` (``greg`` aims at ``target_macs`` with ``method``); its ``last.pt`` (not ``best.pt``, which
    may be an early, still dense epoch) goes to pruning. Pruning first removes, for free, every channel whose
    coupled gammas are all below ``threshold`` (default: ``gamma_threshold`` after ``proximal`` or ``greg``
    sparse training, none otherwise), then ranks the rest with ``method`` to reach ``target_macs``.
    """
    bad = set(prune_options) - _PRUNE_OPTIONS
    if bad:
        raise UsageError(f"unknown pipeline option(s): {', '.join(sorted(bad))}")
    method = prune_options.get("method", "auto")
    from .data import resolve_data
    from .evaluate import evaluate
    from .models import load_model
    from .pruning import prune
    from .stats import model_stats
    from .train import finetune, sparse_train

    t_start = time.perf_counter()
    if resume:
        save_dir = Path(save_dir).absolute() if save_dir else run_path(project, "pipeline", name)
        if not (save_dir / "pipeline.json").is_file():
            raise UsageError(f"resume=True but {save_dir} holds no pipeline.json to resume from")
        # The run continues with the settings it started with, as ultralytics' resume takes its checkpoint's
        # (a data= given again wins, e.g. a moved dataset; device, workers, verbose and bench settings may change).
        kept = _State(save_dir / "pipeline.json", {}, load=True).data["args"]
        data = kept.get("data") if data is None else data
        (model, sparse_epochs, sr, sr_schedule, gamma_threshold, target_macs, ratio, steps, step_epochs, max_map_drop,
         finetune_epochs, imgsz, batch, seed, train_args, sr_mode, sr_group, sr_head, greg_ramp, threshold) = (
            kept.get(k, v) for k, v in zip(_RESUMED, (model, sparse_epochs, sr, sr_schedule, gamma_threshold,
                                                      target_macs, ratio, steps, step_epochs, max_map_drop,
                                                      finetune_epochs, imgsz, batch, seed, train_args, sr_mode,
                                                      sr_group, sr_head, greg_ramp, threshold)))
        prune_options.update({k: v for k, v in kept.items() if k in _PRUNE_OPTIONS})
    elif save_dir is not None:
        save_dir = Path(save_dir).absolute()
        save_dir.mkdir(parents=True, exist_ok=True)
    else:
        save_dir = run_dir(project, "pipeline", name, exist_ok=exist_ok)
    spec = resolve_data(data)  # fail early on a bad dataset, before any training
    if resume:  # the recorded teacher (already resolved to a path, or None) and distillation settings
        teacher, distill, distill_cls, distill_box, distill_temp, labels, unlabeled = (
            kept.get(k, v) for k, v in zip(_DISTILL_KEYS, (teacher, distill, distill_cls, distill_box, distill_temp,
                                                           labels, unlabeled)))
    teacher = _pipeline_teacher(teacher, model, spec.nc, save_dir)
    if teacher is None and (labels is False or unlabeled):
        raise UsageError("labels=False trains against a teacher's outputs, but this pipeline has no teacher")
    distill_kw = dict(teacher=teacher, distill=distill, distill_cls=distill_cls, distill_box=distill_box,
                      distill_temp=distill_temp, labels=labels, unlabeled=unlabeled) if teacher else {}
    if threshold is None and sparse_epochs > 0 and sr_mode in ("proximal", "greg"):
        threshold = gamma_threshold
    if threshold is not None and ratio is not None:
        raise UsageError("threshold (free removal of zeroed channels) combines with target_macs, not with ratio")
    args = dict(model=_absolute(model), data=_absolute(data), sparse_epochs=sparse_epochs, sr=sr, sr_schedule=sr_schedule,
                sr_mode=sr_mode, sr_group=sr_group, sr_head=sr_head, greg_ramp=greg_ramp, threshold=threshold,
                target_macs=target_macs, ratio=ratio, steps=steps, step_epochs=step_epochs, **prune_options,
                max_map_drop=max_map_drop, finetune_epochs=finetune_epochs, imgsz=imgsz, batch=batch, seed=seed,
                gamma_threshold=gamma_threshold, train_args=dict(train_args or {}),
                **{k: distill_kw.get(k) for k in _DISTILL_KEYS})
    state = _State(save_dir / "pipeline.json", args, load=resume)
    if not resume:
        write_yaml(save_dir / "args.yaml", args)
    train_kw = dict(imgsz=imgsz, batch=batch, device=device, seed=seed, verbose=verbose, workers=workers,
                    **distill_kw, **(train_args or {}))
    val_kw = dict(imgsz=imgsz, batch=batch, device=device)

    def stage_training(mode: str, run: str, fn, source, epochs: int, **kw) -> dict[str, Any]:
        """Train into ``save_dir/mode/run``; on resume continue from its last.pt if it has one."""
        return {"mode": mode, **train_stage(fn, source, data, save_dir / mode / run, epochs, resume=resume,
                                            **train_kw, **kw)}

    # 1. baseline -------------------------------------------------------------------------------------
    LOGGER.info("pipeline: run folder %s", save_dir)
    base = state.done("baseline")
    if base is None:
        LOGGER.info("[1/6] baseline: measuring and validating the dense model")
        dense = load_model(model)
        stats = model_stats(dense.model, imgsz=imgsz)
        val = evaluate(dense, data, save_dir=save_dir / "baseline", **val_kw)
        base = state.finish("baseline", {"params": stats.params, "macs": stats.macs, "size_mb": stats.size_mb,
                                         "map50_95": val.map50_95, "map50": val.map50, "source": str(model)})

    # 2. sparse ---------------------------------------------------------------------------------------
    current: Any = model
    sp = state.done("sparse")
    if sp is None and sparse_epochs > 0:
        LOGGER.info("[2/6] sparse: %d epochs of sparsity training (sr_mode=%s, sr=%s)", sparse_epochs, sr_mode, sr)
        greg = {"target_macs": target_macs, "method": method if method in ("bn", "l1", "l2", "random") else "bn",
                **{k: prune_options[k] for k in ("max_layer_ratio", "round_to") if k in prune_options}} \
            if sr_mode == "greg" else {}
        sp = state.finish("sparse", stage_training("sparse", "train", sparse_train, model, sparse_epochs, sr=sr,
                                                   sr_schedule=sr_schedule, gamma_threshold=gamma_threshold,
                                                   sr_mode=sr_mode, sr_group=sr_group, sr_head=sr_head,
                                                   greg_ramp=greg_ramp, **greg))
        if sp.get("free_macs_after") is not None:
            LOGGER.info("sparse: %.1f%% of the gammas are 0; pruning at |gamma| < %g frees %.1f%% of the MACs",
                        100 * (sp.get("gamma_zero_after") or 0), gamma_threshold, 100 * sp["free_macs_after"])
    if sp is not None and (sp.get("last") or sp.get("best")):
        current = sp.get("last") or sp["best"]

    # 3. prune (in steps, with short fine-tunes in between) ----------------------------------------------
    pr = state.done("prune")
    if pr is None:
        LOGGER.info("[3/6] prune: method=%s %s in %d step(s)", method,
                    f"ratio={ratio}" if ratio is not None else f"target_macs={target_macs}", steps)
        records = []
        prev_ckpt, prev_macs = current, base["macs"]
        for step in range(1, steps + 1):
            if ratio is not None:
                step_kw = {"ratio": 1 - (1 - ratio) ** (1 / steps), "target_macs": None}
            else:
                goal = 1 - (1 - target_macs) * step / steps
                step_kw = {"target_macs": min(1.0, goal * base["macs"] / prev_macs), "ratio": None}
            free = {"threshold": threshold} if threshold is not None and step == 1 else {}
            res = prune(prev_ckpt, data=data, seed=seed, project=save_dir / "prune", name=f"step{step}",
                        exist_ok=True, imgsz=imgsz, **prune_options, **step_kw, **free)
            record = {"step": step, "checkpoint": str(res.checkpoint), "macs": res.macs_after,
                      "params": res.params_after, "size_mb": res.size_mb_after,
                      "macs_fraction": res.macs_after / base["macs"], "prune_seconds": res.seconds,
                      "macs_fraction_free": res.macs_ratio_free, "channels_free": res.channels_free,
                      "layers": [dataclasses.asdict(x) for x in res.layers]}
            v = evaluate(res.model, data, save_dir=res.save_dir / "val", **val_kw)
            record.update(map50_95_pruned=v.map50_95, map50_pruned=v.map50)
            ckpt = res.checkpoint
            if steps > 1 and step_epochs > 0:
                tuned = finetune(res.checkpoint, data, epochs=step_epochs, project=save_dir / "finetune", name=f"step{step}",
                                 exist_ok=True, **train_kw)
                ckpt = tuned.best or tuned.last
                v = evaluate(ckpt, data, save_dir=tuned.save_dir / "val", **val_kw)
                record.update(finetuned=str(ckpt), map50_95=v.map50_95, map50=v.map50)
            else:
                record.update(map50_95=v.map50_95, map50=v.map50)
            if max_map_drop is not None and base["map50_95"] - record["map50_95"] > max_map_drop and records:
                LOGGER.warning("step %d dropped mAP50-95 by %.3f > max_map_drop=%s: keeping step %d",
                               step, base["map50_95"] - record["map50_95"], max_map_drop, step - 1)
                record["rejected"] = True
                records.append(record)
                break
            records.append(record)
            prev_ckpt, prev_macs = ckpt, res.macs_after
        kept = [r for r in records if not r.get("rejected")][-1]
        pr = state.finish("prune", {"steps": records, "kept_step": kept["step"],
                                    "checkpoint": kept.get("finetuned") or kept["checkpoint"],
                                    "pruned_checkpoint": kept["checkpoint"]})
    kept = next(r for r in pr["steps"] if r["step"] == pr["kept_step"])

    # 4. finetune -------------------------------------------------------------------------------------
    ft = state.done("finetune")
    if ft is None and finetune_epochs > 0:
        LOGGER.info("[4/6] finetune: %d epochs", finetune_epochs)
        ft = state.finish("finetune", stage_training("finetune", "final", finetune, pr["checkpoint"], finetune_epochs))
    final = Path((ft or {}).get("best") or (ft or {}).get("last") or pr["checkpoint"])

    # 5. val ------------------------------------------------------------------------------------------
    va = state.done("val")
    if va is None:
        LOGGER.info("[5/6] val: COCO evaluation of %s", final)
        v = evaluate(final, data, save_dir=save_dir / "val", **val_kw)
        st = model_stats(final, imgsz=imgsz)
        va = state.finish("val", {"map50_95": v.map50_95, "map50": v.map50, "params": st.params, "macs": st.macs,
                                  "size_mb": st.size_mb, "checkpoint": str(final)})

    # 6. bench ----------------------------------------------------------------------------------------
    be = state.done("bench")
    if be is None and bench and backends:
        LOGGER.info("[6/6] bench: CPU latency, dense vs pruned (%s)", ", ".join(backends))
        from .bench import measure_latency

        lat = measure_latency({"dense": model, "pruned": final}, imgsz=imgsz, backends=tuple(backends),
                              runs=bench_runs, warmup=bench_warmup, seed=seed, progress=verbose)
        be = state.finish("bench", lat.to_dict())

    result = _report(save_dir, state, base, sp, pr, kept, va, be, final, imgsz, time.perf_counter() - t_start)
    return result


def _report(save_dir, state, base, sp, pr, kept, va, be, final, imgsz, seconds) -> PipelineResult:
    from .report import plot_gamma_histograms, plot_layer_channels, plot_map_vs_macs
    from .pruning import LayerChange

    def lat(model: str, backend: str) -> float | None:
        for e in (be or {}).get("entries", []):
            if e["model"] == model and e["backend"] == backend:
                return e["median_ms"]
        return None

    rows = [
        ("params (M)", base["params"] / 1e6, va["params"] / 1e6),
        (f"GMACs @{imgsz}", base["macs"] / 1e9, va["macs"] / 1e9),
        ("size (MB)", base["size_mb"], va["size_mb"]),
        ("mAP50-95 right after pruning", base["map50_95"], kept.get("map50_95_pruned")),
        ("mAP50 right after pruning", base["map50"], kept.get("map50_pruned")),
        ("mAP50-95", base["map50_95"], va["map50_95"]),
        ("mAP50", base["map50"], va["map50"]),
    ]
    for backend in ("torch", "onnx"):
        if lat("dense", backend) is not None:
            rows.append((f"CPU latency {backend} (ms)", lat("dense", backend), lat("pruned", backend)))
    rows = [(k, a, b, _ratio(a, b)) for k, a, b in rows]

    layers = [LayerChange(**x) for x in kept["layers"]]
    plot_layer_channels(layers, save_dir / "channels.png")
    lines = ["name,channels_before,channels_after"] + [f"{x.name},{x.channels_before},{x.channels_after}" for x in layers]
    write_text(save_dir / "layers.csv", "\n".join(lines) + "\n")
    points = [(1.0, base["map50_95"], "dense")]
    for r in pr["steps"]:
        points.append((r["macs_fraction"], r["map50_95_pruned"], f"step {r['step']} pruned"))
        if r.get("finetuned"):
            points.append((r["macs_fraction"], r["map50_95"], f"step {r['step']} tuned"))
    points.append((va["macs"] / base["macs"], va["map50_95"], "final"))
    plot_map_vs_macs(points, save_dir / "map_vs_macs.png")
    sparse_lines: list[str] = []
    if sp and (sp.get("last") or sp.get("best")):
        hists = {"before sparsity training": _abs_gammas(base["source"]),
                 "after": _abs_gammas(sp.get("last") or sp["best"])}
        plot_gamma_histograms(hists, save_dir / "gamma_hist.png", threshold=sp.get("gamma_threshold"))
        curve = Path(sp["save_dir"]) / "results.csv"
        if curve.is_file():
            from .train.sparse import plot_sparsity_curve

            plot_sparsity_curve(curve, save_dir / "sparsity.png", threshold=sp.get("gamma_threshold") or 0.01)
        if sp.get("free_macs_after") is not None:
            sparse_lines = [f"Sparse stage ({sp.get('sr_mode')}, sr={sp.get('sr')}): "
                            f"{100 * (sp.get('gamma_zero_after') or 0):.1f}% of the BN gammas exactly 0, "
                            f"{100 * sp['free_macs_after']:.1f}% of the conv MACs removable for free "
                            f"(|gamma| < {sp.get('gamma_threshold')}).", ""]
        if kept.get("macs_fraction_free") is not None:
            sparse_lines += [f"Prune stage: the free removal of {kept.get('channels_free')} zeroed channels kept "
                             f"{kept['macs_fraction_free']:.3f} of the conv MACs; ranking with the method did "
                             "the rest.", ""]

    report = {"save_dir": str(save_dir), "final_checkpoint": str(final), "seconds": seconds,
              "sparse_free_macs": (sp or {}).get("free_macs_after"), "sparse_gamma_zero": (sp or {}).get("gamma_zero_after"),
              "table": [dict(zip(("metric", "before", "after", "ratio"), r)) for r in rows],
              "stages": state.data["stages"], "args": state.data["args"]}
    write_json(save_dir / "report.json", report)
    md = ["# yolo-prune pipeline report", "", f"final model: `{final}`", "",
          markdown_table(rows, header=("", "before", "after", "ratio")), "",
          "![channels kept per layer](channels.png)", "", "![mAP vs MACs](map_vs_macs.png)", ""]
    md += sparse_lines
    if (save_dir / "gamma_hist.png").is_file():
        md += ["![BN gamma before/after sparsity training](gamma_hist.png)", ""]
    if (save_dir / "sparsity.png").is_file():
        md += ["![MACs removable for free per sparse epoch](sparsity.png)", ""]
    write_text(save_dir / "report.md", "\n".join(md))
    return PipelineResult(save_dir=save_dir, final=final, rows_=rows, steps=pr["steps"], seconds=seconds)


def _absolute(path: Any) -> str:
    """An existing file as an absolute path (pipeline.json must resume from any working folder), else ``str``."""
    return str(Path(path).absolute()) if isinstance(path, (str, Path)) and Path(path).is_file() else str(path)


def _pipeline_teacher(teacher: Any, model: Any, nc: int, save_dir: Path) -> str | None:
    """The teacher checkpoint of every training stage: ``"auto"`` is the input model (saved as ``teacher.pt`` in the
    run folder when it is in memory), skipped with a warning when its class count differs from the data's."""
    if teacher is None or teacher is False or str(teacher).strip().lower() in ("", "none", "null", "false"):
        return None
    if str(teacher).strip().lower() != "auto":
        return str(Path(str(teacher)).expanduser().absolute())
    from .models import load_model

    if isinstance(model, (str, Path)):
        if Path(model).suffix.lower() != ".pt":
            return None  # a yaml: random init, nothing to learn from
        path = Path(model).expanduser().absolute()
        head_nc = int(load_model(path).model.model[-1].nc)
    else:
        from .train.common import save_input_checkpoint, unwrap_detection_model

        net = unwrap_detection_model(load_model(model))
        head_nc = int(net.model[-1].nc)
        path = save_dir / "teacher.pt"
        if not path.is_file():
            save_input_checkpoint(net, path)
    if head_nc != nc:
        LOGGER.warning("teacher=auto: the input model has %d classes but the data has %d; training without a "
                       "teacher", head_nc, nc)
        return None
    return str(path)


def train_stage(fn, source: Any, data: Any, folder: Path, epochs: int, *, resume: bool, **kw: Any) -> dict[str, Any]:
    """Train ``source`` with ``fn`` (``finetune`` / ``sparse_train``) into ``folder``; the stage's outputs as a dict.

    With ``resume``, a run in ``folder`` that finished but was not yet recorded is taken as it is, and an
    interrupted one continues from its ``last.pt``. Used by :func:`pipeline` and :func:`yolo_prune.sparsify.sparsify`.
    """
    last = folder / "weights" / "last.pt"
    if resume and last.is_file() and _training_finished(last):  # finished, but not yet recorded
        best = folder / "weights" / "best.pt"
        return {"save_dir": str(folder), "best": str(best if best.is_file() else last), "last": str(last),
                "epochs": epochs}
    if resume and last.is_file():
        result = fn(last, data, resume=last, project=folder.parent, name=folder.name, **kw)
    else:
        result = fn(source, data, epochs=epochs, project=folder.parent, name=folder.name, exist_ok=True, **kw)
    return dataclasses.asdict(result)


def _training_finished(last: Path) -> bool:
    """ultralytics strips the optimizer from last.pt (and sets epoch -1) when a run completes."""
    import torch

    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    return ckpt.get("epoch", -1) < 0 or ckpt.get("optimizer") is None


def _abs_gammas(model: Any) -> list[float]:
    import torch

    from .models import load_model

    net = load_model(model).model
    return torch.cat([m.weight.detach().abs().flatten().float() for m in net.modules()
                      if isinstance(m, torch.nn.BatchNorm2d)]).tolist()


# arguments a resumed pipeline takes from its pipeline.json, in pipeline()'s order
_DISTILL_KEYS = ("teacher", "distill", "distill_cls", "distill_box", "distill_temp", "labels", "unlabeled")
_RESUMED = ("model", "sparse_epochs", "sr", "sr_schedule", "gamma_threshold", "target_macs", "ratio", "steps",
            "step_epochs", "max_map_drop", "finetune_epochs", "imgsz", "batch", "seed", "train_args", "sr_mode",
            "sr_group", "sr_head", "greg_ramp", "threshold")
# options pipeline() forwards to prune(), and configuration keys that map one to one onto its arguments
_PRUNE_OPTIONS = {"method", "global_pruning", "max_layer_ratio", "round_to", "tolerance", "calib_images", "compensate",
                  "recalibrate", "allocation", "sensitivity", "search_candidates"}
_PIPELINE_KEYS = ("sparse_epochs", "sr", "sr_schedule", "sr_mode", "sr_group", "sr_head", "greg_ramp",
                  "gamma_threshold", "threshold", "target_macs", "ratio", "steps",
                  "step_epochs", "max_map_drop", "finetune_epochs", "imgsz", "batch", "workers", "device", "seed",
                  "bench_runs", "bench_warmup", "resume", "verbose", "teacher", "distill", "distill_cls",
                  "distill_box", "distill_temp", "labels", "unlabeled", *sorted(_PRUNE_OPTIONS))


def _pipeline_kwargs(cfg: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    backends = tuple(b.strip() for b in str(cfg["backends"]).split(",") if b.strip())
    kw = {"backends": backends, "train_args": extra, **{k: cfg[k] for k in _PIPELINE_KEYS}}
    if kw["target_macs"] is None:
        kw["target_macs"] = 0.5
    return kw


def pipeline_from_cfg(cfg: dict[str, Any], extra: dict[str, Any]) -> PipelineResult:
    """Run :func:`pipeline` from a merged CLI configuration (see :mod:`yolo_prune.config`)."""
    if cfg.get("target_latency") is not None or cfg.get("target_ms") is not None or cfg.get("round_to") == "auto":
        from .errors import UsageError

        raise UsageError("the pipeline prunes to MACs targets only (latency targets and round_to=auto: run "
                         "'yolo-prune prune target_latency=...', then 'yolo-prune finetune')")
    resume_dir = cfg["model"] if cfg["resume"] and Path(str(cfg["model"])).is_dir() else None  # model=<run folder>
    return pipeline(cfg["model"], cfg["data"], project=cfg["project"], name=cfg["name"], exist_ok=cfg["exist_ok"],
                    save_dir=resume_dir, **_pipeline_kwargs(cfg, extra))


def demo(cfg: dict[str, Any], extra: dict[str, Any]) -> PipelineResult:
    """``yolo-prune demo``: generate the synthetic dataset, train a small dense model, then run the pipeline.

    Settings come from ``cfg/demo.yaml`` (merged by :func:`yolo_prune.config.build`), so any of them can
    be overridden on the command line. Nothing is downloaded.
    """
    import os

    from .data.synthetic import make_synthetic
    from .train.common import quiet_logs
    from .train.progress import EpochProgress

    cache = Path(os.environ.get("YOLO_PRUNE_CACHE") or Path.home() / ".cache" / "yolo_prune")
    data = cfg["data"] or make_synthetic(cache / "demo_data", n_train=128, n_val=32, imgsz=256, seed=cfg["seed"]) / "yolo.yaml"
    if cfg["resume"]:
        save_dir = run_path(cfg["project"], "demo", cfg["name"])
    else:
        save_dir = run_dir(cfg["project"], "demo", cfg["name"], exist_ok=cfg["exist_ok"])
    dense = save_dir / "dense" / "weights" / "best.pt"
    if not dense.is_file():
        from ultralytics import YOLO

        LOGGER.info("demo: training a dense %s for %d epochs on %s (it stands in for your trained model)", cfg["model"],
                    cfg["epochs"], data)
        yolo = YOLO(str(cfg["model"]))
        if not cfg["verbose"]:
            EpochProgress("dense").attach(yolo)
        with quiet_logs(cfg["verbose"]):
            yolo.train(
                data=str(data), epochs=cfg["epochs"], imgsz=cfg["imgsz"], batch=cfg["batch"], workers=cfg["workers"],
                device=cfg["device"] or None, seed=cfg["seed"], project=str(save_dir), name="dense", exist_ok=True,
                save_dir=str(save_dir / "dense"),
                plots=False, val=False, verbose=cfg["verbose"], **extra)
    result = pipeline(dense, data, save_dir=save_dir, **_pipeline_kwargs(cfg, extra))
    LOGGER.info("demo: the pruned model trained %d epochs more than the dense one (sparse + finetune), which is "
                "part of its mAP; BENCHMARKS.md compares at equal training budget", cfg["sparse_epochs"] +
                cfg["finetune_epochs"])
    return result
