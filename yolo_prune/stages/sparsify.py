"""The ``yolo-prune sparsify`` stage: fine-grained (unstructured) pruning of a checkpoint, with its report.

The stage (:func:`sparsify`): load -> mask -> remove -> (fine-tune, in ``steps``) -> save -> report, over the run
module (:mod:`yolo_prune.run`: run folder state, ``resume``, stepped runs, the closing benchmark). What it builds on
lives below it:

* the weight masks, their permanence, the sparsity mark, the BatchNorm correction and the checkpoint sizes:
  :mod:`yolo_prune.pruning.masks`;
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

from .. import run
from ..data import resolve_data
from ..errors import UsageError
from ..evaluate import evaluate
from ..io import write_json, write_text
from ..logs import LOGGER, listening
from ..models import load_model, save_checkpoint
from ..options import (BenchOptions, Options, PruneOptions, RunOptions, Settings, SparsifyOptions, StageOptions,
                       TrainOptions, settings)
from ..provenance import provenance
from ..data.calibration import load_calibration_images
from ..pruning.masks import (SPARSITY_ATTR, LayerSparsity, check_mask_options, checkpoint_sizes, count_nonzero,
                             global_sparsity, layer_sparsity, model_sizes, sparsify_module)
from ..report import plot_layer_sparsity, plot_weight_histograms
from ..results import Result, markdown_table, table
from ..train import finetune

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
GROUPS = (SparsifyOptions, PruneOptions, StageOptions, TrainOptions, BenchOptions, RunOptions)
STATE_FILE = "sparsify.json"


@dataclasses.dataclass
class _Run:
    """What every step of one sparsify run reads."""

    s: Settings
    method: str
    amount: float
    data: Any
    calib: Any
    save_dir: Path
    state: run.RunState
    train_args: dict[str, Any]

    @property
    def val_kw(self) -> dict[str, Any]:
        """The evaluation keys; progress lines when someone listens to the ``yolo_prune`` logger (the CLI)."""
        return dict(imgsz=self.s.train.imgsz, batch=self.s.train.batch, device=self.s.train.device,
                    progress=listening())

    @property
    def tune(self) -> bool:
        return self.s.prune.steps > 1 and self.s.stage.step_epochs > 0


def sparsify(model: Any, *options: Options, data: str | Path | None = None, train_args: dict[str, Any] | None = None,
             bench: bool = True, **overrides: Any) -> SparsifyResult:
    """Set ``amount`` of the conv weights of ``model`` to zero (unstructured), permanently, and report.

    ``model`` is a ``.pt`` checkpoint (dense, or channel-pruned by yolo-prune), a model yaml, a ``YOLO`` object or a
    ``DetectionModel``; it is never modified. Options (objects or keys by name, see ``yolo-prune cfg``):

    - ``amount``, ``scope`` (``global``/``layer``), ``layers`` (``conv``/``all``) and ``method`` (``l1``, the
      default; ``random``; ``percentile``): what is zeroed;
    - with ``data``: mAP before and after; ``compensate`` (anything but ``none``) corrects every BatchNorm's running
      statistics for the zeros on ``calib_images`` train images (32 unless given); no weight changes;
    - ``steps``, ``step_epochs``, ``max_map_drop``: reach ``amount`` in ``steps`` equal increments, each followed
      (when ``steps > 1``) by ``step_epochs`` of fine-tuning that keeps the zeros; stop at the first step whose
      mAP50-95 is more than ``max_map_drop`` below the dense model's and keep the step before;
    - ``bench_runs``, ``bench_warmup``, ``backends`` (and ``bench=False`` to skip): CPU latency, dense against
      sparse (it does not improve: see :data:`SPEED_NOTE`);
    - ``project``, ``name``, ``exist_ok``, ``resume``: the run folder (default ``runs/sparsify/sparsify``);
      ``resume=True`` continues an interrupted run from its ``sparsify.json``.

    ``train_args`` are extra ultralytics train keys for the fine-tuning steps. The run folder gets
    ``weights/sparse.pt`` (plain tensors with zeros: ``YOLO(path)`` loads it, ``yolo-prune finetune`` keeps its
    zeros), ``report.json`` / ``report.md``, ``layers.csv``, ``sparsity.png`` and ``weight_hist.png``.
    """
    if not any(isinstance(o, PruneOptions) for o in options):
        overrides = {"calib_images": 32, **overrides}
    t_start = time.perf_counter()
    opts = settings(GROUPS, options, overrides, where="sparsify")
    dense = copy.deepcopy(load_model(model).model).float().cpu().eval()  # another task: refused before any work
    ctx = _start(model, data, opts, train_args or {})
    s = ctx.s
    base = _baseline(ctx, dense)

    def one_step(step: int, current: Any, records: list) -> dict[str, Any]:
        return _sparsify_step(ctx, step, current)

    records, kept = run.stepped(ctx.state, s.prune.steps, one_step, start=dense, base_map=base["map50_95"],
                                max_map_drop=s.stage.max_map_drop, what="sparsify step")
    final_ckpt = ctx.save_dir / "weights" / "sparse.pt"
    fin = ctx.state.done("final") or ctx.state.finish("final", _write_final(final_ckpt, kept, model, s.train.seed,
                                                                            ctx.state.args))
    lat = ctx.state.done("bench")
    if bench:
        lat = run.bench_stage(ctx.state, {"dense": dense, "sparse": final_ckpt}, imgsz=s.train.imgsz,
                              backends=run.backend_list(s.bench.backends), runs=s.bench.bench_runs,
                              warmup=s.bench.bench_warmup, seed=s.train.seed, verbose=s.run.verbose)
    result = _result(ctx, base, fin, kept, records, lat, final_ckpt, time.perf_counter() - t_start)
    _write_report(result, dense, final_ckpt, base)
    return result


def _start(model: Any, data: Any, s: Settings, train_args: dict[str, Any]) -> _Run:
    """Check the options and the data, load the calibration images, open the run folder and its state."""
    method = s.prune.method or "l1"
    if s.prune.steps == "auto":  # the pipeline's choice from a trial prune; sparsify reaches amount in one step
        s = s.with_(s.prune.replace(steps=1))
    amount = check_mask_options(s.sparsify.amount, s.sparsify.scope, method, s.sparsify.layers)
    tune = s.prune.steps > 1 and s.stage.step_epochs > 0
    if (tune or s.stage.max_map_drop is not None) and data is None:
        raise UsageError("sparsify with steps>1 (fine-tuning between steps) or max_map_drop needs data=<dataset yaml>")
    calib = None
    if data is not None:
        spec = resolve_data(data)  # fails early on a bad dataset
        if s.prune.compensate not in ("none", False) and s.prune.calib_images > 0:
            calib = load_calibration_images(spec.train_images, n=s.prune.calib_images, imgsz=s.train.imgsz,
                                            seed=s.train.seed, progress=listening())
    folder = run.open_folder("sparsify", project=s.run.project, name=s.run.name, exist_ok=s.run.exist_ok,
                             resume=s.run.resume, state_file=STATE_FILE)
    args = dict(model=str(model), amount=amount, scope=s.sparsify.scope, method=method, layers=s.sparsify.layers,
                data=data, compensate=calib is not None, calib_images=s.prune.calib_images, steps=s.prune.steps,
                step_epochs=s.stage.step_epochs, max_map_drop=s.stage.max_map_drop, imgsz=s.train.imgsz,
                batch=s.train.batch, seed=s.train.seed)
    state = run.start(folder, STATE_FILE, args, resume=s.run.resume)  # a reused folder (exist_ok) starts afresh
    return _Run(s=s, method=method, amount=amount, data=data, calib=calib, save_dir=folder, state=state,
                train_args=dict(train_args))


def _baseline(ctx: _Run, dense: nn.Module) -> dict[str, Any]:
    """The dense model's size, sparsity and mAP (stage ``baseline``)."""
    base = ctx.state.done("baseline")
    if base is None:
        size, gz = model_sizes(dense, ctx.save_dir)
        nz, total = count_nonzero(dense)
        base = {"size": size, "gzip": gz, "nonzero": nz, "params": total, "map50_95": None, "map50": None,
                "sparsity": global_sparsity(layer_sparsity(dense, layers=ctx.s.sparsify.layers))}
        if ctx.data is not None:
            v = evaluate(dense, ctx.data, save_dir=ctx.save_dir / "val_before", **ctx.val_kw)
            base.update(map50_95=v.map50_95, map50=v.map50)
        base = ctx.state.finish("baseline", base)
    return base


def _sparsify_step(ctx: _Run, step: int, current: Any) -> dict[str, Any]:
    """One increment: sparsify ``current`` to its share of ``amount``, evaluate, fine-tune (keeping the zeros),
    evaluate."""
    s, steps = ctx.s, ctx.s.prune.steps
    amount = ctx.amount * step / steps
    LOGGER.info("sparsify step %d/%d: %s %s to %.3f of the %s weights", step, steps, ctx.method, s.sparsify.scope,
                amount, s.sparsify.layers)
    module = copy.deepcopy(current if isinstance(current, nn.Module) else load_model(current).model).float().cpu()
    t0 = time.perf_counter()
    rows = sparsify_module(module, amount=amount, scope=s.sparsify.scope, method=ctx.method, layers=s.sparsify.layers,
                           seed=s.train.seed + step - 1, calib=ctx.calib)
    record: dict[str, Any] = {"step": step, "amount": amount, "sparsity": global_sparsity(rows),
                              "bn_corrected": ctx.calib is not None, "seconds": time.perf_counter() - t0}
    # one step: straight to the final checkpoint (rewritten with its provenance by _write_final)
    ckpt = save_checkpoint(module, ctx.save_dir / "weights" / "sparse.pt" if steps == 1 else
                           ctx.save_dir / "steps" / f"step{step}.pt")
    record["checkpoint"] = str(ckpt)
    if ctx.data is not None:
        v = evaluate(ckpt, ctx.data, save_dir=ctx.save_dir / "val" / f"step{step}", **ctx.val_kw)
        record.update(map50_95_sparse=v.map50_95, map50_sparse=v.map50, map50_95=v.map50_95, map50=v.map50)
    if ctx.tune:
        t = s.train
        out = run.train_stage(finetune, ckpt, ctx.data, ctx.save_dir / "finetune" / f"step{step}", s.stage.step_epochs,
                              resume=s.run.resume, imgsz=t.imgsz, batch=t.batch, device=t.device, seed=t.seed,
                              verbose=s.run.verbose, workers=t.workers, **ctx.train_args)
        tuned = out.get("best") or out.get("last")
        v = evaluate(tuned, ctx.data, save_dir=Path(out["save_dir"]) / "val", **ctx.val_kw)
        record.update(finetuned=str(tuned), map50_95=v.map50_95, map50=v.map50)
    return record


def _result(ctx: _Run, base: dict, fin: dict, kept: dict, records: list, lat: dict | None, final_ckpt: Path,
            seconds: float) -> SparsifyResult:
    sp = ctx.s.sparsify
    return SparsifyResult(
        save_dir=ctx.save_dir, checkpoint=final_ckpt, amount=ctx.amount, scope=sp.scope, method=ctx.method,
        layers=sp.layers, imgsz=ctx.s.train.imgsz, sparsity=fin["sparsity"], sparsity_before=base["sparsity"],
        selected_params=fin["selected_params"], params=fin["params"],
        nonzero_before=base["nonzero"], nonzero_after=fin["nonzero"], size_before=base["size"],
        size_after=fin["size"], gzip_before=base["gzip"], gzip_after=fin["gzip"],
        map50_95_before=base["map50_95"], map50_95_after=kept.get("map50_95"), map50_before=base["map50"],
        map50_after=kept.get("map50"), latency_ms=_latency_pairs(lat), kept_step=kept["step"],
        seconds=seconds, steps=records, layer_rows=[LayerSparsity(**r) for r in fin["layers"]],
    )


def _write_final(final_ckpt: Path, kept: dict[str, Any], source: Any, seed: int, args: dict[str, Any]) -> dict[str, Any]:
    """Write the kept step's model as ``weights/sparse.pt`` with its provenance; its sparsity facts for the state."""

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
