"""Mean compensation: what a removed channel contributed on average moves into its consumers' biases.

A channel is not silent just because it ranks low: after sparsity training its BN gamma is about zero
but its beta is not, so it outputs a near-constant ``act(beta)``. Removing it shifts every consumer's
pre-activation by ``sum_k W[:, c, k] * mean_c``. Adding that shift back (into the consumer's BN running
mean, or into the bias of a conv without BN such as Detect's outputs) keeps the function unchanged for
constant channels, up to the zero padding at the image border, and unbiased for the others. The means
are the signed channel means of each consumer's input, measured on calibration images, so they are right
whatever lies between producer and consumer (residual adds, concats, max-pools, upsampling).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch_pruning as tp
from torch import nn

from .calibration import run_with_hooks
from .graph import ChannelGroup, PruneGraph


@torch.no_grad()
def input_means(model: nn.Module, images: torch.Tensor, *, batch: int = 8) -> dict[nn.Conv2d, torch.Tensor]:
    """Signed mean of every input channel of every ungrouped conv, over ``images`` (eval mode)."""
    sums: dict[nn.Conv2d, torch.Tensor] = {}
    counts: dict[nn.Conv2d, int] = {}

    def hook(conv: nn.Conv2d, inputs, output) -> None:
        x = inputs[0].detach()
        sums[conv] = sums.get(conv, 0) + x.double().sum((0, 2, 3))
        counts[conv] = counts.get(conv, 0) + x.shape[0] * x.shape[2] * x.shape[3]

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    run_with_hooks(model, images, convs, hook, batch=batch)
    return {m: (sums[m] / counts[m]).float() for m in sums}


def bn_after(model: nn.Module) -> dict[nn.Conv2d, nn.BatchNorm2d]:
    """The BatchNorm applied right after each conv (ultralytics ``Conv`` blocks: conv -> bn -> act)."""
    return {m.conv: m.bn for m in model.modules() if isinstance(getattr(m, "conv", None), nn.Conv2d)
            and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)}


@torch.no_grad()
def shift_output(conv: nn.Conv2d, delta: torch.Tensor, bn: nn.BatchNorm2d | None) -> None:
    """Add ``delta`` (one value per output channel) to ``conv``'s output: through the BN after it
    (BN(y + d) equals BN with running_mean - d), or through the conv's own bias when it has no BN."""
    if bn is not None:
        bn.running_mean -= delta.to(bn.running_mean)
    elif conv.bias is not None:
        conv.bias += delta.to(conv.bias)


@torch.no_grad()
def compensate(graph: PruneGraph, plans: Sequence[tuple[ChannelGroup, list[int]]],
               means: dict[nn.Conv2d, torch.Tensor]) -> int:
    """Fold the mean contribution of the channels about to be removed into their consumers.

    Call it before pruning ``plans`` (group, channel indices), with ``means`` measured on the model as it is.
    Returns the number of consumer convs adjusted.
    """
    deltas: dict[nn.Conv2d, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for group, idxs in plans:
        if not idxs:
            continue
        for item in graph.dg.get_pruning_group(group.root, group.handler, sorted(idxs)):
            conv, fn = item.dep.target.module, item.dep.handler
            if not (isinstance(conv, nn.Conv2d) and fn == tp.pruner.function.prune_conv_in_channels and conv in means):
                continue
            key = (id(conv), tuple(item.idxs))
            if key in seen:
                continue
            seen.add(key)
            cols = list(item.idxs)
            w = conv.weight[:, cols].sum((2, 3))  # (out, removed): each kernel sums over a constant input
            deltas[conv] = deltas.get(conv, 0) + w @ means[conv][cols].to(w)
    bns = bn_after(graph.model)
    for conv, delta in deltas.items():
        shift_output(conv, delta, bns.get(conv))
    return len(deltas)
