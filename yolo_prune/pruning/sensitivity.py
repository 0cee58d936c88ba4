"""Sensitivity: how much the detector degrades when one channel group alone loses a fraction of its channels.

Measuring it by pruning a copy of the model for every (group, ratio) would retrace the graph every time.
Instead a removal is *simulated* exactly: the consumers of the removed channels get zero input weights for
them (what a real removal computes), after the same one-shot least-squares compensation as
:mod:`.reconstruct`, solved from the Gram matrix of each conv's input patches (measured once). The change is
then scored on calibration images, restarting the forward pass at the first layer it touches
(:class:`~.forward.ForwardCache`), and undone.

The score (:func:`detection_distance`) is an output-distortion proxy of detection quality, measured against
the dense model's decoded head output: the class-probability difference at every anchor, weighted by how
confident either model is there, plus ``1 - IoU`` of the boxes weighted by the dense model's confidence; for a
segmentation, pose or OBB model, plus the relative L1 error of its task channels (mask coefficients, keypoints,
angle; confidence-weighted) and of Segment's prototypes.
``bench/accuracy.py`` checks it against real mAP (rank correlation).

:func:`sensitivity_curves` gives the per-group curves used by ``allocation=sensitivity`` (:mod:`.schedule`);
:class:`Probe` also scores whole plans for ``allocation=search``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..logs import Progress
from .calibration import run_with_hooks
from .compensate import bn_after
from .forward import ForwardCache, top_level_index
from .graph import ChannelGroup, PruneGraph
from .portable import untie
from .reconstruct import removed_inputs
from .recalibrate import recalibrate_bn

RATIOS = (0.25, 0.5, 0.75)
PROBE_IMAGES = 32  # calibration images the sensitivity / search probes score on (the first ones)


def _box_iou_xywh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of boxes (..., 4, A) in xywh."""
    ax1, ay1, ax2, ay2 = a[:, 0] - a[:, 2] / 2, a[:, 1] - a[:, 3] / 2, a[:, 0] + a[:, 2] / 2, a[:, 1] + a[:, 3] / 2
    bx1, by1, bx2, by2 = b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2
    iw = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
    ih = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0)
    inter = iw * ih
    union = (ax2 - ax1).clamp(min=0) * (ay2 - ay1).clamp(min=0) + (bx2 - bx1).clamp(min=0) * (by2 - by1).clamp(min=0)
    return inter / (union - inter).clamp(min=1e-9)


def detection_distance(reference: Sequence[Any], output: Sequence[Any], *, extras: int = 0) -> float:
    """Distortion of decoded detections ``(batch, 4 + nc + extras, anchors)`` against the reference (0: identical).

    Class term: sum over classes of |p - q| per anchor, averaged with weights max(conf_ref, conf_out) (so both
    lost and spurious detections count, background anchors do not). Box term: 1 - IoU per anchor, averaged with
    weights conf_ref. A task model's ``extras`` channels (mask coefficients, keypoints, angle) add their relative
    L1 error, weighted by conf_ref; a Segment head's prototypes (an item ``[predictions, prototypes]``) their
    relative L1 error.
    """
    num = {"c": 0.0, "b": 0.0, "t": 0.0, "m": 0.0}
    den = dict.fromkeys(num, 0.0)
    for ref, out in zip(reference, output):
        if isinstance(ref, (list, tuple)):  # Segment: the prototypes
            (ref, proto_r), (out, proto_o) = ref, out
            num["m"] += float((proto_r.float() - proto_o.float()).abs().sum())
            den["m"] += float(proto_r.float().abs().sum())
        nc = ref.shape[1] - 4 - extras if ref.shape[1] - 4 - extras > 0 else ref.shape[1] - 4
        p, q = ref[:, 4:4 + nc].float(), out[:, 4:4 + nc].float()
        conf_p, conf_q = p.amax(1), q.amax(1)
        w = torch.maximum(conf_p, conf_q)
        num["c"] += float((w * (p - q).abs().sum(1)).sum())
        den["c"] += float(w.sum())
        iou = _box_iou_xywh(ref[:, :4].float(), out[:, :4].float())
        num["b"] += float((conf_p * (1 - iou)).sum())
        den["b"] += float(conf_p.sum())
        if ref.shape[1] > 4 + nc:
            t_r, t_o = ref[:, 4 + nc:].float(), out[:, 4 + nc:].float()
            num["t"] += float((conf_p * (t_r - t_o).abs().mean(1)).sum())
            den["t"] += float((conf_p * t_r.abs().mean(1)).sum())
    return sum(num[k] / max(den[k], 1e-12) for k in num)


def task_channels(model: nn.Module) -> int:
    """Channels a task head adds to the decoded predictions after box and classes: mask coefficients (Segment),
    keypoint values (Pose), angles (OBB); 0 for Detect."""
    head = model.model[-1]
    for attr in ("nm", "nk", "ne"):
        if isinstance(getattr(head, attr, None), int):
            return int(getattr(head, attr))
    return 0


class ConvGrams:
    """Gram matrices ``[X, 1]^T [X, 1]`` of every ungrouped conv's input patches (sampled positions).

    They depend on the model's weights up to each conv, the images, ``per_image``, ``batch`` and ``seed`` only:
    ``recon`` ranking measures them on the first :data:`PROBE_IMAGES` calibration images, and the probes that follow
    on the same model reuse them (:class:`Calibration`)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, images: torch.Tensor, *, per_image: int = 64, batch: int = 8,
                 seed: int = 0, progress: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.grams: dict[nn.Conv2d, torch.Tensor] = {}

        def hook(conv: nn.Conv2d, inputs, output) -> None:
            x = inputs[0].detach().float()
            cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
            n, d, positions = cols.shape
            pick = torch.randint(positions, (n, min(per_image, positions)), generator=g).to(cols.device)
            rows = torch.gather(cols, 2, pick.unsqueeze(1).expand(-1, d, -1)).permute(0, 2, 1).reshape(-1, d)
            design = torch.cat([rows, torch.ones(len(rows), 1, device=rows.device)], 1)
            gram = (design.T @ design).double().cpu()
            self.grams[conv] = self.grams[conv] + gram if conv in self.grams else gram

        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
        with Progress("Gram matrices", len(images), unit="images", enabled=progress) as bar:
            run_with_hooks(model, images, convs, hook, batch=batch, progress=bar)

    def solve(self, conv: nn.Conv2d, removed: Sequence[int], ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One-shot least squares for ``conv`` losing input channels ``removed``: (weight delta of the kept input
        channels, shape (out, kept, kh, kw); intercept (out,)), or None if singular / unknown."""
        gram = self.grams.get(conv)
        if gram is None:
            return None
        k = conv.kernel_size[0] * conv.kernel_size[1]
        cin = conv.in_channels
        rset = set(int(c) for c in removed)
        kept = [c for c in range(cin) if c not in rset]
        col = lambda chans: (torch.tensor(chans, dtype=torch.long)[:, None] * k + torch.arange(k)).flatten()  # noqa: E731
        kc = torch.cat([col(kept), torch.tensor([cin * k])]) if kept else torch.tensor([cin * k])
        rc = col(sorted(rset))
        w = conv.weight.detach().double().reshape(conv.out_channels, cin * k).cpu()
        a = gram[kc][:, kc]
        b = gram[kc][:, rc] @ w[:, rc].T
        lam = ridge * a.diagonal()[:-1].mean().clamp(min=1e-12) if kept else 0.0
        reg = torch.eye(len(kc), dtype=a.dtype) * (lam + 1e-9)
        reg[-1, -1] = 1e-9
        delta = _spd_solve(a + reg, b)
        if delta is None:
            return None
        dw = delta[:-1].T.reshape(conv.out_channels, len(kept), *conv.kernel_size)
        return dw.float(), delta[-1].float()


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Solve ``a x = b`` for a symmetric positive definite ``a``: Cholesky in float32 (fast), else LU in float64."""
    chol, info = torch.linalg.cholesky_ex(a.float())
    if int(info) == 0:
        x = torch.cholesky_solve(b.float(), chol)
        if torch.isfinite(x).all():
            return x.double()
    try:
        return torch.linalg.solve(a.double(), b.double())
    except RuntimeError:
        return None


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration images, with the :class:`ConvGrams` of the model *as it is now* on their first
    :data:`PROBE_IMAGES` (seed as the probes use) when they were measured already (ranking): the probes reuse them."""

    images: torch.Tensor
    grams: ConvGrams | None = None


@dataclasses.dataclass
class GroupSensitivity:
    """Loss (:func:`detection_distance`) of one group pruned alone at each ratio (removed = channels cut)."""

    name: str
    channels: int
    ratios: list[float]
    removed: list[int]
    losses: list[float]
    macs_saved: list[float]  # fraction of the model's conv MACs each removal saves


class Probe:
    """Scores plans ``[(group, channel indices)]`` on calibration images by simulated removal (see module doc)."""

    def __init__(self, model: nn.Module, graph: PruneGraph, images: torch.Tensor, *, grams: ConvGrams | None = None,
                 compensate: bool = True, batch: int = 16, seed: int = 0, replay: bool = True, progress: bool = False):
        """``grams``: the :class:`ConvGrams` of ``model`` on ``images`` with ``seed`` if measured already.
        ``replay``: the head replays the cached outputs of the branches a removal leaves unchanged
        (:class:`~.forward.ForwardCache`; the same losses, faster); False recomputes them."""
        self.model, self.graph, self.replay = model, graph, replay
        model.eval()
        self.cache = ForwardCache(model, images, batch=batch)
        self.grams = (grams or ConvGrams(model, images, seed=seed, progress=progress)) if compensate else None
        self.bns = bn_after(model)
        self.names = graph.names
        self.extras = task_channels(model)

    @torch.no_grad()
    def apply(self, plans: Sequence[tuple[ChannelGroup, list[int]]]) -> tuple[list, int]:
        """Simulate the removal of ``plans`` (tied groups too); returns (undo record, first top-level layer
        touched)."""
        lost = removed_inputs(self.graph, untie(plans))
        undo = []
        start = len(self.model.model)
        for conv, removed in lost.items():
            bn = self.bns.get(conv)
            undo.append((conv.weight, conv.weight.detach().clone()))
            if bn is not None:
                undo.append((bn.running_mean, bn.running_mean.clone()))
            elif conv.bias is not None:
                undo.append((conv.bias, conv.bias.detach().clone()))
            fit = self.grams.solve(conv, removed) if self.grams is not None else None
            if fit is not None:
                kept = [c for c in range(conv.in_channels) if c not in set(removed)]
                dw, b = fit
                if kept:
                    conv.weight[:, kept] += dw.to(conv.weight)
                if bn is not None:
                    bn.running_mean -= b.to(bn.running_mean)
                elif conv.bias is not None:
                    conv.bias += b.to(conv.bias)
            conv.weight[:, removed] = 0
            idx = top_level_index(self.names.get(conv, ""))
            if idx is not None:
                start = min(start, idx)
        return undo, start

    @staticmethod
    @torch.no_grad()
    def undo(record: list) -> None:
        for tensor, saved in reversed(record):
            tensor.copy_(saved)

    @torch.no_grad()
    def loss(self, plans: Sequence[tuple[ChannelGroup, list[int]]], *, bn_reference: dict | None = None) -> float:
        """Distortion of the head output with ``plans`` removed (the model is left unchanged). With
        ``bn_reference`` (:func:`.recalibrate.bn_reference` of the unchanged model) the BN statistics are
        re-estimated on the cached images first (moment matching), as after a real pruning."""
        record, start = self.apply(plans)
        try:
            if bn_reference is not None:
                for bn in (m for m in self.model.modules() if isinstance(m, nn.BatchNorm2d)):
                    record.append((bn.running_mean, bn.running_mean.clone()))
                    record.append((bn.running_var, bn.running_var.clone()))
                recalibrate_bn(self.model, torch.cat(self.cache.outputs[-1]), reference=bn_reference)
                start = 0
            # every tensor the simulation changed is in the undo record: the head replays the branches it spared
            changed = {id(tensor) for tensor, _ in record} if self.replay else None
            out = self.cache.run_from(self.model, start, changed=changed)
        finally:
            self.undo(record)
        return detection_distance(self.cache.head, out, extras=self.extras)


def measure_sensitivity(probe: Probe, scored: Sequence[tuple[ChannelGroup, torch.Tensor]], *,
                        macs_saved: Sequence[float], ratios: Sequence[float] = RATIOS,
                        round_to: int | None = None, progress: bool = False) -> list[GroupSensitivity]:
    """Loss of each group pruned alone at each ratio (lowest-scored channels first). ``macs_saved[i]`` is the
    fraction of conv MACs one channel of group i saves."""
    out = []
    bar = Progress("sensitivity", len(scored) * len(ratios), unit="probes", enabled=progress)
    for (g, s), per_channel in zip(scored, macs_saved):
        order = torch.argsort(s, stable=True)
        removed, losses = [], []
        for r in ratios:
            n = _count(g.channels, r, round_to)
            removed.append(n)
            losses.append(probe.loss([(g, order[:n].tolist())]) if n else 0.0)
            bar.update(1)
        out.append(GroupSensitivity(name=g.name, channels=g.channels, ratios=list(ratios), removed=removed,
                                    losses=losses, macs_saved=[n * per_channel for n in removed]))
    bar.close()
    return out


def _count(channels: int, ratio: float, round_to: int | None) -> int:
    """Channels removed at ``ratio``, keeping the width a multiple of ``round_to`` where the group allows it."""
    n = min(int(round(channels * ratio)), channels - 1)
    if round_to and round_to > 1 and channels > round_to:
        keep = max(round_to, int(math.ceil((channels - n) / round_to) * round_to))
        n = channels - min(channels, keep)
    return max(n, 0)
