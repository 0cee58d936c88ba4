"""Sequential reconstruction: refit the pruned network layer by layer toward the dense network's outputs.

One-shot least squares (:mod:`.reconstruct`) refits each consumer of removed channels on the *dense* model's
inputs, so the errors of the layers above it add up. Here (as in channel-pruning reconstruction, He et al. 2017)
every conv is refit in topological order with its inputs taken from the network that is already pruned and
refit above it, and its targets from the dense network at the same conv: the dense conv's pre-BN output at the
kept output channels. Each conv so also corrects what the cuts and refits above it did.

The problem of one conv is a ridge regression toward its current weights, over sampled output positions of the
calibration images (the memory bound), accumulated as normal equations batch by batch:

    min ||[X, 1] [dW; db] - R||^2 + lam ||dW||^2,    R = dense target - current pruned output,

with the intercept ``db`` moved into the BN running mean (or the conv bias) by :func:`.compensate.shift_output`.

Cost: the outputs of every top-level layer (``DetectionModel.model[i]``, with its ``f`` from-indices) are cached
for both networks over all images (fp16), so each layer runs once per conv it holds (pruned) plus once (dense);
the Detect head is taken branch by branch. yolov8n, 64 images at 320: well under a minute on 2 cores.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..logs import Progress
from .compensate import bn_after, shift_output
from .forward import last_use as layer_last_use
from .forward import layer_input, sources, to_float
from .graph import KeptChannels

Batches = list[torch.Tensor]


def _units(layer: nn.Module) -> list[tuple[nn.Module, Callable[[Any], Any]]]:
    """The pieces of a top-level layer refit one after the other: the head branch by branch (each branch reads one
    feature map; Pose26's keypoint features with their output conv; Proto reads the finest map, Proto26 all of
    them), any other layer as a whole."""
    from ultralytics.nn.modules import Detect

    if not isinstance(layer, Detect):
        return [(layer, lambda x: x)]
    units = []
    for attr in ("cv2", "cv3", "cv4", "one2one_cv2", "one2one_cv3", "one2one_cv4"):
        branches = getattr(layer, attr, None)
        outputs = getattr(layer, f"{attr}_kpts", None)  # Pose26: cv4 ends in hidden features
        for k, branch in enumerate(branches or []):
            unit = branch if outputs is None else nn.Sequential(branch, outputs[k])
            units.append((unit, (lambda k: lambda xs: xs[k])(k)))
    proto = getattr(layer, "proto", None)
    if proto is not None:
        units.append((proto, (lambda xs: xs) if hasattr(proto, "feat_fuse") else (lambda xs: xs[0])))
    return units


def _execution_order(unit: nn.Module, select: Callable, x: Any) -> list[nn.Conv2d]:
    """The unit's ungrouped convs in the order a forward pass runs them."""
    order: list[nn.Conv2d] = []
    convs = [m for m in unit.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    handles = [c.register_forward_pre_hook(lambda m, i: order.append(m) if m not in order else None) for c in convs]
    try:
        unit(select(to_float(x)))
    finally:
        for h in handles:
            h.remove()
    return order


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the conv of interest has run."""


class _Sampler:
    """Fixed random output positions per (conv name, batch), shared by the dense and the pruned runs."""

    def __init__(self, per_image: int, seed: int):
        self.per_image = per_image
        self.seed = seed
        self.cache: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, name: str, batch: int, n: int, positions: int) -> torch.Tensor:
        key = (name, batch)
        if key not in self.cache:
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{name}/{batch}".encode()))
            k = min(self.per_image, positions)
            self.cache[key] = torch.stack([torch.randperm(positions, generator=g)[:k] for _ in range(n)])
        return self.cache[key]


def _pre_norm(conv: nn.Conv2d, y: torch.Tensor, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    """A conv output as the rest of the network sees it before scaling: minus the BN running mean, if any."""
    if bn is not None:
        return y - bn.running_mean.float().view(1, -1, 1, 1)
    return y


@torch.no_grad()
def reconstruct_sequential(model: nn.Module, dense: nn.Module, kept: KeptChannels, images: torch.Tensor, *,
                           per_image: int = 128, ridge: float = 1e-2, batch: int = 8, seed: int = 0,
                           progress: bool = False) -> int:
    """Refit every ungrouped conv of the pruned ``model`` toward ``dense`` (same module names, before pruning)
    on ``images``, layer by layer. ``kept`` maps each module to the original channels it keeps. Both models are
    DetectionModels in eval mode; ``dense`` is not modified. Returns the number of convs refit."""
    was = model.training, dense.training
    model.eval(), dense.eval()
    device = next(model.parameters()).device
    names = {m: n for n, m in model.named_modules()}
    dnames = dict(dense.named_modules())
    bns, dbns = bn_after(model), bn_after(dense)
    sampler = _Sampler(per_image, seed)
    batches = [images[i : i + batch].to(device) for i in range(0, len(images), batch)]
    layers, dlayers = list(model.model), list(dense.model)
    last_use = layer_last_use(model)
    p_out: dict[int, Batches] = {-1: batches}
    d_out: dict[int, Batches] = {-1: batches}
    exact: dict[int, bool] = {-1: True}  # pruned output == dense output at the kept channels
    refit = 0
    bar = Progress("sequential refit", len(layers), unit="layers", enabled=progress).iterate(enumerate(layers))
    try:
        for i, layer in bar:
            dlayer = dlayers[i]
            p_in = layer_input(layer, i, p_out)
            d_in = layer_input(dlayer, i, d_out)
            needed = last_use.get(i, -1) > i  # some later layer reads this output
            convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
            lossless = all(exact.get(j, False) for j in sources(layer, i)) and all(
                len(kept.kept_in(names[c])) == kept.widths[names[c]][1] for c in convs)
            exact[i] = lossless
            if lossless or not convs:  # nothing to correct: the kept channels compute what they did
                if needed:
                    p_out[i] = [layer(to_float(x)).half() for x in p_in]
                    d_out[i] = [dlayer(to_float(x)).half() for x in d_in]
            else:
                dense_out = None
                for (unit, select), (dunit, _) in zip(_units(layer), _units(dlayer)):
                    order = _execution_order(unit, select, p_in[0])
                    if not order:
                        continue
                    scales = {names[c]: _scale(bns.get(c), dbns.get(dnames[names[c]]), kept, names[c])
                              for c in order}
                    targets, outs = _dense_targets(dunit, select, d_in, [names[c] for c in order], dnames, dbns,
                                                   kept, sampler, scales)
                    if unit is layer:
                        dense_out = outs
                    for conv in order:
                        refit += _refit(unit, select, p_in, conv, names[conv], bns.get(conv),
                                        targets.pop(names[conv]), sampler, ridge)
                if needed:
                    p_out[i] = [layer(to_float(x)).half() for x in p_in]
                    d_out[i] = dense_out if dense_out is not None else [dlayer(to_float(x)).half() for x in d_in]
            for j in [j for j, last in last_use.items() if last <= i and j in p_out and j >= 0]:
                del p_out[j], d_out[j]
    finally:
        model.train(was[0])
        dense.train(was[1])
    return refit


def _scale(bn: nn.BatchNorm2d | None, dbn: nn.BatchNorm2d | None, kept: KeptChannels,
           name: str) -> torch.Tensor | None:
    """Per kept output channel, sqrt(pruned running_var + eps) / sqrt(dense running_var + eps): the pruned conv
    must reproduce the dense BN's *output*, so its pre-norm target is the dense one times this (1 unless the BN
    statistics were re-estimated)."""
    if bn is None or dbn is None:
        return None
    idx = kept.kept_out(name)
    sp = (bn.running_var.float() + bn.eps).sqrt()
    sd = (dbn.running_var.float()[idx] + dbn.eps).sqrt()
    return (sp / sd).cpu()


def _dense_targets(dunit: nn.Module, select: Callable, d_in: list[Any], conv_names: Sequence[str],
                   dnames: dict[str, nn.Module], dbns: dict, kept: KeptChannels, sampler: _Sampler,
                   scales: dict[str, torch.Tensor | None] | None = None
                   ) -> tuple[dict[str, list[torch.Tensor]], Batches]:
    """Per conv (by name) and batch: the dense pre-norm output at the sampled positions and kept channels,
    shaped (rows, kept out channels); and the unit's outputs (fp16), per batch."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in conv_names}
    convs = {dnames[n]: n for n in conv_names}
    state = {"b": 0}

    def hook(conv: nn.Conv2d, inputs, y) -> None:
        name = convs[conv]
        n, c, h, w = y.shape
        pick = sampler(name, state["b"], n, h * w).to(y.device)
        e = _pre_norm(conv, y.float(), dbns.get(conv))[:, kept.kept_out(name)]
        scale = (scales or {}).get(name)
        if scale is not None:
            e = e * scale.to(e).view(1, -1, 1, 1)
        rows = torch.gather(e.flatten(2), 2, pick.unsqueeze(1).expand(-1, e.shape[1], -1))
        out[name].append(rows.permute(0, 2, 1).reshape(-1, e.shape[1]))

    handles = [c.register_forward_hook(hook) for c in convs]
    outputs = []
    try:
        for b, x in enumerate(d_in):
            state["b"] = b
            y = dunit(select(to_float(x)))
            outputs.append(y.half() if isinstance(y, torch.Tensor) else None)
    finally:
        for h in handles:
            h.remove()
    return out, outputs


def _refit(unit: nn.Module, select: Callable, p_in: list[Any], conv: nn.Conv2d, name: str,
           bn: nn.BatchNorm2d | None, targets: list[torch.Tensor], sampler: _Sampler, ridge: float) -> int:
    """Accumulate the normal equations of ``conv`` over the batches (pruned inputs, dense targets), solve, apply."""
    d = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(d + 1, conv.out_channels, dtype=torch.float64)
    state = {"b": 0}

    def hook(m: nn.Conv2d, inputs, y) -> None:
        x = inputs[0].float()
        n, c, h, w = y.shape
        pick = sampler(name, state["b"], n, h * w).to(y.device)
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        xs = torch.gather(cols, 2, pick.unsqueeze(1).expand(-1, cols.shape[1], -1)).permute(0, 2, 1).reshape(-1, d)
        e = _pre_norm(m, y.float(), bn)
        cur = torch.gather(e.flatten(2), 2, pick.unsqueeze(1).expand(-1, e.shape[1], -1))
        cur = cur.permute(0, 2, 1).reshape(-1, e.shape[1])
        r = targets[state["b"]].to(cur) - cur
        design = torch.cat([xs, torch.ones(len(xs), 1, device=xs.device)], 1)
        gram.add_((design.T @ design).double().cpu())
        cross.add_((design.T @ r).double().cpu())
        raise _Stop  # the rest of the unit is not needed for this conv

    handle = conv.register_forward_hook(hook)
    try:
        for b, x in enumerate(p_in):
            state["b"] = b
            try:
                unit(select(to_float(x)))
            except _Stop:
                pass
    finally:
        handle.remove()
    lam = ridge * gram.diagonal()[:-1].mean().clamp(min=1e-12)
    reg = torch.eye(d + 1, dtype=gram.dtype) * (lam + 1e-9)
    reg[-1, -1] = 1e-9  # the intercept is not shrunk
    try:
        delta = torch.linalg.solve(gram + reg, cross)
    except RuntimeError:
        return 0  # singular system: leave this conv as it is
    dw = delta[:-1].T.reshape(conv.out_channels, conv.in_channels, *conv.kernel_size)
    conv.weight.add_(dw.to(conv.weight))
    shift_output(conv, delta[-1], bn)
    return 1
