"""Channel groups seen through their BatchNorm gammas: what sparsity training must zero to free a channel.

A channel of a :class:`~yolo_prune.pruning.graph.ChannelGroup` can only be removed together with every
channel the dependency graph couples to it, so it is only "free" (removable without changing the function,
up to constants folded into consumers) when *every* BatchNorm on that coupled set has gamma ~ 0: both ends
of a bottleneck residual, a C2f's first-conv half and each bottleneck output added to it, ...

:class:`BNGroups` records, for every channel group, which BN channels belong to which root channel, by the
BN's *name* in a given model. It is built once from a traced copy of the model (the live model is never
rewritten), so a trainer can use it on the live model, on its EMA, or on the model a DDP worker rebuilt:

* :meth:`BNGroups.scores` - per group, max |gamma| over the coupled BNs of each root channel;
* :func:`threshold_counts` - how many channels of each group a threshold frees (the rule pruning uses);
* :meth:`BNGroups.free_macs` - the fraction of conv MACs removing them would save, from the exact conv-MACs
  model of the traced graph (:meth:`PruneGraph.conv_macs`), without pruning anything.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Iterable, Sequence

import torch
import torch_pruning as tp
from torch import nn

from ..modules import SPLIT_FORMS
from .graph import ChannelGroup, PruneGraph, build_graph, prepare

__all__ = ["BNMember", "BNGroup", "BNGroups", "threshold_counts", "bn_members"]


@dataclasses.dataclass
class BNMember:
    """Channels ``idx`` of the BatchNorm named ``bn`` belong to root channels ``root`` of their group."""

    bn: str
    idx: torch.Tensor  # long, positions in the BN
    root: torch.Tensor  # long, root channel of each position


@dataclasses.dataclass
class BNGroup:
    """One channel group: ``channels`` root channels, the BN channels coupled to them, its MACs footprint."""

    name: str
    channels: int
    members: list[BNMember]
    head: bool  # every BN of the group lies in the Detect head
    graph_group: ChannelGroup = dataclasses.field(repr=False)

    def bns_per_channel(self) -> torch.Tensor:
        """How many BN channels each root channel couples (float, >= 1 where any)."""
        n = torch.zeros(self.channels)
        for m in self.members:
            n.index_add_(0, m.root, torch.ones(len(m.root)))
        return n


def bn_members(graph: PruneGraph, group: ChannelGroup) -> list[tuple[nn.BatchNorm2d, torch.Tensor, torch.Tensor]]:
    """(BN module, BN channel positions, root channel of each) for every BN coupled in ``group`` (deduplicated)."""
    seen: dict[tuple[int, int], int] = {}
    out: dict[nn.BatchNorm2d, tuple[list[int], list[int]]] = {}
    for item in group.group:
        m, fn = item.dep.target.module, item.dep.handler
        if not (isinstance(m, nn.BatchNorm2d) and fn == tp.pruner.function.prune_batchnorm_out_channels):
            continue
        for i, r in zip(item.idxs, item.root_idxs):
            if r is None or (id(m), int(i)) in seen:
                continue
            seen[(id(m), int(i))] = int(r)
            idx, root = out.setdefault(m, ([], []))
            idx.append(int(i))
            root.append(int(r))
    return [(m, torch.tensor(i, dtype=torch.long), torch.tensor(r, dtype=torch.long)) for m, (i, r) in out.items()]


def _live_name(traced: nn.Module, live: nn.Module, name: str) -> tuple[str, int]:
    """Map a BN name of the prunable copy to (name, channel offset) in ``live``.

    :func:`~yolo_prune.modules.to_prunable` turns the first conv ``cv1`` of a C2f, C3k2, C2 or C2PSA into ``cv0``
    (first half) and ``cv1`` (second half); in a live model that still holds the plain block both halves are its
    ``cv1``.
    """
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] == "bn" and parts[-2] in ("cv0", "cv1"):
        block_name = ".".join(parts[:-2])
        block_t = traced.get_submodule(block_name)
        block_l = live.get_submodule(block_name)
        if isinstance(block_t, SPLIT_FORMS) and not isinstance(block_l, SPLIT_FORMS):
            offset = 0 if parts[-2] == "cv0" else block_t.cv0.conv.out_channels
            return f"{block_name}.cv1.bn", offset
    return name, 0


class BNGroups:
    """The BN view of a model's channel groups, keyed by BN name (see the module docstring).

    ``graph`` is the traced prunable model the groups come from (a copy, or the model itself when it is
    already in prunable form and about to be pruned); its conv shapes give the MACs estimate.
    """

    def __init__(self, graph: PruneGraph, groups: list[BNGroup]):
        self.graph = graph
        self.groups = groups
        self.reference_macs = graph.conv_macs()

    @classmethod
    def from_graph(cls, graph: PruneGraph, live: nn.Module | None = None) -> "BNGroups":
        """Groups of ``graph``, with BN names as in ``live`` (default: the traced model itself)."""
        traced = graph.model
        live = traced if live is None else live
        head = traced.model[-1]
        head_bns = {id(m) for m in head.modules() if isinstance(m, nn.BatchNorm2d)}
        names = {m: n for n, m in traced.named_modules()}
        groups = []
        for g in graph.groups():
            members, all_head = [], True
            for bn, idx, root in bn_members(graph, g):
                all_head &= id(bn) in head_bns
                name, offset = _live_name(traced, live, names[bn])
                members.append(BNMember(name, idx + offset, root))
            if members:
                groups.append(BNGroup(g.name, g.channels, members, all_head, g))
        return cls(graph, groups)

    @classmethod
    def build(cls, model: nn.Module, *, imgsz: int = 64) -> "BNGroups":
        """Trace a float CPU copy of ``model`` (any ultralytics DetectionModel, C2f or C2fSplit) once."""
        live = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
        traced = copy.deepcopy(live).float().cpu().eval()
        for p in traced.parameters():
            p.requires_grad_(True)  # torch-pruning traces through autograd
        prepare(traced)
        return cls.from_graph(build_graph(traced, imgsz=imgsz), live)

    # ------------------------------------------------------------------------------------------------ views
    def select(self, *, head: bool = True) -> list[BNGroup]:
        """The groups, without those lying entirely in the Detect head unless ``head``."""
        return [g for g in self.groups if head or not g.head]

    def bn_names(self, *, head: bool = True) -> list[str]:
        return sorted({m.bn for g in self.select(head=head) for m in g.members})

    @staticmethod
    def modules(model: nn.Module) -> dict[str, nn.Module]:
        live = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
        return dict(live.named_modules())

    @torch.no_grad()
    def scores(self, model: nn.Module, groups: Sequence[BNGroup] | None = None) -> list[torch.Tensor]:
        """Per group, max |gamma| over every BN coupled to each root channel (in ``model``, by name)."""
        mods = self.modules(model)
        out = []
        for g in self.groups if groups is None else groups:
            s = torch.zeros(g.channels)
            for m in g.members:
                w = mods[m.bn].weight.detach().abs().float().cpu()[m.idx]
                s.scatter_reduce_(0, m.root, w, reduce="amax")
            out.append(s)
        return out

    def macs_after(self, counts: Iterable[int], groups: Sequence[BNGroup] | None = None) -> float:
        """Conv MACs fraction left if ``counts[i]`` channels of each group were removed."""
        delta: dict[tuple[nn.Conv2d, bool], float] = {}
        for g, n in zip(self.groups if groups is None else groups, counts):
            if n:
                for conv, is_out, k in g.graph_group.convs:
                    delta[(conv, is_out)] = delta.get((conv, is_out), 0.0) + n * k
        return self.graph.conv_macs(delta) / self.reference_macs

    def free_macs(self, model: nn.Module, threshold: float, *, round_to: int | None = None) -> float:
        """Fraction of conv MACs that removing every channel whose coupled gammas are all < ``threshold`` saves."""
        counts = threshold_counts(self.scores(model), threshold, round_to=round_to)
        return 1.0 - self.macs_after(counts)


def threshold_counts(scores: Sequence[torch.Tensor], threshold: float, *, round_to: int | None = None) -> list[int]:
    """Channels to remove per group: those with score < ``threshold``, keeping at least one channel and, with
    ``round_to``, a kept width that is a multiple of it (fewer removed, never more)."""
    counts = []
    for s in scores:
        c = len(s)
        n = min(int((s < threshold).sum()), c - 1)
        if n > 0 and round_to and round_to > 1 and c > round_to:
            keep = min(c, int(math.ceil((c - n) / round_to) * round_to))
            n = c - keep
        counts.append(max(n, 0))
    return counts
