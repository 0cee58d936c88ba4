"""``sensitivity()``: the user-facing sensitivity analysis (``yolo-prune sensitivity model=... data=...``).

For every prunable channel group, the degradation when that group alone loses 25 / 50 / 75 % of its channels
(lowest-ranked first, one-shot least-squares compensation), measured by the output-distortion proxy of
:mod:`.sensitivity` on calibration images from the train split. Writes ``sensitivity.csv`` (one row per
group; ``prune allocation=sensitivity sensitivity=.../sensitivity.csv`` reuses it) and ``sensitivity.png``
(heatmap). With ``validate=k``, k groups spread over the loss range are also pruned for real at ratio 0.5 and
validated (COCO mAP on the val split), and the rank correlation between proxy and mAP drop is reported.

Segmentation, pose and OBB models are measured alike: the proxy adds the relative error of the task's channels
(mask coefficients, keypoints, angle) and of Segment's prototypes, so their head branches (``cv4``, ``Proto``) are
scored too; ``validate=k`` compares it with the drop of box mAP50-95 (the detection part every task has).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data import resolve_data
from ..errors import UsageError
from ..evaluate import evaluate
from ..forms import PRUNABLE_TASKS
from ..io import run_dir, write_json, write_text
from ..logs import Progress, progress_output
from ..models import load_model, wrap_model
from ..options import Options, PruneOptions, RunOptions, TrainOptions, settings
from ..report import pyplot, save_figure
from ..results import Result, table
from ..data.calibration import load_calibration_images
from ..pruning.graph import build_graph, prepare
from ..pruning.importance import make_importance, resolve_method
from ..pruning.reconstruct import reconstruct
from ..pruning.sensitivity import PROBE_IMAGES, RATIOS, GroupSensitivity, Probe, measure_sensitivity


@dataclasses.dataclass
class SensitivityResult(Result):
    """Per-group sensitivity; ``str()`` lists the most and least sensitive groups."""

    method: str
    imgsz: int
    images: int
    groups_measured: int
    seconds: float
    cpu_seconds: float = 0.0  # process CPU time (the machine may be shared)
    rank_correlation: float | None = None  # Spearman, proxy loss vs mAP50-95 drop, on the validated groups
    save_dir: Path | None = None
    csv: Path | None = None
    heatmap: Path | None = None
    groups: list[GroupSensitivity] = dataclasses.field(default_factory=list, repr=False)
    validation: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)
    map50_95_dense: float | None = None

    def __str__(self) -> str:
        head = (f"SensitivityResult: {self.groups_measured} groups x ratios "
                f"{', '.join(f'{r:g}' for r in (self.groups[0].ratios if self.groups else RATIOS))}, "
                f"method={self.method}, {self.images} images @{self.imgsz}, {self.seconds:.1f} s")
        if self.csv:
            head += f"\ncsv: {self.csv}"
        ranked = sorted(self.groups, key=lambda g: -g.losses[len(g.losses) // 2])
        rows = [(g.name, g.channels, *g.losses) for g in ranked[:8]]
        if len(ranked) > 8:
            rows.append(("...", None, *([None] * len(ranked[0].losses))))
            rows += [(g.name, g.channels, *g.losses) for g in ranked[-3:]]
        ratios = ranked[0].ratios if ranked else list(RATIOS)
        text = head + "\n" + table(rows, header=("group", "channels", *(f"loss@{r:g}" for r in ratios)))
        if self.rank_correlation is not None:
            text += (f"\nproxy vs real mAP drop on {len(self.validation)} groups: Spearman "
                     f"{self.rank_correlation:.3f}")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "imgsz": self.imgsz, "images": self.images, "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds,
                "rank_correlation": self.rank_correlation, "map50_95_dense": self.map50_95_dense,
                "groups": [dataclasses.asdict(g) for g in self.groups], "validation": self.validation}


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 3 pairs or a constant side."""
    if len(a) < 3:
        return None

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = torch.tensor(ranks(a)), torch.tensor(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return None if den == 0 else float((ra * rb).sum()) / den


def write_sensitivity_csv(groups: Sequence[GroupSensitivity], path: Path) -> Path:
    ratios = groups[0].ratios if groups else list(RATIOS)
    head = ["group", "channels"] + [f"{k}@{r:g}" for r in ratios for k in ("removed", "macs_saved", "loss")]
    lines = [",".join(head)]
    for g in groups:
        cells = [g.name, str(g.channels)]
        for n, saved, loss in zip(g.removed, g.macs_saved, g.losses):
            cells += [str(n), f"{saved:.6g}", f"{loss:.6g}"]
        lines.append(",".join(cells))
    return write_text(path, "\n".join(lines) + "\n")


def plot_sensitivity(groups: Sequence[GroupSensitivity], path: Path) -> Path:
    """Heatmap: one row per group (model order), one column per ratio, colour = proxy loss (log scale)."""
    from matplotlib.colors import LogNorm


    plt = pyplot()
    data = torch.tensor([g.losses for g in groups], dtype=torch.float64).clamp(min=1e-6).numpy()
    fig, ax = plt.subplots(figsize=(4.5, max(4, 0.16 * len(groups) + 1)))
    im = ax.imshow(data, aspect="auto", cmap="magma_r", norm=LogNorm(vmin=max(data.min(), 1e-4), vmax=data.max()))
    ax.set_xticks(range(len(groups[0].ratios)))
    ax.set_xticklabels([f"{r:g}" for r in groups[0].ratios])
    ax.set_xlabel("fraction of the group's channels removed")
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([g.name.replace("model.", "").replace(".conv", "") for g in groups], fontsize=5)
    ax.set_title("sensitivity (output distortion)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08)
    fig.tight_layout()
    return save_figure(fig, path)


GROUPS = (PruneOptions, TrainOptions, RunOptions)


def sensitivity(model: Any, data: str | Path, *options: Options, ratios: Sequence[float] = RATIOS, validate: int = 0,
                save: bool = True, progress: bool = False, **overrides: Any) -> SensitivityResult:
    """Measure how much each prunable channel group of ``model`` costs when pruned alone (see module doc).

    ``calib_images`` train images of ``data`` (letterboxed to ``imgsz``; 32 unless given) are scored with ``method``;
    the run folder ``project/name`` (default ``runs/sensitivity/sensitivity``) receives ``sensitivity.csv``,
    ``sensitivity.png`` and ``sensitivity.json``. ``validate`` groups are also pruned for real and validated.
    Options and overrides as in :func:`yolo_prune.prune` (the keys of ``PruneOptions``, ``TrainOptions``,
    ``RunOptions``). ``progress``: progress lines (calibration images, ranking, probes, validation) on the
    ``yolo_prune`` logger, or stderr when no logging is set up.
    """
    if not any(isinstance(o, PruneOptions) for o in options):
        overrides = {"calib_images": 32, **overrides}
    opts = settings(GROUPS, options, overrides, where="sensitivity")
    t, calib_images, method = opts.train, opts.prune.calib_images, opts.prune.method or "auto"
    imgsz, seed = t.imgsz, t.seed
    if data is None:
        raise UsageError("sensitivity is measured on images: pass data=<dataset yaml>")
    if calib_images < 1:
        raise UsageError(f"calib_images={calib_images} must be at least 1")
    ratios = sorted(float(r) for r in ratios)
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise UsageError(f"ratios={ratios} must lie in (0, 1)")

    t0, c0 = time.perf_counter(), time.process_time()
    with progress_output(progress):
        yolo = load_model(model, tasks=PRUNABLE_TASKS)
        net = copy.deepcopy(yolo.model).float().cpu().eval()
        for p in net.parameters():
            p.requires_grad_(True)  # torch-pruning traces the graph through autograd
        prepare(net)
        images = load_calibration_images(resolve_data(data).train_images, n=calib_images, imgsz=imgsz, seed=seed,
                                         progress=progress)
        graph = build_graph(net)
        method = resolve_method(method, True)
        scored, grams = _scored(net, graph, method, images, seed=seed, progress=progress)
        reference = graph.conv_macs()
        saved = []
        for g, _ in scored:
            delta = {(conv, is_out): k for conv, is_out, k in g.convs}
            saved.append((reference - graph.conv_macs(delta)) / reference)
        probe = Probe(net, graph, images, grams=grams, seed=seed, progress=progress)
        measured = measure_sensitivity(probe, scored, macs_saved=saved, ratios=ratios, progress=progress)
        result = SensitivityResult(method=method, imgsz=imgsz, images=len(images), groups_measured=len(measured),
                                   seconds=0.0, groups=measured)
        if validate:
            _validate(result, yolo, net, scored, data, t, images=images, k=validate, ratio=ratios[len(ratios) // 2],
                      progress=progress)
    result.seconds = time.perf_counter() - t0
    result.cpu_seconds = time.process_time() - c0
    if save:
        save_dir = run_dir(opts.run.project, "sensitivity", opts.run.name, exist_ok=opts.run.exist_ok)
        result.save_dir = save_dir
        result.csv = write_sensitivity_csv(measured, save_dir / "sensitivity.csv")
        result.heatmap = plot_sensitivity(measured, save_dir / "sensitivity.png")
        write_json(save_dir / "sensitivity.json", result.to_dict())
    return result


def _scored(net: torch.nn.Module, graph: Any, method: str, images: torch.Tensor, *, seed: int,
            progress: bool) -> tuple[list[tuple[Any, torch.Tensor]], Any]:
    """Every group ``method`` scores (one score per channel), in model order; and the Gram matrices ``recon``
    measured when they are those of all ``images`` (the probes reuse them), else None."""
    importance = make_importance(method, seed=seed, calib_images=images, progress=progress)
    if hasattr(importance, "calibrate"):
        importance.calibrate(net)
    scored = []
    groups = graph.groups()
    for g in Progress(f"{method} ranking", len(groups), unit="groups", enabled=progress).iterate(groups):
        s = importance(g.group)
        if s is not None:
            scored.append((g, s.detach().float().cpu()))
    scored.sort(key=lambda gs: _name_key(gs[0].name))
    return scored, getattr(importance, "grams", None) if len(images) <= PROBE_IMAGES else None


def _name_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def _validate(result: SensitivityResult, yolo: Any, net: torch.nn.Module, scored: list, data: Any, t: TrainOptions, *,
              images: torch.Tensor, k: int, ratio: float, progress: bool) -> None:
    """Prune ``k`` groups for real (alone, at ``ratio``, one-shot lstsq) and compare the proxy with mAP."""
    imgsz, batch, device, seed = t.imgsz, t.batch, t.device, t.seed

    col = result.groups[0].ratios.index(ratio)
    ranked = sorted(range(len(result.groups)), key=lambda i: result.groups[i].losses[col])
    picks = sorted({ranked[round(j * (len(ranked) - 1) / max(k - 1, 1))] for j in range(min(k, len(ranked)))})
    dense = evaluate(yolo, data, imgsz=imgsz, batch=batch, device=device)
    result.map50_95_dense = dense.map50_95
    rows = []
    for i in Progress("sensitivity validation", len(picks), unit="groups", enabled=progress).iterate(picks):
        gs = result.groups[i]
        copy_net = copy.deepcopy(net)
        g2 = build_graph(copy_net)
        group = next(g for g in g2.groups() if g.name == gs.name)
        scores = dict((g.name, s) for g, s in scored)[gs.name]
        idxs = torch.argsort(scores, stable=True)[: gs.removed[col]].tolist()
        if not idxs:
            continue
        reconstruct(g2, [(group, idxs)], images, seed=seed)
        g2.prune(group, idxs)
        v = evaluate(wrap_model(copy_net), data, imgsz=imgsz, batch=batch, device=device)
        rows.append({"group": gs.name, "ratio": ratio, "removed": gs.removed[col], "loss": gs.losses[col],
                     "map50_95": v.map50_95, "map_drop": dense.map50_95 - v.map50_95})
    result.validation = rows
    result.rank_correlation = spearman([r["loss"] for r in rows], [r["map_drop"] for r in rows])
