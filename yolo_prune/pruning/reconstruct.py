"""Least-squares reconstruction: the layers that consumed removed channels learn to do without them.

For every conv whose input loses channels, what the removed channels contributed to its output,
``R = X_removed * W_removed``, is regressed on what remains, ``[X_kept, 1]``, over sampled patches of
calibration images (ridge regression, closed form). The fitted correction is added to the kept weights
and the intercept moves into the conv's bias (the running mean of the BN after it). The intercept alone
is :mod:`.compensate`'s mean compensation; the kept channels recover what correlates with the removed
ones, which is most of it in a network trained with redundancy. Upstream pruning is ignored: inputs and
targets both come from the model before this pruning step (one-shot, as in channel-pruning papers).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .calibration import run_with_hooks
from .compensate import bn_after, shift_output
from .graph import ChannelGroup, PruneGraph


def removed_inputs(graph: PruneGraph, plans: Sequence[tuple[ChannelGroup, list[int]]]) -> dict[nn.Conv2d, list[int]]:
    """Input channels each consumer conv will lose when ``plans`` (group, channel indices) are pruned."""
    out: dict[nn.Conv2d, set[int]] = {}
    for group, idxs in plans:
        if not idxs:
            continue
        for item in graph.dg.get_pruning_group(group.root, group.handler, sorted(idxs)):
            conv, fn = item.dep.target.module, item.dep.handler
            if isinstance(conv, nn.Conv2d) and conv.groups == 1 and fn == tp.pruner.function.prune_conv_in_channels:
                out.setdefault(conv, set()).update(int(i) for i in item.idxs)
    return {conv: sorted(idx) for conv, idx in out.items()}


@torch.no_grad()
def sample_patches(model: nn.Module, convs: Sequence[nn.Conv2d], images: torch.Tensor, *, per_image: int = 256,
                   batch: int = 8, seed: int = 0) -> dict[nn.Conv2d, torch.Tensor]:
    """Unfolded input patches (rows: sampled positions, cols: in_channels * kh * kw) of each conv."""
    g = torch.Generator().manual_seed(seed)
    rows: dict[nn.Conv2d, list[torch.Tensor]] = {c: [] for c in convs}

    def hook(conv: nn.Conv2d, inputs, output) -> None:
        x = inputs[0].detach().float()
        cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        n, _, positions = cols.shape
        pick = torch.randint(positions, (n, min(per_image, positions)), generator=g).to(cols.device)
        picked = torch.gather(cols, 2, pick.unsqueeze(1).expand(-1, cols.shape[1], -1))
        rows[conv].append(picked.permute(0, 2, 1).reshape(-1, cols.shape[1]).cpu())

    run_with_hooks(model, images, convs, hook, batch=batch)
    return {c: torch.cat(r) for c, r in rows.items() if r}


@torch.no_grad()
def reconstruct(graph: PruneGraph, plans: Sequence[tuple[ChannelGroup, list[int]]], images: torch.Tensor, *,
                ridge: float = 1e-2, seed: int = 0) -> int:
    """Refit every consumer of the channels in ``plans`` (call before pruning). Returns the convs refitted."""
    lost = removed_inputs(graph, plans)
    if not lost:
        return 0
    patches = sample_patches(graph.model, list(lost), images, seed=seed)
    bns = bn_after(graph.model)
    for conv, removed in lost.items():
        x = patches.get(conv)
        if x is None:
            continue
        k = conv.kernel_size[0] * conv.kernel_size[1]
        cin = conv.in_channels
        removed_set = set(removed)
        kept = [c for c in range(cin) if c not in removed_set]
        col = lambda chans: (torch.tensor(chans)[:, None] * k + torch.arange(k)).flatten()  # noqa: E731
        w = conv.weight.detach().float().reshape(conv.out_channels, cin * k).cpu()
        xr, xk = x[:, col(removed)], x[:, col(kept)] if kept else x[:, :0]
        target = xr @ w[:, col(removed)].T  # what the removed inputs contributed, (rows, out)
        design = torch.cat([xk, torch.ones(len(xk), 1)], 1)
        gram = (design.T @ design).double()  # products in float32, the small solve in float64
        lam = ridge * gram.diagonal()[:-1].mean().clamp(min=1e-12) if kept else 0.0
        reg = torch.eye(gram.shape[0], dtype=gram.dtype) * (lam + 1e-9)
        reg[-1, -1] = 1e-9  # the intercept is not shrunk
        try:
            delta = torch.linalg.solve(gram + reg, (design.T @ target).double())
        except RuntimeError:
            continue  # singular system: leave this conv as it is
        dev = conv.weight.device
        if kept:
            dw = delta[:-1].T.reshape(conv.out_channels, len(kept), *conv.kernel_size)
            conv.weight[:, kept] += dw.to(conv.weight.dtype).to(dev)
        shift_output(conv, delta[-1], bns.get(conv))
    return len(lost)
