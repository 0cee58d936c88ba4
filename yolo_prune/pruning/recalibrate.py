"""BN re-estimation after pruning: every BatchNorm's running statistics are measured again on calibration images.

Removing channels shifts the distribution of every activation downstream, while the stored BN statistics still
describe the dense model (EagleEye's "adaptive BN"). Two ways to measure them again, both on unlabelled images,
both changing nothing but ``running_mean`` / ``running_var``:

- ``mode="reset"`` (EagleEye): forget the stored statistics and average the batch statistics of the calibration
  images (cumulative moving average, ``momentum=None``), every BN in train mode, everything else frozen in eval.
  Exact when the stored statistics are the true statistics of the calibration data; not otherwise: on the
  fixture's yolov8n (INT8-rebuilt statistics, calibration at 320) it takes the *dense* model from 0.454 to 0.350.
- ``mode="match"`` (default when the dense model's statistics are known): moment matching. The dense model's
  BN inputs are measured first (eval mode, exact); afterwards each BN of the pruned model gets the statistics
  that give its output the same mean and variance, channel by channel, as the dense model's output on the same
  images. With nothing pruned it changes nothing (up to the batch noise); after pruning it corrects only what
  pruning shifted. Downstream BNs see the corrected upstream outputs: while measuring, each batch is normalised
  with its own statistics (as BN does in train mode), and the stored result is the whole set's.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..logs import Progress
from .calibration import run_with_hooks

RECALIBRATE_MODES = ("match", "reset")


@dataclasses.dataclass
class BNReference:
    """What one BN of the dense model sees and stores (full width, original channel order)."""

    input_mean: torch.Tensor
    input_var: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float


def _bns(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


class _Moments:
    """Per-channel sums of x and x^2 over (batch, height, width), in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: torch.Tensor | float = 0.0
        self.s2: torch.Tensor | float = 0.0

    def add(self, x: torch.Tensor) -> None:
        xd = x.detach().double()
        self.s1 = self.s1 + xd.sum((0, 2, 3))
        self.s2 = self.s2 + (xd * xd).sum((0, 2, 3))
        self.n += x.shape[0] * x.shape[2] * x.shape[3]

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s1 / self.n
        var = (self.s2 / self.n - mean * mean).clamp(min=0)
        return mean.float(), var.float()


@torch.no_grad()
def bn_reference(model: nn.Module, images: torch.Tensor, *, batch: int = 16,
                 progress: bool = False) -> dict[str, BNReference]:
    """Measure the input statistics of every BN of ``model`` (eval mode) and keep its stored statistics."""
    bns = _bns(model)
    moments = {bn: _Moments() for bn in bns.values()}
    with Progress("BN reference", len(images), unit="images", enabled=progress) as bar:
        run_with_hooks(model, images, list(bns.values()), lambda m, i, o: moments[m].add(i[0]), batch=batch,
                       progress=bar)
    out = {}
    for name, bn in bns.items():
        if moments[bn].n == 0:
            continue
        mean, var = moments[bn].mean_var()
        out[name] = BNReference(mean.cpu(), var.cpu(), bn.running_mean.detach().float().cpu().clone(),
                                bn.running_var.detach().float().cpu().clone(), bn.eps)
    return out


def _target(ref: BNReference, idx: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the dense BN's normalised output ``(x - running_mean) / sqrt(running_var + eps)``."""
    sl = (lambda t: t[list(idx)]) if idx is not None else (lambda t: t)  # noqa: E731
    denom = (sl(ref.running_var) + ref.eps).sqrt()
    return (sl(ref.input_mean) - sl(ref.running_mean)) / denom, sl(ref.input_var).sqrt() / denom


def _matched_stats(mean: torch.Tensor, var: torch.Tensor, t_mean: torch.Tensor, t_std: torch.Tensor,
                   eps: float, fallback_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Running stats (m, v) such that (x - m) / sqrt(v + eps) has mean ``t_mean`` and std ``t_std`` when x has
    ``mean`` / ``var``; channels without variance (either side) keep ``fallback_var`` and match the mean only."""
    ok = (t_std > 1e-6) & (var > 1e-12)
    scale = torch.where(ok, var.sqrt() / t_std.clamp(min=1e-6), (fallback_var + eps).sqrt())
    v = (scale * scale - eps).clamp(min=0)
    m = mean - t_mean * scale
    return m, v


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, *, reference: dict[str, BNReference] | None = None,
                   kept: dict[str, list[int]] | None = None, mode: str | None = None, batch: int = 16,
                   progress: bool = False) -> int:
    """Re-estimate the running statistics of every BN of ``model`` on ``images``; returns the BNs updated.

    ``reference`` (from :func:`bn_reference` on the dense model) and ``kept`` (BN name -> original indices of its
    kept channels, see :class:`~yolo_prune.pruning.graph.KeptChannels`; absent: all) select ``mode="match"``;
    without a reference only ``mode="reset"`` is possible. Parameters are never touched. ``progress``: progress
    lines (:class:`~yolo_prune.logs.Progress`).
    """
    mode = mode or ("match" if reference is not None else "reset")
    if mode not in RECALIBRATE_MODES:
        raise ValueError(f"mode={mode!r} must be one of {RECALIBRATE_MODES}")
    if mode == "match" and reference is None:
        raise ValueError("mode='match' needs the dense model's reference statistics")
    bns = _bns(model)
    bar = Progress("BN re-estimation", len(images), unit="images", enabled=progress)
    if mode == "reset":
        with bar:
            return _reset(model, list(bns.values()), images, batch, bar)
    kept = kept or {}
    names = {bn: n for n, bn in bns.items() if n in reference}
    targets = {bn: _target(reference[n], kept.get(n)) for bn, n in names.items()}
    moments = {bn: _Moments() for bn in names}

    def hook(bn: nn.BatchNorm2d, inputs, output):
        x = inputs[0]
        moments[bn].add(x)
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        t_mean, t_std = (t.to(x.device) for t in targets[bn])
        m, v = _matched_stats(mean, var, t_mean, t_std, bn.eps, bn.running_var.float())
        return F.batch_norm(x, m.to(x.dtype), v.to(x.dtype), bn.weight, bn.bias, False, 0.0, bn.eps)

    with bar:
        run_with_hooks(model, images, list(names), hook, batch=batch, progress=bar)
    for bn in names:
        if moments[bn].n == 0:
            continue
        mean, var = moments[bn].mean_var()
        t_mean, t_std = targets[bn]
        m, v = _matched_stats(mean, var, t_mean, t_std, bn.eps, bn.running_var.float().cpu())
        bn.running_mean.copy_(m.to(bn.running_mean))
        bn.running_var.copy_(v.to(bn.running_var))
    return len(names)


def _reset(model: nn.Module, bns: list[nn.BatchNorm2d], images: torch.Tensor, batch: int, bar: Progress) -> int:
    """EagleEye's adaptive BN: cumulative average of batch statistics, BNs in train mode, the rest in eval."""
    flags = {m: m.training for m in model.modules()}
    momentum = {bn: bn.momentum for bn in bns}
    device = next(model.parameters()).device
    model.eval()
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for i in range(0, len(images), batch):
            model(images[i : i + batch].to(device))
            bar.update(len(images[i : i + batch]))
    finally:
        for m, f in flags.items():
            m.training = f
        for bn, v in momentum.items():
            bn.momentum = v
    return len(bns)
