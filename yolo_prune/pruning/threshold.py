"""Remove the channels sparsity training has zeroed, without changing what the model computes.

A channel whose coupled BN gammas are all 0 still emits a constant: ``act(beta)`` after its own BN, and
whatever sum of such constants reaches a consumer through residual adds, concats, upsampling and max-pools.
Before the channel is removed, that constant is folded into every consumer conv: ``sum_k W[:, c, k] * const``
moves into the consumer's BN running mean (or into its bias when it has no BN, as Detect's output convs),
by :func:`~yolo_prune.pruning.compensate.compensate`. The constants are measured as the consumers' input
means on a batch of images (real calibration images when given, else a grey image: for a gamma exactly 0
the channel is the same constant for every input).

This is exact for 1x1 consumers. For a padded 3x3 consumer it is exact except in the outermost ring of
pixels, where the zero padding hid part of the constant from the kernel; that border error then spreads
inward by one pixel per later 3x3 conv (``bench/sparsity.py`` measures it). Gammas that are merely below
the threshold (not 0) make the channel almost constant, and the fold removes its mean.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .bngroups import BNGroups, threshold_counts
from .compensate import compensate, input_means
from .graph import build_graph, prepare
from .engine import layer_widths
from .portable import tie_counts

__all__ = ["FreeOutcome", "remove_free_channels", "detect_outputs", "output_change"]


@dataclasses.dataclass
class FreeOutcome:
    """What :func:`remove_free_channels` did."""

    threshold: float
    channels_removed: int
    macs_fraction: float  # conv MACs after / before
    reference_macs: float  # conv MACs before
    reference_channels: int  # prunable channels before
    layers_before: dict[str, int]


def remove_free_channels(model: nn.Module, threshold: float, *, round_to: int | None = None,
                         calib_images: torch.Tensor | None = None, trace_imgsz: int = 64,
                         macs_imgsz: int | None = None, portable: bool = False) -> FreeOutcome:
    """Remove, in place, every channel of ``model`` whose coupled gammas are all below ``threshold``.

    Each channel group keeps at least one channel, and with ``round_to`` a width that is a multiple of it (so
    a few free channels may stay). The constants the removed channels emitted are folded into their
    consumers first (see the module docstring). MACs are counted at ``macs_imgsz`` (default ``trace_imgsz``), as
    :func:`~yolo_prune.pruning.engine.prune_model` counts them. With ``portable`` only what stock ultralytics
    classes can compute without goes: both halves of a split block lose the smaller of their two free counts
    (:mod:`.portable`). Returns a :class:`FreeOutcome`.
    """
    prepare(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)  # torch-pruning traces through autograd
    graph = build_graph(model, imgsz=trace_imgsz, macs_imgsz=macs_imgsz, portable=portable)
    before = layer_widths(model, graph)
    groups = BNGroups.from_graph(graph)
    reference, channels = graph.conv_macs(), sum(g.channels for g in graph.groups())
    scores = groups.scores(model)
    counts = tie_counts(graph, [g.graph_group for g in groups.groups], threshold_counts(scores, threshold,
                                                                                     round_to=round_to))
    plans = [(g.graph_group, torch.argsort(s, stable=True)[:n].tolist())
             for g, s, n in zip(groups.groups, scores, counts) if n]
    if plans:
        for p in model.parameters():
            p.requires_grad_(False)  # plain tensor edits below; tracing is done
        images = calib_images
        if images is None or len(images) == 0:
            images = torch.full((1, 3, trace_imgsz, trace_imgsz), 0.5)
        compensate(graph, plans, input_means(model, images))
        for g, idxs in plans:
            graph.prune(g, idxs)
    for p in model.parameters():
        p.requires_grad_(True)
    return FreeOutcome(threshold=float(threshold), channels_removed=int(sum(counts)),
                       macs_fraction=graph.conv_macs() / reference, reference_macs=reference,
                       reference_channels=channels, layers_before=before)


@torch.no_grad()
def detect_outputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The raw Detect outputs (box distribution and class logits) of ``model`` per level, as (B, C, H, W)."""
    o = model.eval()(images)[1]
    raw = torch.cat([o["boxes"], o["scores"]], 1)
    out, start = [], 0
    for f in o["feats"]:
        h, w = f.shape[-2:]
        out.append(raw[..., start:start + h * w].reshape(raw.shape[0], raw.shape[1], h, w))
        start += h * w
    return out


def output_change(a: nn.Module, b: nn.Module, images: torch.Tensor, *, margin: int = 0) -> float:
    """Largest |difference| of the raw Detect outputs of ``a`` and ``b`` on ``images``, over the cells at least
    ``margin`` cells away from the border of each level (levels too small for that margin are skipped)."""
    worst = 0.0
    for p, q in zip(detect_outputs(a, images), detect_outputs(b, images)):
        h, w = p.shape[-2:]
        if h > 2 * margin and w > 2 * margin:
            worst = max(worst, float((p - q).abs()[..., margin:h - margin, margin:w - margin].max()))
    return worst
