"""The pipeline's closing report: the before/after table (:class:`PipelineResult`), ``report.json``/``report.md``,
``layers.csv`` and the plots."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..forms import PRUNABLE_TASKS
from ..io import write_json, write_text
from ..models import load_model
from .prune import LayerChange
from ..report import plot_gamma_histograms, plot_layer_channels, plot_map_vs_macs, timings_markdown
from ..results import Result, markdown_table, table
from ..run import RunState, latency_of
from ..train.sparse import plot_sparsity_curve


@dataclasses.dataclass
class PipelineResult(Result):
    """The before/after table of a pipeline run; ``model`` is the final ultralytics ``YOLO``."""

    save_dir: Path
    final: Path
    rows_: list[tuple[str, Any, Any, Any]] = dataclasses.field(repr=False)
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)
    seconds: float = 0.0
    warning: list[str] = dataclasses.field(default_factory=list, repr=False)  # the final model is worse: why, what helps

    @property
    def model(self) -> Any:
        return load_model(self.final, tasks=PRUNABLE_TASKS)

    def rows(self) -> list[tuple[str, Any]]:
        return [(r[0], r[2]) for r in self.rows_]

    def __str__(self) -> str:
        text = (f"PipelineResult: {self.save_dir} ({self.seconds / 60:.1f} min)\nfinal model: {self.final}\n"
                + table(self.rows_, header=("", "before", "after", "ratio")))
        return text + "".join(f"\n{'WARNING: ' if i == 0 else '  - '}{line}" for i, line in enumerate(self.warning))


def verdict(base: dict, kept: dict, val: dict, *, target_macs: float | None, steps: int,
            finetune_epochs: int) -> list[str]:
    """Empty when the final model holds the input model's mAP50-95. Otherwise a first line that says so, with the
    mAP measured at each stage, then what would help, read from those measurements."""
    dense, pruned, final = base.get("map50_95"), kept.get("map50_95_pruned"), val.get("map50_95")
    if dense is None or final is None or final >= dense:
        return []
    path = f"input {dense:.3f}" + (f" -> right after pruning {pruned:.3f}" if pruned is not None else "") \
        + f" -> final {final:.3f}"
    lines = [f"the pruned model is worse than the model you gave: mAP50-95 {final:.3f} < {dense:.3f} ({path})"]
    if pruned is not None and dense > 0 and pruned / dense < 0.5:
        milder = f"a milder target (target_macs={min(0.9, round((1 + target_macs) / 2, 2))}), " if target_macs else ""
        how = "steps=auto (gradual pruning within the same epochs)" if steps == 1 else f"more steps (steps={steps + 2})"
        lines.append(f"pruning kept only {pruned / dense:.0%} of the mAP in one go: try {milder}or {how}, with "
                     "max_map_drop= to stop at the last step that holds")
    if pruned is not None and dense > pruned:
        recovered = (final - pruned) / (dense - pruned)
        lines.append(f"fine-tuning won back {recovered:.0%} of the drop in {finetune_epochs} epoch(s): more epochs "
                     f"(finetune_epochs={max(2 * finetune_epochs, finetune_epochs + 10)}) would help")
    return lines


_BOX_MAPS = ("map50_95", "map50")


def val_maps(v: Any) -> dict[str, float | None]:
    """The mAPs of a validation result (``evaluate``'s, or its dict) that the pipeline records: the boxes'
    ``map50_95`` / ``map50`` and every task metric beside them (a field ending in ``map50_95`` or ``map50`` such as
    ``mask_map50_95``, or a dict field with those keys such as ``{"mask": {"map50_95": ...}}``: ``mask_map50_95``),
    whatever the model's task; ultralytics' own (``ul_``) numbers are left out."""
    values = v if isinstance(v, dict) else v.to_dict() if hasattr(v, "to_dict") else dataclasses.asdict(v)
    out: dict[str, float | None] = {k: values.get(k) for k in _BOX_MAPS}
    for key, x in values.items():
        if key in out or key.startswith("ul_"):
            continue
        if isinstance(x, (int, float)) and not isinstance(x, bool) and key.endswith(_BOX_MAPS):
            out[key] = float(x)
        elif isinstance(x, dict):
            out.update({f"{key}_{k}": float(y) for k, y in x.items()
                        if k in _BOX_MAPS and isinstance(y, (int, float)) and not isinstance(y, bool)})
    return out


def _task_rows(base: dict, kept: dict, val: dict) -> list[tuple[str, Any, Any]]:
    """Rows of the task metrics (masks, keypoints...) that both the baseline and the final validation recorded."""
    keys = [k for k in val if k not in _BOX_MAPS and k.endswith(_BOX_MAPS) and k in base]
    labels = {k: f"{k.rsplit('_map', 1)[0].replace('_', ' ')} mAP{k.rsplit('_map', 1)[1].replace('_', '-')}"
              for k in keys}
    pruned = [(f"{labels[k]} right after pruning", base[k], kept[f"{k}_pruned"]) for k in keys
              if kept.get(f"{k}_pruned") is not None]
    return pruned + [(labels[k], base[k], val[k]) for k in keys]


def _ratio(a: Any, b: Any) -> float | None:
    return (b / a) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else None


def _rows(base: dict, kept: dict, val: dict, bench: dict | None, imgsz: int,
          int8: dict | None = None) -> list[tuple[str, Any, Any, Any]]:
    rows = [
        ("params (M)", base["params"] / 1e6, val["params"] / 1e6),
        (f"GMACs @{imgsz}", base["macs"] / 1e9, val["macs"] / 1e9),
        ("size (MB)", base["size_mb"], val["size_mb"]),
        ("mAP50-95 right after pruning", base["map50_95"], kept.get("map50_95_pruned")),
        ("mAP50 right after pruning", base["map50"], kept.get("map50_pruned")),
        ("mAP50-95", base["map50_95"], val["map50_95"]),
        ("mAP50", base["map50"], val["map50"]),
        *_task_rows(base, kept, val),
    ]
    for backend in ("torch", "onnx"):
        if latency_of(bench, "dense", backend) is not None:
            rows.append((f"CPU latency {backend} (ms)", latency_of(bench, "dense", backend),
                         latency_of(bench, "pruned", backend)))
    rows += latency_rows(kept.get("latency"))
    rows += int8_rows(base, int8)
    return [(k, a, b, _ratio(a, b)) for k, a, b in rows]


def latency_rows(lat: dict | None) -> list[tuple[str, Any, Any]]:
    """A latency target's rows: predicted (the input model's table) and measured (exports of the model before and
    after the kept prune step, interleaved) milliseconds on the table's runtime, INT8 kernels with ``int8``."""
    if not lat or lat.get("predicted_ms") is None:
        return []
    where = f"{lat['runtime']}{' INT8' if lat.get('int8') else ''}"
    rows = [(f"latency {where} predicted (ms)", lat["dense_ms"], lat["predicted_ms"])]
    if lat.get("measured_ms") is not None:
        rows.append((f"latency {where} measured (ms)", lat["measured_dense_ms"], lat["measured_ms"]))
    return rows


def int8_rows(base: dict, int8: dict | None) -> list[tuple[str, Any, Any]]:
    """The INT8 stage's rows: the final model's INT8 export (after) against the dense FP32 model (before): its mAP
    (the dense checkpoint's), its FP32 export's size and latency on the same runtime."""
    if not int8:
        return []
    rt = int8["runtime"]
    return [(f"INT8 {rt} mAP50-95", base["map50_95"], int8["map50_95"]),
            (f"INT8 {rt} mAP50", base["map50"], int8["map50"]),
            (f"INT8 {rt} size (MB)", int8["dense_size_mb"], int8["size_mb"]),
            (f"INT8 {rt} latency (ms)", int8["dense_latency_ms"], int8["latency_ms"])]


def _plots(save_dir: Path, base: dict, prune: dict, kept: dict, val: dict) -> None:
    layers = [LayerChange(**x) for x in kept["layers"]]
    plot_layer_channels(layers, save_dir / "channels.png")
    lines = ["name,channels_before,channels_after"] + [f"{x.name},{x.channels_before},{x.channels_after}"
                                                       for x in layers]
    write_text(save_dir / "layers.csv", "\n".join(lines) + "\n")
    points = [(1.0, base["map50_95"], "dense")]
    for r in prune["steps"]:
        points.append((r["macs_fraction"], r["map50_95_pruned"], f"step {r['step']} pruned"))
        if r.get("finetuned"):
            points.append((r["macs_fraction"], r["map50_95"], f"step {r['step']} tuned"))
    points.append((val["macs"] / base["macs"], val["map50_95"], "final"))
    plot_map_vs_macs(points, save_dir / "map_vs_macs.png")


def _sparse_section(save_dir: Path, base: dict, sp: dict | None, kept: dict) -> list[str]:
    """The gamma histograms and sparsity curve of the sparse stage, and what it freed."""
    if not (sp and (sp.get("last") or sp.get("best"))):
        return []
    hists = {"before sparsity training": _abs_gammas(base["source"]), "after": _abs_gammas(sp.get("last") or sp["best"])}
    plot_gamma_histograms(hists, save_dir / "gamma_hist.png", threshold=sp.get("gamma_threshold"))
    curve = Path(sp["save_dir"]) / "results.csv"
    if curve.is_file():
        plot_sparsity_curve(curve, save_dir / "sparsity.png", threshold=sp.get("gamma_threshold") or 0.01)
    lines: list[str] = []
    if sp.get("free_macs_after") is not None:
        lines = [f"Sparse stage ({sp.get('sr_mode')}, sr={sp.get('sr')}): "
                 f"{100 * (sp.get('gamma_zero_after') or 0):.1f}% of the BN gammas exactly 0, "
                 f"{100 * sp['free_macs_after']:.1f}% of the conv MACs removable for free "
                 f"(|gamma| < {sp.get('gamma_threshold')}).", ""]
    if kept.get("macs_fraction_free") is not None:
        lines += [f"Prune stage: the free removal of {kept.get('channels_free')} zeroed channels kept "
                  f"{kept['macs_fraction_free']:.3f} of the conv MACs; ranking with the method did the rest.", ""]
    return lines


def pipeline_report(save_dir: Path, state: RunState, *, base: dict, sparse: dict | None, prune: dict, kept: dict,
                    val: dict, bench: dict | None, final: Path, imgsz: int, seconds: float,
                    warning: list[str] | None = None) -> PipelineResult:
    """Write ``report.json``, ``report.md``, ``layers.csv`` and the plots; return the result table. ``warning``
    (from :func:`verdict`) heads the report when the final model is worse than the input; the INT8 stage's record in
    ``state`` (``quantize``) adds the INT8 rows, each against the dense FP32 model."""
    int8 = state.done("quantize")
    warning = list(warning or [])
    rows = _rows(base, kept, val, bench, imgsz, int8)
    _plots(save_dir, base, prune, kept, val)
    sparse_lines = _sparse_section(save_dir, base, sparse, kept)
    report = {"save_dir": str(save_dir), "final_checkpoint": str(final), "seconds": seconds,
              "sparse_free_macs": (sparse or {}).get("free_macs_after"),
              "sparse_gamma_zero": (sparse or {}).get("gamma_zero_after"),
              "table": [dict(zip(("metric", "before", "after", "ratio"), r)) for r in rows], "warning": warning,
              "int8": int8,
              "stages": state.data["stages"], "args": state.data["args"]}
    write_json(save_dir / "report.json", report)
    md = ["# yolo-prune pipeline report", "", f"final model: `{final}`", ""]
    if warning:
        md += [f"**Warning: {warning[0]}.**", ""] + [f"- {line}" for line in warning[1:]] + [""]
    md += [markdown_table(rows, header=("", "before", "after", "ratio")), "",
          "![channels kept per layer](channels.png)", "", "![mAP vs MACs](map_vs_macs.png)", ""]
    if int8:
        md[-4:-4] = [f"INT8 rows: the final model exported INT8 for {int8['runtime']} (`{int8['export']}`) against the "
                     f"dense model (mAP of the checkpoint; size and latency of its FP32 {int8['runtime']} export, "
                     f"timed interleaved, {int8['runs']} runs).", ""]
    md += sparse_lines
    if (save_dir / "gamma_hist.png").is_file():
        md += ["![BN gamma before/after sparsity training](gamma_hist.png)", ""]
    if (save_dir / "sparsity.png").is_file():
        md += ["![MACs removable for free per sparse epoch](sparsity.png)", ""]
    md += _prune_time_section(prune["steps"])
    write_text(save_dir / "report.md", "\n".join(md))
    return PipelineResult(save_dir=save_dir, final=final, rows_=rows, steps=prune["steps"], seconds=seconds,
                          warning=warning)


def _prune_time_section(steps: list[dict[str, Any]]) -> list[str]:
    """Where each prune step's time went (its ``prune_timings``; runs recorded before them have none)."""
    md: list[str] = []
    for r in steps:
        if r.get("prune_timings"):
            md += [f"## Prune step {r['step']}: time per sub-step", "",
                   timings_markdown(r["prune_timings"], r.get("prune_total_seconds")), ""]
    return md


def _abs_gammas(model: Any) -> list[float]:
    net = load_model(model, tasks=PRUNABLE_TASKS).model
    return torch.cat([m.weight.detach().abs().flatten().float() for m in net.modules()
                      if isinstance(m, torch.nn.BatchNorm2d)]).tolist()
