"""Sparsity training (Network Slimming): drive BatchNorm gammas to zero inside the ultralytics trainer.

How the penalty is applied is ``sr_mode`` (:mod:`yolo_prune.train.penalty`): ``proximal`` soft-thresholds the
gammas after each optimizer step (per BN, or per coupled channel group with ``sr_group``), ``greg`` fades the
channels of a pruning plan with a growing L2 penalty, ``subgradient`` is the published L1 sub-gradient.
This module holds the trainer, the statistics (zeros, free MACs per epoch, ``sparsity.png``) and the API.

In ``subgradient`` mode the penalty ``sr * |gamma|`` enters as its sub-gradient: every optimizer step adds
exactly ``sr * sign(gamma)`` to each gamma's gradient. Where it is added matters, and :func:`l1_step` is the
one place that does it:

* after ``GradScaler.unscale_``: ultralytics backpropagates the AMP-*scaled* loss, so a term added to the
  raw ``.grad`` (as many pruning repos do right after ``backward()``) is divided by the loss scale -
  65536 at the default initial scale - and the penalty silently changes strength with AMP;
* after ultralytics' gradient clipping (``max_norm=10``): otherwise the clip rescales the penalty
  together with the loss gradients and ``sr`` again stops meaning what it says.

:meth:`SparseTrainer.optimizer_step` therefore replaces ``BaseTrainer.optimizer_step`` (unscale, clip,
step, scaler update, zero_grad, EMA update - the same sequence as ultralytics 8.4) with :func:`l1_step`
in the middle.

How ``sr`` survives DDP and ``resume``: ultralytics rejects unknown override keys, so
:class:`SparseTrainer` pops ``sr``, ``sr_schedule`` and ``gamma_threshold`` from its overrides before
``BaseTrainer.__init__`` and puts them back into ``self.args`` right after the config is built. The DDP
launcher serialises ``vars(trainer.args)`` and the worker passes it back as ``overrides`` to the same
class, which pops them again; checkpoints store ``vars(args)`` as ``train_args``, so ``resume`` restores
the run's own values. The validator, whose config check would reject them, gets ``args`` without them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.obb import OBBTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from ..errors import UsageError
from ..io import atomic_write, write_json
from ..pruning.bngroups import BNGroups
from ..options import (DistillOptions, Options, PruneOptions, RunOptions, SparseOptions, TrainOptions,
                       settings_and_rest)
from .distill import DistillMixin, distill_options
from .keep_arch import KeepArchitectureMixin
from .keep_zeros import KeepZerosMixin
from .results import SparseResult, TrainResult
from .run import run_training
from .penalty import SR_MODES, SparsityPenalty, greg_plan, load_plan, save_plan
from ..pruning.importance import METHODS
from ..options import SCHEMA, choices

__all__ = [
    "SPARSE_TRAINERS",
    "SparseOBBTrainer",
    "SparsePoseTrainer",
    "SparseSegmentTrainer",
    "SparseTrainer",
    "sparse_train",
    "SPARSE_DEFAULTS",
    "SR_SCHEDULES",
    "add_l1_subgradient",
    "bn_layers",
    "l1_step",
    "gamma_stats",
    "save_gamma_histogram",
    "sr_at",
]

#: Options of :class:`SparseTrainer` that are not ultralytics keys, with their defaults (``target_macs``,
#: ``method``, ``max_layer_ratio``, ``round_to`` only matter to ``sr_mode=greg``, which plans like pruning).
SPARSE_DEFAULTS: dict[str, Any] = {
    **{k: SCHEMA[k].default for k in SparseOptions.names()},
    **{k: SCHEMA[k].default for k in ("target_macs", "max_layer_ratio", "round_to", "portable")},
    "method": "bn",  # the schema's empty method means auto; without calibration images that is bn
}
SR_SCHEDULES = choices("sr_schedule")
#: Extra columns SparseTrainer appends to ultralytics' results.csv.
CSV_COLUMNS = ("sparsity/sr", "sparsity/gamma_mean", "sparsity/gamma_near_zero", "sparsity/gamma_zero",
               "sparsity/free_macs")


# --------------------------------------------------------------------------------------------- pure helpers
def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """Every ``BatchNorm2d`` of ``model`` (DDP/compile wrappers are unwrapped).

    In a YOLOv8 detector this is every conv's BN; the Detect head's final box/class convs and the DFL
    have no BN, so nothing needs excluding.
    """
    return [m for m in unwrap_model(model).modules() if isinstance(m, nn.BatchNorm2d)]


def add_l1_subgradient(params: Iterable[torch.Tensor], sr: float, scale: float = 1.0) -> None:
    """In place: ``p.grad += sr * scale * sign(p)`` for every parameter that has a gradient.

    ``scale`` is the factor the other gradients currently carry: 1 once they are unscaled (as in
    :func:`l1_step`), ``GradScaler.get_scale()`` if they are still AMP-scaled.
    """
    if sr == 0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.add_(torch.sign(p.detach()).to(p.grad.dtype), alpha=float(sr) * float(scale))


def l1_step(
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    params: Iterable[torch.Tensor],
    l1_params: Iterable[torch.Tensor],
    sr: float,
    *,
    max_norm: float = 10.0,
    foreach: bool | None = None,
) -> None:
    """One optimizer step with the L1 sub-gradient, independent of the AMP loss scale.

    ``scaler.unscale_`` -> clip ``params`` to ``max_norm`` (as ultralytics does) -> ``grad += sr * sign(p)``
    for ``l1_params`` -> ``scaler.step`` -> ``scaler.update``. A disabled scaler makes the first and the
    last two plain no-ops / ``optimizer.step()``, so the update is the same with and without AMP scaling.
    """
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(list(params), max_norm=max_norm, foreach=foreach)
    add_l1_subgradient(l1_params, sr)
    scaler.step(optimizer)
    scaler.update()


def sr_at(sr: float, schedule: str, epoch: int, epochs: int) -> float:
    """The penalty strength at 0-based ``epoch`` of ``epochs``.

    ``constant``: ``sr``; ``linear``: from ``sr`` at the first epoch down to 0 at the last one;
    ``cosine``: half a cosine from ``sr`` to 0 at the last epoch; ``ramp``: rises linearly from
    ``sr / n`` at the first epoch to ``sr`` at epoch ``n = ceil(epochs / 2)``, then stays at ``sr``.
    """
    if schedule not in SR_SCHEDULES:
        raise UsageError(f"sr_schedule must be one of {', '.join(SR_SCHEDULES)}, got {schedule!r}")
    if schedule == "constant" or epochs <= 1:
        return float(sr)
    if schedule == "ramp":
        n = math.ceil(epochs / 2)
        return float(sr) * min(1.0, (epoch + 1) / n)
    t = min(max(epoch / (epochs - 1), 0.0), 1.0)
    if schedule == "linear":
        return float(sr) * (1.0 - t)
    return float(sr) * 0.5 * (1.0 + math.cos(math.pi * t))


def _abs_gammas(layers: Sequence[nn.BatchNorm2d]) -> torch.Tensor:
    if not layers:
        return torch.zeros(0)
    return torch.cat([m.weight.detach().abs().float().flatten().cpu() for m in layers if m.weight is not None])


def gamma_stats(layers: Sequence[nn.BatchNorm2d] | nn.Module, threshold: float = 0.01) -> dict[str, float]:
    """``{"gamma_mean": mean |gamma|, "gamma_near_zero": fraction of |gamma| < threshold, "channels": n}``."""
    if isinstance(layers, nn.Module):
        layers = bn_layers(layers)
    g = _abs_gammas(layers)
    if g.numel() == 0:
        return {"gamma_mean": float("nan"), "gamma_near_zero": float("nan"), "channels": 0}
    return {
        "gamma_mean": float(g.mean()),
        "gamma_near_zero": float((g < threshold).float().mean()),
        "channels": int(g.numel()),
    }


def save_gamma_histogram(
    layers: Sequence[nn.BatchNorm2d] | nn.Module, path: str | Path, *, title: str = "", threshold: float = 0.01
) -> Path:
    """Write a PNG histogram of |gamma| over all BatchNorm channels (matplotlib Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(layers, nn.Module):
        layers = bn_layers(layers)
    g = _abs_gammas(layers).numpy()
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if g.size:
        ax.hist(g, bins=100, color="tab:blue")
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
        ax.legend()
    ax.set_xlabel("|BN gamma|")
    ax.set_ylabel("channels")
    n0 = float((g < threshold).mean()) if g.size else float("nan")
    ax.set_title(f"{title}  n={g.size}  mean={g.mean() if g.size else float('nan'):.4g}  <thr: {n0:.1%}".strip())
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))


# --------------------------------------------------------------------------------------------- trainer
class SparseTrainer(KeepZerosMixin, DistillMixin, KeepArchitectureMixin, DetectionTrainer):
    """ultralytics ``DetectionTrainer`` with a sparsity penalty on BatchNorm gammas.

    Extra overrides (not ultralytics keys, :data:`SPARSE_DEFAULTS`): ``sr``, ``sr_schedule``, ``sr_mode``,
    ``sr_group``, ``sr_head``, ``greg_ramp``, greg's plan (``target_macs``, ``method``, ``max_layer_ratio``,
    ``round_to``) and ``gamma_threshold``. They are stored in ``self.args`` so DDP workers and resumed runs
    get them back (see the module docstring); the penalty itself (channel groups, greg's plan) is rebuilt in
    :meth:`_setup_train` in every process. Per epoch the mean |gamma|, the fractions of gammas exactly 0 and
    below ``gamma_threshold`` and the MACs fraction free at the threshold are logged and appended to
    ``results.csv``; dead channels are retired (:func:`~yolo_prune.train.penalty.retire_dead_channels`);
    ``gamma_hist_start.png``, ``gamma_hist_end.png``, ``sparsity.png``, ``sparsity.json`` (and for greg
    ``greg_plan.json``) are written to the run folder.

    The architecture of a (pruned) checkpoint is kept, like :class:`~yolo_prune.train.FinetuneTrainer`, and
    ``teacher=<checkpoint>`` distils from that model meanwhile (see :mod:`yolo_prune.train.distill`).
    """

    extra_arg_keys = tuple(SPARSE_DEFAULTS)

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict[str, Any] | None = None, _callbacks: Any = None):
        overrides = dict(overrides or {})
        self._sparse_overrides = {k: overrides.pop(k) for k in SPARSE_DEFAULTS if k in overrides}
        super().__init__(cfg, overrides, _callbacks)

    def check_resume(self, overrides: dict[str, Any]) -> None:
        """ultralytics' resume check, then put the sparsity options into ``self.args``.

        ``BaseTrainer.__init__`` calls this right after building ``self.args`` and before saving
        ``args.yaml``. A resumed run keeps the values stored in its checkpoint, like ultralytics does
        for its own keys.
        """
        super().check_resume(overrides)
        given = getattr(self, "_sparse_overrides", {})
        for key, default in SPARSE_DEFAULTS.items():
            current = getattr(self.args, key, None)
            if self.resume and current is not None:
                if key in given and given[key] != current:
                    LOGGER.warning(f"resume keeps {key}={current!r} of the checkpoint, ignoring {key}={given[key]!r}")
                continue
            setattr(self.args, key, given.get(key, current if current is not None else default))
        for key, value in check_sparse_options({k: getattr(self.args, k) for k in SPARSE_DEFAULTS}).items():
            setattr(self.args, key, value)

    # The penalty -----------------------------------------------------------------------------------
    def sparse_bn_layers(self, model: nn.Module | None = None) -> list[nn.BatchNorm2d]:
        """The BatchNorm layers whose gammas are penalised and reported. Override to narrow the set."""
        return bn_layers(self.model if model is None else model)

    @property
    def current_sr(self) -> float:
        """``sr`` of the current epoch according to ``sr_schedule``."""
        return sr_at(self.args.sr, self.args.sr_schedule, getattr(self, "epoch", 0) or 0, self.epochs)

    @property
    def progress(self) -> float:
        """Fraction of the training done once the current batch is (resume-safe: from the epoch and batch index)."""
        nb = len(self.train_loader) if getattr(self, "train_loader", None) is not None else 1
        done = (getattr(self, "epoch", 0) or 0) + (getattr(self, "_batch_i", 0) + 1) / max(nb, 1)
        return min(max(done / max(self.epochs, 1), 0.0), 1.0)

    def validate(self) -> tuple[Any, Any]:
        """ultralytics' validation; with ``greg``, an epoch before the chosen channels are at 0 cannot become
        ``best.pt`` (it would be a denser model than the one the run trains toward)."""
        previous = self.best_fitness
        metrics, fitness = super().validate()
        if self.args.sr_mode == "greg" and fitness is not None and self.progress < self.args.greg_ramp:
            self.best_fitness = previous
        return metrics, fitness

    def _count_batch(self, trainer: Any = None) -> None:
        self._batch_i = 0 if getattr(self, "_batch_epoch", None) != self.epoch else self._batch_i + 1
        self._batch_epoch = self.epoch

    def _setup_train(self) -> None:
        """ultralytics' setup (model, optimizer, EMA; resume state), then the penalty, rebuilt in every process.

        The channel groups are traced from a copy of the model as it is here (on a DDP worker and on resume
        too: nothing of them is pickled); greg's chosen channels come from ``greg_plan.json`` on resume.
        """
        super()._setup_train()
        self.penalty = self.build_penalty()
        if RANK in {-1, 0} and not self.resume:
            self._write_sparsity_json(start=self.sparsity_stats(unwrap_model(self.model)))
        if self._count_batch not in self.callbacks.get("on_train_batch_start", []):
            self.add_callback("on_train_batch_start", self._count_batch)
            self.add_callback("on_train_epoch_end", self._retire_dead_channels)

    def _retire_dead_channels(self, trainer: Any = None) -> None:
        """Each epoch end (before validation and saving): channels whose coupled gammas are all below
        ``gamma_threshold`` get gamma 0, their constant output is folded into the consumers and their betas zeroed,
        so the validated and saved model is exactly what pruning at the threshold will keep."""
        ema = self.ema.ema if getattr(self, "ema", None) is not None else None
        n = self.penalty.retire(self.model, ema, threshold=self.args.gamma_threshold)
        if n:
            LOGGER.info(f"sparsity: {n} channels with all coupled |gamma| < {self.args.gamma_threshold:g} retired "
                        "(gamma and beta 0, constant folded into consumers)")

    def build_penalty(self) -> SparsityPenalty:
        """The :class:`~yolo_prune.train.penalty.SparsityPenalty` of this run's options, bound to ``self.model``."""
        a = self.args
        groups = BNGroups.build(self.model)
        plan = None
        if a.sr_mode == "greg":
            path = Path(self.save_dir) / "greg_plan.json"
            if self.resume and path.is_file():
                plan = load_plan(path)
            else:
                plan = greg_plan(groups, target_macs=a.target_macs, method=a.method, head=a.sr_head,
                                 max_layer_ratio=a.max_layer_ratio, round_to=a.round_to, seed=a.seed or 0,
                                 portable=a.portable)
                if RANK in {-1, 0}:
                    save_plan(plan, path)
            LOGGER.info(f"sparsity: greg drives {plan.channels} channels to zero (pruning them reaches "
                        f"{plan.macs_fraction:.3f} of the MACs, target_macs={plan.target_macs})")
        return SparsityPenalty(a.sr_mode, self.model, groups=groups, group=a.sr_group, head=a.sr_head, plan=plan,
                               greg_ramp=a.greg_ramp)

    def optimizer_step(self) -> None:
        """``BaseTrainer.optimizer_step`` with the sparsity penalty of ``sr_mode``.

        Same sequence as ultralytics 8.4 (unscale, clip to norm 10, step, scaler update, zero_grad, EMA
        update); ``subgradient`` adds ``sr_t * sign(gamma)`` to the unscaled, clipped gradients (see
        :func:`l1_step`), ``proximal`` and ``greg`` apply their proximal step right after the optimizer's,
        and the EMA is kept consistent with the model's zeros (:mod:`yolo_prune.train.penalty`).
        """
        penalty = getattr(self, "penalty", None)
        if penalty is None:  # called outside train()
            penalty = self.penalty = self.build_penalty()
        sr = self.current_sr
        l1_step(
            self.optimizer,
            self.scaler,
            self.model.parameters(),
            penalty.subgradient_params(),
            sr,
            max_norm=10.0,
            foreach=False if self.device.type == "npu" else None,
        )
        penalty.after_step(self.optimizer, sr, self.progress)
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)
            penalty.sync_ema(self.ema.ema)
        self.keep_zeros()  # a sparsified checkpoint's zeros stay zero (KeepZerosMixin)

    # Reporting -------------------------------------------------------------------------------------
    def _report_model(self) -> nn.Module:
        """The model whose gammas are reported: the EMA (what is saved and later pruned) once it exists."""
        return self.ema.ema if getattr(self, "ema", None) is not None else unwrap_model(self.model)

    def setup_model(self) -> Any:
        """ultralytics' model setup, then the start histogram and statistics (not redone on resume)."""
        ckpt = super().setup_model()
        if RANK in {-1, 0}:
            hist = Path(self.save_dir) / "gamma_hist_start.png"
            layers = self.sparse_bn_layers(self.model)
            if not layers:
                raise UsageError("the model has no BatchNorm2d layers (fused?): nothing to sparsity-train")
            if not (self.resume and hist.exists()):
                stats = gamma_stats(layers, self.args.gamma_threshold)
                self._write_sparsity_json(start=stats)
                save_gamma_histogram(layers, hist, title="start", threshold=self.args.gamma_threshold)
        return ckpt

    def sparsity_stats(self, model: nn.Module | None = None) -> dict[str, float]:
        """Mean |gamma|, fractions of gammas exactly 0 and below ``gamma_threshold``, and the fraction of conv
        MACs that pruning at ``gamma_threshold`` (with this run's ``round_to``) would free now."""
        model = self._report_model() if model is None else model
        stats = gamma_stats(self.sparse_bn_layers(model), self.args.gamma_threshold)
        penalty = getattr(self, "penalty", None)
        if penalty is not None:
            stats.update(penalty.stats(model, self.args.gamma_threshold, round_to=self.args.round_to))
        return stats

    def save_metrics(self, metrics: dict[str, Any]) -> None:
        """Log the sparsity statistics and append them as extra columns of ``results.csv``."""
        stats = self.sparsity_stats()
        sr = self.current_sr
        lam = f" greg lambda={self.penalty.lam:.3g}" if getattr(self, "penalty", None) and self.args.sr_mode == "greg" else ""
        LOGGER.info(
            f"sparsity: epoch {self.epoch + 1}/{self.epochs} {self.args.sr_mode} sr={sr:.3g}{lam} "
            f"mean|gamma|={stats['gamma_mean']:.4g} zero: {stats.get('gamma_zero', float('nan')):.1%} "
            f"|gamma|<{self.args.gamma_threshold:g}: {stats['gamma_near_zero']:.1%} of {stats['channels']} channels, "
            f"MACs free at the threshold: {stats.get('free_macs', float('nan')):.1%}"
        )
        extra = dict(zip(CSV_COLUMNS, (sr, stats["gamma_mean"], stats["gamma_near_zero"],
                                       stats.get("gamma_zero", float("nan")), stats.get("free_macs", float("nan")))))
        super().save_metrics({**metrics, **extra})

    def final_eval(self) -> None:
        """ultralytics' final validation, then the end histogram and statistics."""
        super().final_eval()
        if RANK in {-1, 0}:
            layers = self.sparse_bn_layers(self._report_model())
            self._write_sparsity_json(end=self.sparsity_stats())
            save_gamma_histogram(
                layers, Path(self.save_dir) / "gamma_hist_end.png", title="end", threshold=self.args.gamma_threshold
            )
            if Path(self.csv).is_file():
                plot_sparsity_curve(self.csv, Path(self.save_dir) / "sparsity.png", threshold=self.args.gamma_threshold)

    def _write_sparsity_json(self, **stats: dict[str, float]) -> None:
        path = Path(self.save_dir) / "sparsity.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.update({k: getattr(self.args, k) for k in SPARSE_DEFAULTS}, **stats)
        write_json(path, data)


# The other tasks over ultralytics' task trainers (see yolo_prune.train.finetune); module-level for DDP.
class SparseSegmentTrainer(SparseTrainer, SegmentationTrainer):
    """:class:`SparseTrainer` for segmentation models (ultralytics ``SegmentationTrainer``)."""


class SparsePoseTrainer(SparseTrainer, PoseTrainer):
    """:class:`SparseTrainer` for pose models (ultralytics ``PoseTrainer``)."""


class SparseOBBTrainer(SparseTrainer, OBBTrainer):
    """:class:`SparseTrainer` for oriented-box models (ultralytics ``OBBTrainer``)."""


#: The sparsity trainer of each task (the task is read from the checkpoint, see :func:`run_training`).
SPARSE_TRAINERS: dict[str, type] = {"detect": SparseTrainer, "segment": SparseSegmentTrainer,
                                    "pose": SparsePoseTrainer, "obb": SparseOBBTrainer}


def check_sparse_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate (and normalise) the sparsity options; :class:`UsageError` on a bad value. Returns them."""
    o = dict(options)
    o["sr"] = _check_float("sr", o["sr"], minimum=0.0)
    o["gamma_threshold"] = _check_float("gamma_threshold", o["gamma_threshold"], minimum=0.0, open_=True)
    if o["sr_schedule"] not in SR_SCHEDULES:
        raise UsageError(f"sr_schedule must be one of {', '.join(SR_SCHEDULES)}, got {o['sr_schedule']!r}")
    if o["sr_mode"] not in SR_MODES:
        raise UsageError(f"sr_mode must be one of {', '.join(SR_MODES)}, got {o['sr_mode']!r}")
    for key in ("sr_group", "sr_head", "portable"):
        if not isinstance(o[key], bool):
            raise UsageError(f"{key} must be True or False, got {o[key]!r}")
    o["greg_ramp"] = _check_float("greg_ramp", o["greg_ramp"], minimum=0.0, open_=True)
    if o["greg_ramp"] > 1:
        raise UsageError(f"greg_ramp must be in (0, 1], got {o['greg_ramp']!r}")
    if o["sr_mode"] == "greg":
        if o["target_macs"] is None:  # greg trains toward a pruning plan; 0.5 as everywhere else by default
            o["target_macs"] = 0.5
        t = _check_float("target_macs", o["target_macs"], minimum=0.0, open_=True)
        if t >= 1:
            raise UsageError(f"sr_mode=greg needs target_macs < 1, got {o['target_macs']!r}")
        o["target_macs"] = t

        if o["method"] == "auto":  # auto without calibration images is bn
            o["method"] = "bn"
        if o["method"] not in METHODS or o["method"] in ("activation", "recon"):
            raise UsageError(f"sr_mode=greg ranks with method=bn, l1, l2 or random, got {o['method']!r}")
    return o


def plot_sparsity_curve(results_csv: str | Path, path: str | Path, *, threshold: float = 0.01) -> Path | None:
    """``sparsity.png``: per epoch, the MACs fraction removable for free (and the gammas at 0) with mAP50-95."""
    import csv

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with open(results_csv, newline="", encoding="utf-8") as f:
        rows = [{k.strip(): v for k, v in r.items() if k} for r in csv.DictReader(f)]
    if not rows or "sparsity/free_macs" not in rows[0]:
        return None

    def col(key: str) -> list[float]:
        return [float(r.get(key) or "nan") for r in rows]

    epochs = col("epoch")
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(epochs, col("sparsity/free_macs"), "o-", color="tab:blue", label=f"MACs free at |gamma|<{threshold:g}")
    ax.plot(epochs, col("sparsity/gamma_zero"), "s--", color="tab:cyan", label="gammas exactly 0")
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(epochs, col("metrics/mAP50-95(B)"), "^-", color="tab:red", label="mAP50-95")
    ax2.set_ylabel("mAP50-95", color="tab:red")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8)
    ax.set_title("sparsity training")
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))


def _check_float(name: str, value: Any, *, minimum: float, open_: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < minimum or (open_ and v == minimum):
        raise UsageError(f"{name} must be {'>' if open_ else '>='} {minimum:g}, got {value!r}")
    return v


# --------------------------------------------------------------------------------------------- API
GROUPS = (SparseOptions, PruneOptions, TrainOptions, RunOptions, DistillOptions)


def sparse_train(model: Any, data: Any, *options: Options, **overrides: Any) -> SparseResult:
    """Sparsity-train ``model`` on ``data``: drive BatchNorm gammas to zero so that their channels come out for free.

    Args:
        model: a ``.pt`` checkpoint path (pruned or not), a model yaml (random init), or an in-memory
            ultralytics ``YOLO`` / ``DetectionModel`` (saved first as ``weights/input.pt`` in the run folder).
        data: a YOLO- or COCO-format dataset yaml; with ``resume``, None takes the one recorded in ``last.pt``.
        options: :class:`~yolo_prune.options.SparseOptions` (``sr``, ``sr_mode``, ``sr_schedule``, ``sr_group``,
            ``sr_head``, ``greg_ramp``, ``gamma_threshold``), the plan ``greg`` fades toward from
            :class:`~yolo_prune.options.PruneOptions` (``target_macs``, ``method``, ``max_layer_ratio``,
            ``round_to``), and ``TrainOptions``, ``RunOptions``, ``DistillOptions`` as in
            :func:`~yolo_prune.train.finetune`; every key is documented in ``yolo-prune cfg``.
        overrides: any of their keys by name (``sr=0.05, epochs=30``); every other key is an ultralytics train key
            (lr0, optimizer, amp, ...) and passes through.

    ``sr_mode``: ``proximal`` (soft-threshold the gammas by ``lr * sr`` after every optimizer step: exact zeros with
    any optimizer), ``subgradient`` (add ``sr * sign(gamma)`` to the gradient) or ``greg`` (growing L2 on the channels
    pruning to ``target_macs`` with ``method`` would remove); see :mod:`yolo_prune.train.penalty`. The run folder is
    ``<project>/<name>``, default ``runs/sparse/sparse``; ``resume`` as in :func:`~yolo_prune.train.finetune`.

    Returns:
        :class:`~yolo_prune.train.results.SparseResult` with the checkpoints, final mAP and gamma statistics
        before/after.
    """
    s, train_args = settings_and_rest(GROUPS, options, overrides, where="sparse_train")
    p = s.prune
    extra = {**s.sparse.to_dict(), "target_macs": p.target_macs, "method": p.method or "bn",
             "max_layer_ratio": p.max_layer_ratio, "round_to": p.round_to, "portable": p.portable}
    check_sparse_options(extra)
    extra.update(distill_options(**s.distill.to_dict()))
    trainer, result = run_training(SPARSE_TRAINERS, "sparse", model, data, s.train, s.run, extra=extra,
                                   train_args=train_args)
    return _sparse_result(result, trainer.args)


def _sparse_result(result: TrainResult, args: Any) -> SparseResult:
    """``result`` with the run's sparsity settings (``args``: the trainer's) and the gamma statistics of its
    ``sparsity.json``, before and after training."""
    path = result.save_dir / "sparsity.json"
    stats = json.loads(path.read_text()) if path.is_file() else {}
    start, end = stats.get("start") or {}, stats.get("end") or {}
    return SparseResult(
        **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)},
        sr=float(args.sr),
        sr_schedule=str(args.sr_schedule),
        gamma_threshold=float(args.gamma_threshold),
        gamma_mean_before=start.get("gamma_mean"),
        gamma_near_zero_before=start.get("gamma_near_zero"),
        gamma_mean_after=end.get("gamma_mean"),
        gamma_near_zero_after=end.get("gamma_near_zero"),
        sr_mode=str(args.sr_mode),
        gamma_zero_after=end.get("gamma_zero"),
        free_macs_after=end.get("free_macs"),
    )
