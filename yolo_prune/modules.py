"""Prunable forms of ultralytics blocks.

torch-pruning follows ``torch.cat`` and residual adds, but not ``Tensor.chunk``: C2f splits the output of
its first conv in two equal halves, and after pruning the halves are no longer equal. :class:`C2fSplit`
replaces that one conv by two convs (the two halves), which is exactly the same function; the
dependency graph then sees a plain concat. It subclasses ultralytics' ``C2f`` so every isinstance check in
ultralytics (export, fuse, info) still applies, and it pickles like any other module: a pruned
checkpoint loads with ``YOLO(path)`` wherever ``yolo_prune`` is installed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from ultralytics.nn.modules import C2f, Conv

# Attributes ultralytics' model builder puts on every layer of ``DetectionModel.model``.
_LAYER_ATTRS = ("i", "f", "type", "np")


def _slice_conv(conv: Conv, start: int, stop: int) -> Conv:
    """Return a copy of an ultralytics ``Conv`` (conv + BN + act) keeping output channels [start, stop)."""
    new = copy.deepcopy(conv)
    c, bn = new.conv, new.bn
    c.weight = nn.Parameter(conv.conv.weight.data[start:stop].clone())
    if c.bias is not None:
        c.bias = nn.Parameter(conv.conv.bias.data[start:stop].clone())
    c.out_channels = stop - start
    bn.weight = nn.Parameter(conv.bn.weight.data[start:stop].clone())
    bn.bias = nn.Parameter(conv.bn.bias.data[start:stop].clone())
    bn.running_mean = conv.bn.running_mean[start:stop].clone()
    bn.running_var = conv.bn.running_var[start:stop].clone()
    bn.num_features = stop - start
    return new


class C2fSplit(C2f):
    """C2f whose first conv is held as two convs: ``cv0`` (first half) and ``cv1`` (second half).

    ``forward(x) == C2f.forward(x)`` for the same weights; the halves may have different widths
    after pruning. Build it with :meth:`from_c2f`.
    """

    def __init__(self, cv0: Conv, cv1: Conv, cv2: Conv, m: nn.ModuleList):
        nn.Module.__init__(self)  # C2f.__init__ would build fresh layers
        self.c = cv1.conv.out_channels
        self.cv0, self.cv1, self.cv2, self.m = cv0, cv1, cv2, m

    @classmethod
    def from_c2f(cls, block: C2f) -> C2fSplit:
        """Convert a C2f (or subclass using C2f's forward, e.g. C3k2) into the split form, weights exact."""
        if getattr(block.cv1.conv, "groups", 1) != 1:
            raise ValueError("C2fSplit needs an ungrouped cv1")
        c = block.cv1.conv.out_channels // 2
        new = cls(_slice_conv(block.cv1, 0, c), _slice_conv(block.cv1, c, 2 * c), block.cv2, block.m)
        for a in _LAYER_ATTRS:
            if hasattr(block, a):
                setattr(new, a, getattr(block, a))
        new.train(block.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))

    # ultralytics' exporter swaps C2f.forward for forward_split; both are the same here.
    forward_split = forward


def to_prunable(model: nn.Module) -> int:
    """Replace, in place, every C2f-style block of ``model`` by :class:`C2fSplit`. Returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, C2f) and not isinstance(child, C2fSplit) and type(child).forward is C2f.forward:
            setattr(model, name, C2fSplit.from_c2f(child))
            count += 1
        else:
            count += to_prunable(child)
    return count
