"""Sparsity training (Network Slimming): an L1 penalty on every BatchNorm gamma.

The penalty ``sr * |gamma|`` enters as its sub-gradient: every optimizer step adds exactly
``sr * sign(gamma)`` to each gamma's gradient (what ``cfg/default.yaml`` promises). Where it is added
matters, and :func:`l1_step` is the one place that does it:

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

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from ..errors import UsageError
from ..io import atomic_write, write_json
from ..sparsify import KeepZerosMixin
from .common import KeepArchitectureMixin, TrainResult, run_training
from .distill import DistillMixin, distill_options

__all__ = [
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

#: Options of :class:`SparseTrainer` that are not ultralytics keys, with their defaults.
SPARSE_DEFAULTS: dict[str, Any] = {"sr": 1e-3, "sr_schedule": "constant", "gamma_threshold": 0.01}
SR_SCHEDULES = ("constant", "linear", "cosine")
#: Extra columns SparseTrainer appends to ultralytics' results.csv.
CSV_COLUMNS = ("sparsity/sr", "sparsity/gamma_mean", "sparsity/gamma_near_zero")


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
    ``cosine``: half a cosine from ``sr`` to 0 at the last epoch.
    """
    if schedule not in SR_SCHEDULES:
        raise UsageError(f"sr_schedule must be one of {', '.join(SR_SCHEDULES)}, got {schedule!r}")
    if schedule == "constant" or epochs <= 1:
        return float(sr)
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
    """ultralytics ``DetectionTrainer`` with an L1 penalty on BatchNorm gammas.

    Extra overrides (not ultralytics keys): ``sr`` (float >= 0), ``sr_schedule`` (constant | linear |
    cosine), ``gamma_threshold`` (float > 0). They are stored in ``self.args`` so DDP workers and resumed
    runs get them back (see the module docstring). Per epoch the mean |gamma| and the fraction below
    ``gamma_threshold`` are logged and appended to ``results.csv``; ``gamma_hist_start.png``,
    ``gamma_hist_end.png`` and ``sparsity.json`` are written to the run folder.

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
        self.args.sr = _check_float("sr", self.args.sr, minimum=0.0)
        self.args.gamma_threshold = _check_float("gamma_threshold", self.args.gamma_threshold, minimum=0.0, open_=True)
        if self.args.sr_schedule not in SR_SCHEDULES:
            raise UsageError(f"sr_schedule must be one of {', '.join(SR_SCHEDULES)}, got {self.args.sr_schedule!r}")

    # The penalty -----------------------------------------------------------------------------------
    def sparse_bn_layers(self, model: nn.Module | None = None) -> list[nn.BatchNorm2d]:
        """The BatchNorm layers whose gammas are penalised and reported. Override to narrow the set."""
        return bn_layers(self.model if model is None else model)

    @property
    def current_sr(self) -> float:
        """``sr`` of the current epoch according to ``sr_schedule``."""
        return sr_at(self.args.sr, self.args.sr_schedule, getattr(self, "epoch", 0) or 0, self.epochs)

    def optimizer_step(self) -> None:
        """``BaseTrainer.optimizer_step`` with ``sr_t * sign(gamma)`` added to the unscaled, clipped gradients.

        Same sequence as ultralytics 8.4 (unscale, clip to norm 10, step, scaler update, zero_grad, EMA
        update); see :func:`l1_step`.
        """
        l1_step(
            self.optimizer,
            self.scaler,
            self.model.parameters(),
            [m.weight for m in self.sparse_bn_layers() if m.weight is not None],
            self.current_sr,
            max_norm=10.0,
            foreach=False if self.device.type == "npu" else None,
        )
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)
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

    def save_metrics(self, metrics: dict[str, Any]) -> None:
        """Log the gamma statistics and append them as extra columns of ``results.csv``."""
        stats = gamma_stats(self.sparse_bn_layers(self._report_model()), self.args.gamma_threshold)
        sr = self.current_sr
        LOGGER.info(
            f"sparsity: epoch {self.epoch + 1}/{self.epochs} sr={sr:.3g} mean|gamma|={stats['gamma_mean']:.4g} "
            f"|gamma|<{self.args.gamma_threshold:g}: {stats['gamma_near_zero']:.1%} of {stats['channels']} channels"
        )
        extra = dict(zip(CSV_COLUMNS, (sr, stats["gamma_mean"], stats["gamma_near_zero"])))
        super().save_metrics({**metrics, **extra})

    def final_eval(self) -> None:
        """ultralytics' final validation, then the end histogram and statistics."""
        super().final_eval()
        if RANK in {-1, 0}:
            layers = self.sparse_bn_layers(self._report_model())
            self._write_sparsity_json(end=gamma_stats(layers, self.args.gamma_threshold))
            save_gamma_histogram(
                layers, Path(self.save_dir) / "gamma_hist_end.png", title="end", threshold=self.args.gamma_threshold
            )

    def _write_sparsity_json(self, **stats: dict[str, float]) -> None:
        path = Path(self.save_dir) / "sparsity.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.update(
            sr=self.args.sr, sr_schedule=self.args.sr_schedule, gamma_threshold=self.args.gamma_threshold, **stats
        )
        write_json(path, data)


def _check_float(name: str, value: Any, *, minimum: float, open_: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < minimum or (open_ and v == minimum):
        raise UsageError(f"{name} must be {'>' if open_ else '>='} {minimum:g}, got {value!r}")
    return v


# --------------------------------------------------------------------------------------------- API
def sparse_train(
    model: Any,
    data: Any,
    *,
    sr: float = 1e-3,
    sr_schedule: str = "constant",
    epochs: int = 10,
    imgsz: int = 640,
    batch: int = 16,
    device: str | int | None = None,
    project: str | Path | None = None,
    name: str | None = None,
    exist_ok: bool = False,
    seed: int = 0,
    resume: bool | str | Path = False,
    gamma_threshold: float = 0.01,
    teacher: str | Path | None = None,
    distill: str = "output",
    distill_cls: float = 1.0,
    distill_box: float = 1.0,
    distill_temp: float = 1.0,
    labels: bool = True,
    unlabeled: Any = None,
    verbose: bool = False,
    **train_args: Any,
) -> TrainResult:
    """Sparsity-train ``model`` on ``data`` with an L1 penalty ``sr`` on every BatchNorm gamma.

    Args:
        model: a ``.pt`` checkpoint path (pruned or not), a model yaml (random init), or an in-memory
            ultralytics ``YOLO`` / ``DetectionModel`` (saved first as ``weights/input.pt`` in the run folder).
        data: a YOLO- or COCO-format dataset yaml; with ``resume``, None takes the one recorded in ``last.pt``.
        sr: penalty strength; the update adds ``sr * sign(gamma)`` to each gamma's gradient.
        sr_schedule: ``constant``, ``linear`` (to 0 at the last epoch) or ``cosine``.
        epochs, imgsz, batch, device, seed: as in ultralytics (``device=None``: a GPU if any, else CPU;
            ``"0,1"`` trains with ultralytics DDP).
        project, name, exist_ok: the run folder is ``<project>/<name>``, default ``runs/sparse/sparse`` (name defaults to ``sparse``,
            incremented unless ``exist_ok``).
        resume: continue an interrupted run, in the folder where its ``last.pt`` is now: ``True`` (the run
            folder of ``project``/``name``, or ``model=.../last.pt``) or a path to ``last.pt`` / a run folder.
            Checkpoint settings win.
        verbose: show ultralytics' logs and progress bars; otherwise one INFO line per epoch on the
            ``yolo_prune`` logger (shown by the CLI, silent for library users who do not configure it).
        gamma_threshold: |gamma| below this counts as near zero in the statistics.
        teacher, distill, distill_cls, distill_box, distill_temp, labels, unlabeled: distillation from a teacher
            checkpoint while sparsity-training, as in :func:`~yolo_prune.train.finetune`.
        **train_args: any other ultralytics train key (lr0, optimizer, workers, amp, ...).

    Returns:
        :class:`TrainResult` with the checkpoints, final mAP and gamma statistics before/after.
    """
    extra = {"sr": sr, "sr_schedule": sr_schedule, "gamma_threshold": gamma_threshold}
    _check_float("sr", sr, minimum=0.0)
    _check_float("gamma_threshold", gamma_threshold, minimum=0.0, open_=True)
    if sr_schedule not in SR_SCHEDULES:
        raise UsageError(f"sr_schedule must be one of {', '.join(SR_SCHEDULES)}, got {sr_schedule!r}")
    extra.update(distill_options(teacher, distill, distill_cls, distill_box, distill_temp, labels, unlabeled))
    trainer, result = run_training(
        SparseTrainer,
        "sparse",
        model,
        data,
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        device=device,
        project=project,
        name=name,
        exist_ok=exist_ok,
        seed=seed,
        resume=resume,
        verbose=verbose,
        extra=extra,
        train_args=train_args,
    )
    result.sr = float(trainer.args.sr)
    result.sr_schedule = str(trainer.args.sr_schedule)
    result.gamma_threshold = float(trainer.args.gamma_threshold)
    result.teacher = getattr(trainer.args, "teacher", None)
    result.distill = trainer.args.distill if result.teacher else None
    path = result.save_dir / "sparsity.json"
    if path.is_file():
        stats = json.loads(path.read_text())
        start, end = stats.get("start") or {}, stats.get("end") or {}
        result.gamma_mean_before = start.get("gamma_mean")
        result.gamma_near_zero_before = start.get("gamma_near_zero")
        result.gamma_mean_after = end.get("gamma_mean")
        result.gamma_near_zero_after = end.get("gamma_near_zero")
    return result
