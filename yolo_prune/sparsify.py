"""The ``yolo-prune sparsify`` stage: fine-grained (unstructured) pruning of a checkpoint, with its report.

The stage (:func:`sparsify`): load -> mask -> remove -> (fine-tune, in ``steps``) -> save -> report, with the
pipeline's run-folder state (:class:`yolo_prune.pipeline._State`) for ``resume``. What it builds on lives below it:

* the weight masks, their permanence, the sparsity mark, the BatchNorm correction and the checkpoint sizes:
  :mod:`yolo_prune.pruning.masks` (re-exported here);
* the fine-tuning that keeps the zeros: :class:`yolo_prune.train.keep_zeros.KeepZerosMixin`.

Unstructured zeros keep every tensor's shape: dense runtimes (PyTorch, onnxruntime on CPU) do exactly the
same work, so the model is not faster. The saving is in the compressed checkpoint, on sparse-aware runtimes
and hardware, and in combination with channel pruning (``yolo-prune prune`` first).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .errors import UsageError
from .logs import LOGGER
from .pruning.masks import (
    LAYER_SETS,
    METHODS,
    SCOPES,
    SPARSITY_ATTR,
    LayerSparsity,
    PercentileUnstructured,
    _check,
    _model_sizes,
    apply_masks,
    apply_zero_masks,
    batchnorm_input_stats,
    checkpoint_sizes,
    correct_batchnorm,
    count_nonzero,
    global_sparsity,
    layer_sparsity,
    make_permanent,
    percentile_threshold,
    percentile_unstructured,
    prunable_convs,
    sparsify_module,
    zero_masks,
)
from .results import Result, markdown_table, table

__all__ = [
    "SPEED_NOTE",
    "SparsifyResult",
    "sparsify",
    "sparsify_from_cfg",
    # re-exported from yolo_prune.pruning.masks, where they live now
    "LAYER_SETS",
    "METHODS",
    "SCOPES",
    "SPARSITY_ATTR",
    "LayerSparsity",
    "PercentileUnstructured",
    "apply_masks",
    "apply_zero_masks",
    "batchnorm_input_stats",
    "checkpoint_sizes",
    "correct_batchnorm",
    "count_nonzero",
    "global_sparsity",
    "layer_sparsity",
    "make_permanent",
    "percentile_threshold",
    "percentile_unstructured",
    "prunable_convs",
    "sparsify_module",
    "zero_masks",
]

SPEED_NOTE = ("Unstructured zeros do not make a dense runtime faster: every tensor keeps its shape and "
              "PyTorch or onnxruntime on CPU still multiply by each zero, so expect a latency ratio near 1 "
              "(differences measured on a busy machine are noise). The saving is the compressed checkpoint; "
              "speed needs a sparse-aware runtime or hardware, or channel pruning (yolo-prune prune).")


# --------------------------------------------------------------------------------------------- result
@dataclasses.dataclass
class SparsifyResult(Result):
    """What :func:`sparsify` did. ``str()`` prints the before/after table; ``model`` loads the checkpoint."""

    save_dir: Path
    checkpoint: Path
    amount: float
    scope: str
    method: str
    layers: str
    imgsz: int
    sparsity: float  # fraction of the selected conv weights that are 0
    sparsity_before: float
    selected_params: int
    params: int
    nonzero_before: int
    nonzero_after: int
    size_before: int
    size_after: int
    gzip_before: int
    gzip_after: int
    map50_95_before: float | None = None
    map50_95_after: float | None = None
    map50_before: float | None = None
    map50_after: float | None = None
    latency_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # backend -> [dense, sparse]
    kept_step: int = 1
    seconds: float = 0.0
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)
    layer_rows: list[LayerSparsity] = dataclasses.field(default_factory=list, repr=False)

    @property
    def model(self) -> Any:
        from .models import load_model

        return load_model(self.checkpoint)

    def comparison(self) -> list[tuple[str, Any, Any, Any]]:
        def row(label, a, b):
            return (label, a, b, (b / a) if a and b is not None else None)

        rows = [
            row("sparsity of selected weights", self.sparsity_before, self.sparsity),
            row("non-zero params (M)", self.nonzero_before / 1e6, self.nonzero_after / 1e6),
            row("checkpoint (MB)", self.size_before / 1e6, self.size_after / 1e6),
            row("gzip checkpoint (MB)", self.gzip_before / 1e6, self.gzip_after / 1e6),
        ]
        if self.map50_95_before is not None:
            rows.append(row("mAP50-95", self.map50_95_before, self.map50_95_after))
            rows.append(row("mAP50", self.map50_before, self.map50_after))
        for backend, (a, b) in self.latency_ms.items():
            rows.append(row(f"CPU latency {backend} (ms)", a, b))
        return rows

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layer_rows"}
        d["layers_sparsity"] = [{**dataclasses.asdict(r), "sparsity": r.sparsity} for r in self.layer_rows]
        d["table"] = [dict(zip(("metric", "before", "after", "ratio"), r)) for r in self.comparison()]
        d["speed_note"] = SPEED_NOTE
        return d

    def __str__(self) -> str:
        head = (f"SparsifyResult: amount={self.amount} scope={self.scope} method={self.method} layers={self.layers}, "
                f"{self.seconds:.1f} s\ncheckpoint: {self.checkpoint}")
        if len(self.steps) > 1:
            head += f" (step {self.kept_step} of {len(self.steps)})"
        return head + "\n" + table(self.comparison(), header=("", "before", "after", "ratio"))


# --------------------------------------------------------------------------------------------- the stage
def sparsify(
    model: Any,
    *,
    amount: float = 0.5,
    scope: str = "global",
    method: str = "l1",
    layers: str = "conv",
    data: str | Path | None = None,
    compensate: bool = True,
    calib_images: int = 32,
    steps: int = 1,
    step_epochs: int = 1,
    max_map_drop: float | None = None,
    imgsz: int = 640,
    batch: int = 16,
    workers: int = 2,
    device: str | None = None,
    seed: int = 0,
    bench: bool = True,
    bench_runs: int = 30,
    bench_warmup: int = 5,
    backends: Sequence[str] = ("torch", "onnx"),
    project: str | Path | None = None,
    name: str | None = None,
    exist_ok: bool = False,
    resume: bool = False,
    verbose: bool = False,
    train_args: dict[str, Any] | None = None,
) -> SparsifyResult:
    """Set ``amount`` of the conv weights of ``model`` to zero (unstructured), permanently, and report.

    Args:
        model: a ``.pt`` checkpoint (dense, or channel-pruned by yolo-prune), a model yaml, a ``YOLO`` object or a
            ``DetectionModel``; it is never modified.
        amount: fraction of the selected weights that are 0 afterwards, in [0, 1).
        scope: ``global`` (one ranking / threshold across all selected weights) or ``layer`` (each layer by the
            same amount).
        method: ``l1`` (smallest |w|), ``random``, or ``percentile`` (cut below the percentile of |w|).
        layers: ``conv`` (every conv but Detect's box/class outputs and the DFL) or ``all`` (with the box/class
            outputs).
        data: a dataset yaml: mAP before and after, the BatchNorm correction and the fine-tuning between steps.
        compensate, calib_images: with ``data``, correct every BatchNorm's running statistics for the zeroed
            weights on ``calib_images`` train images (:func:`correct_batchnorm`); no weight changes.
        steps, step_epochs, max_map_drop: reach ``amount`` in ``steps`` equal increments (``amount * k / steps``),
            each followed (when ``steps > 1``) by ``step_epochs`` epochs of fine-tuning that keeps the zeros;
            stop at the first step whose mAP50-95 is more than ``max_map_drop`` below the dense model's and keep
            the step before.
        bench, bench_runs, bench_warmup, backends: measure CPU latency, dense against sparse (it does not
            improve: see :data:`SPEED_NOTE`).
        project, name, exist_ok, resume: the run folder ``project/name`` (default ``runs/sparsify/sparsify``);
            ``resume=True`` continues an interrupted run from its ``sparsify.json``.
        train_args: extra ultralytics train keys for the fine-tuning steps.

    The run folder gets ``weights/sparse.pt`` (plain tensors with zeros: ``YOLO(path)`` loads it,
    ``yolo-prune finetune`` keeps its zeros), ``report.json`` / ``report.md``, ``layers.csv``, ``sparsity.png``
    (per-layer bar chart) and ``weight_hist.png`` (weights of a few layers before and after).
    """
    from .io import run_dir, run_path, write_yaml
    from .models import load_model
    from .pipeline import _State

    amount = _check(amount, scope, method, layers)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps={steps!r} must be an integer >= 1")
    if isinstance(step_epochs, bool) or not isinstance(step_epochs, int) or step_epochs < 0:
        raise UsageError(f"step_epochs={step_epochs!r} must be an integer >= 0")
    tune = steps > 1 and step_epochs > 0
    if (tune or max_map_drop is not None) and data is None:
        raise UsageError("sparsify with steps>1 (fine-tuning between steps) or max_map_drop needs data=<dataset yaml>")
    backends = tuple(b for b in (backends or ()) if b)
    t_start = time.perf_counter()
    calib = None
    if data is not None:
        from .data import resolve_data

        spec = resolve_data(data)  # fails early on a bad dataset
        if compensate and calib_images > 0:
            from .pruning.calibration import load_calibration_images

            calib = load_calibration_images(spec.train_images, n=calib_images, imgsz=imgsz, seed=seed)

    if resume:
        save_dir = run_path(project, "sparsify", name)
        if not (save_dir / "sparsify.json").is_file():
            raise UsageError(f"resume=True but {save_dir} holds no sparsify.json to resume from")
    else:
        save_dir = run_dir(project, "sparsify", name, exist_ok=exist_ok)
    args = dict(model=str(model), amount=amount, scope=scope, method=method, layers=layers, data=data,
                compensate=calib is not None, calib_images=calib_images, steps=steps, step_epochs=step_epochs,
                max_map_drop=max_map_drop, imgsz=imgsz, batch=batch, seed=seed)
    if not resume:
        write_yaml(save_dir / "args.yaml", args)
    state = _State(save_dir / "sparsify.json", args, load=resume)  # a reused folder (exist_ok) starts afresh
    val_kw = dict(imgsz=imgsz, batch=batch, device=device)

    source = load_model(model)
    dense = copy.deepcopy(source.model).float().cpu().eval()

    # baseline: the dense model's size and mAP
    base = state.done("baseline")
    if base is None:
        size, gz = _model_sizes(dense, save_dir)
        nz, total = count_nonzero(dense)
        base = {"size": size, "gzip": gz, "nonzero": nz, "params": total, "map50_95": None, "map50": None,
                "sparsity": global_sparsity(layer_sparsity(dense, layers=layers))}
        if data is not None:
            from .evaluate import evaluate

            v = evaluate(dense, data, save_dir=save_dir / "val_before", **val_kw)
            base.update(map50_95=v.map50_95, map50=v.map50)
        base = state.finish("baseline", base)

    # the steps ------------------------------------------------------------------------------------------
    records: list[dict[str, Any]] = []
    current: Any = dense
    for step in range(1, steps + 1):
        done = state.done(f"step{step}")
        if done is None:
            done = _sparsify_step(state, step, steps, current, amount=amount * step / steps, scope=scope,
                                  method=method, layers=layers, seed=seed, data=data, calib=calib, tune=tune,
                                  step_epochs=step_epochs, resume=resume, save_dir=save_dir, val_kw=val_kw,
                                  train_kw=dict(imgsz=imgsz, batch=batch, device=device, seed=seed, verbose=verbose,
                                                workers=workers, **(train_args or {})), base=base,
                                  max_map_drop=max_map_drop, first=not records)
        records.append(done)
        if done.get("rejected"):
            break
        current = done.get("finetuned") or done["checkpoint"]
    kept = [r for r in records if not r.get("rejected")][-1]

    # the final checkpoint: the kept step, marked and with provenance --------------------------------------
    fin = state.done("final")
    final_ckpt = save_dir / "weights" / "sparse.pt"
    if fin is None:
        fin = _write_final(final_ckpt, kept, model, seed, args)
        fin = state.finish("final", fin)

    # latency (does not improve; measured to show it) ---------------------------------------------------------
    lat = state.done("bench")
    if lat is None and bench and backends:
        from .bench import measure_latency

        res = measure_latency({"dense": dense, "sparse": final_ckpt}, imgsz=imgsz, backends=backends,
                              runs=bench_runs, warmup=bench_warmup, seed=seed, progress=verbose)
        lat = state.finish("bench", res.to_dict())

    result = SparsifyResult(
        save_dir=save_dir, checkpoint=final_ckpt, amount=amount, scope=scope, method=method, layers=layers,
        imgsz=imgsz, sparsity=fin["sparsity"], sparsity_before=base["sparsity"],
        selected_params=fin["selected_params"], params=fin["params"],
        nonzero_before=base["nonzero"], nonzero_after=fin["nonzero"], size_before=base["size"],
        size_after=fin["size"], gzip_before=base["gzip"], gzip_after=fin["gzip"],
        map50_95_before=base["map50_95"], map50_95_after=kept.get("map50_95"), map50_before=base["map50"],
        map50_after=kept.get("map50"), latency_ms=_latency_pairs(lat), kept_step=kept["step"],
        seconds=time.perf_counter() - t_start, steps=records,
        layer_rows=[LayerSparsity(**r) for r in fin["layers"]],
    )
    _write_report(result, dense, final_ckpt, base)
    return result


def _sparsify_step(state, step, steps, current, *, amount, scope, method, layers, seed, data, calib, tune, step_epochs,
                   resume, save_dir, val_kw, train_kw, base, max_map_drop, first) -> dict[str, Any]:
    """One increment: sparsify ``current`` to ``amount``, evaluate, fine-tune (keeping the zeros), evaluate."""
    from .models import load_model, save_checkpoint

    LOGGER.info("sparsify step %d/%d: %s %s to %.3f of the %s weights", step, steps, method, scope, amount, layers)
    module = copy.deepcopy(current if isinstance(current, nn.Module) else load_model(current).model).float().cpu()
    t0 = time.perf_counter()
    rows = sparsify_module(module, amount=amount, scope=scope, method=method, layers=layers, seed=seed + step - 1,
                           calib=calib)
    record: dict[str, Any] = {"step": step, "amount": amount, "sparsity": global_sparsity(rows),
                              "bn_corrected": calib is not None, "seconds": time.perf_counter() - t0}
    # one step: straight to the final checkpoint (rewritten with its provenance by _write_final)
    ckpt = save_checkpoint(module, save_dir / "weights" / "sparse.pt" if steps == 1 else
                           save_dir / "steps" / f"step{step}.pt")
    record["checkpoint"] = str(ckpt)
    if data is not None:
        from .evaluate import evaluate

        v = evaluate(ckpt, data, save_dir=save_dir / "val" / f"step{step}", **val_kw)
        record.update(map50_95_sparse=v.map50_95, map50_sparse=v.map50, map50_95=v.map50_95, map50=v.map50)
    if tune:
        from .pipeline import train_stage
        from .train import finetune

        out = train_stage(finetune, ckpt, data, save_dir / "finetune" / f"step{step}", step_epochs, resume=resume,
                          **train_kw)
        tuned = out.get("best") or out.get("last")
        from .evaluate import evaluate

        v = evaluate(tuned, data, save_dir=Path(out["save_dir"]) / "val", **val_kw)
        record.update(finetuned=str(tuned), map50_95=v.map50_95, map50=v.map50)
    if (max_map_drop is not None and base.get("map50_95") is not None and record.get("map50_95") is not None
            and base["map50_95"] - record["map50_95"] > max_map_drop and not first):
        LOGGER.warning("sparsify step %d dropped mAP50-95 by %.3f > max_map_drop=%s: keeping step %d",
                       step, base["map50_95"] - record["map50_95"], max_map_drop, step - 1)
        record["rejected"] = True
    return state.finish(f"step{step}", record)


def _write_final(final_ckpt: Path, kept: dict[str, Any], source: Any, seed: int, args: dict[str, Any]) -> dict[str, Any]:
    """Write the kept step's model as ``weights/sparse.pt`` with its provenance; its sparsity facts for the state."""
    from .models import load_model, save_checkpoint
    from .provenance import provenance

    module = load_model(kept.get("finetuned") or kept["checkpoint"]).model
    info = getattr(module, SPARSITY_ATTR, None) or {}
    rows = layer_sparsity(module, info.get("params"))
    nz, total = count_nonzero(module)
    prov = provenance(source, seed=seed, stage="sparsify", args=args)
    prov["sparsity"] = {**info, "params": len(info.get("params", [])), "sparsity": global_sparsity(rows),
                        "kept_step": kept["step"]}
    save_checkpoint(module, final_ckpt, train_args=getattr(module, "args", None), provenance=prov)
    size, gz = checkpoint_sizes(final_ckpt)
    return {"checkpoint": str(final_ckpt), "sparsity": global_sparsity(rows),
            "selected_params": sum(r.params for r in rows),
            "nonzero": nz, "params": total, "size": size, "gzip": gz, "layers": [dataclasses.asdict(r) for r in rows]}


def _latency_pairs(lat: dict[str, Any] | None) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for e in (lat or {}).get("entries", []):
        out.setdefault(e["backend"], [None, None])[0 if e["model"] == "dense" else 1] = e["median_ms"]
    return out


def _histogram_layers(rows: Sequence[LayerSparsity], n: int = 4) -> list[str]:
    """A few layers to plot: the first, the largest, one from the middle and the last of the selection."""
    if not rows:
        return []
    largest = max(rows, key=lambda r: r.params).name
    picks = [rows[0].name, largest, rows[len(rows) // 2].name, rows[-1].name]
    return list(dict.fromkeys(picks))[:n]


def _write_report(result: SparsifyResult, dense: nn.Module, final_ckpt: Path, base: dict[str, Any]) -> None:
    from .io import write_json, write_text
    from .models import load_model
    from .report import plot_layer_sparsity, plot_weight_histograms

    save_dir = result.save_dir
    rows = result.layer_rows
    write_json(save_dir / "report.json", result.to_dict())
    write_text(save_dir / "layers.csv", "name,params,zeros,sparsity\n"
               + "".join(f"{r.name},{r.params},{r.zeros},{r.sparsity:.6f}\n" for r in rows))
    plot_layer_sparsity([(r.name, r.sparsity) for r in rows], save_dir / "sparsity.png", overall=result.sparsity)
    after = dict(load_model(final_ckpt).model.named_parameters())
    before = dict(dense.named_parameters())
    hists = {n: (before[f"{n}.weight"].detach().flatten().numpy(), after[f"{n}.weight"].detach().flatten().numpy())
             for n in _histogram_layers(rows) if f"{n}.weight" in before and f"{n}.weight" in after}
    plot_weight_histograms(hists, save_dir / "weight_hist.png")

    steps = []
    for r in result.steps:
        steps.append((r["step"], r["amount"], r["sparsity"], r.get("map50_95_sparse"), r.get("map50_95"),
                      "rejected" if r.get("rejected") else ("kept" if r["step"] == result.kept_step else "")))
    md = [
        "# yolo-prune sparsify report", "",
        f"amount={result.amount}, scope={result.scope}, method={result.method}, layers={result.layers}; "
        f"checkpoint `{result.checkpoint}`", "",
        markdown_table(result.comparison(), header=("", "before", "after", "ratio")), "",
        f"Global sparsity of the {result.selected_params:,} selected conv weights: **{result.sparsity:.4f}**; "
        f"non-zero parameters of the whole model: {result.nonzero_after:,} of {result.params:,} "
        f"(before: {result.nonzero_before:,}).", "",
        *(["BatchNorm running statistics were corrected for the zeros on calibration images from the train split "
            "(`compensate`; no weight changed).", ""] if result.steps and result.steps[0].get("bn_corrected") else []),
        "Checkpoint sizes: the model written as yolo-prune writes checkpoints (fp16, no optimizer), raw and "
        "gzip -9. torch stores tensors uncompressed, so only the compressed size shrinks.", "",
        f"**Speed.** {SPEED_NOTE}", "",
    ]
    if len(steps) > 1:
        md += ["## Steps", "", markdown_table(steps, header=("step", "amount", "sparsity", "mAP50-95 sparsified",
                                                             "mAP50-95 (after fine-tune)", "")), ""]
    md += ["## Per-layer sparsity", "", "![per-layer sparsity](sparsity.png)", "",
           "![weights before/after](weight_hist.png)", "",
           markdown_table([(r.name, r.params, r.zeros, r.sparsity) for r in rows],
                          header=("layer", "weights", "zeros", "sparsity")), ""]
    write_text(save_dir / "report.md", "\n".join(md))


def sparsify_from_cfg(cfg: dict[str, Any], extra: dict[str, Any]) -> SparsifyResult:
    """Run :func:`sparsify` from a merged CLI configuration (see :mod:`yolo_prune.config`)."""
    backends = tuple(b.strip() for b in str(cfg.get("backends") or "").split(",") if b.strip() and b.strip() != "None")
    return sparsify(cfg["model"], amount=cfg["amount"], scope=cfg["scope"], method=cfg["method"], layers=cfg["layers"],
                    data=cfg["data"], compensate=cfg["compensate"] not in ("none", False),
                    calib_images=cfg["calib_images"], steps=cfg["steps"], step_epochs=cfg["step_epochs"],
                    max_map_drop=cfg["max_map_drop"], imgsz=cfg["imgsz"], batch=cfg["batch"], workers=cfg["workers"],
                    device=cfg["device"], seed=cfg["seed"], bench_runs=cfg["bench_runs"],
                    bench_warmup=cfg["bench_warmup"], backends=backends, bench=bool(backends), project=cfg["project"],
                    name=cfg["name"], exist_ok=cfg["exist_ok"], resume=cfg["resume"], verbose=cfg["verbose"],
                    train_args=extra)
