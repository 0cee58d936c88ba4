"""Portable pruning: the two halves of every split block lose the same number of channels.

Stock ultralytics C2f, C3k2 and C2 ``chunk`` their first conv's output in two equal halves, C2PSA ``split``\\ s it
by ``(c, c)``. In the prunable form those halves are two convs (``cv0``, ``cv1``) and two channel groups; a model
goes back to the stock classes (:func:`yolo_prune.modules.to_stock`) only if both keep the same width. A
portable graph (``build_graph(..., portable=True)``) offers the two halves only as a pair (see
:mod:`.graph`); here the pair becomes one :class:`TiedGroup` for the schedule and the allocations, so every plan
removes the same count from both:

- unit ``k`` of the tied group is the pair (``k``-th lowest-scored channel of the first half, ``k``-th lowest of
  the second), scored by the mean of the two scores; the units are in ascending score order, so removing ``n``
  units removes the ``n`` lowest-scored channels of each half. With one threshold on all scores (``global``), a
  pair goes when its mean is below the threshold: the best equal-count choice when every channel of both halves
  costs alike.
- its convs are both halves' (a unit removes one channel from each), so the MACs and latency costs count both.
- :func:`untie` turns plans over tied groups back into plans over the graph's groups, before anything is removed,
  re-fit or simulated.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from .graph import ChannelGroup, PruneGraph

Scored = list[tuple[ChannelGroup, torch.Tensor]]


@dataclasses.dataclass
class TiedGroup(ChannelGroup):
    """Two channel groups (the halves of a split block) that lose the same count; ``channels`` counts pairs.

    ``members`` holds each half's group with its channel order (lowest score first): unit ``k`` is channel
    ``order[k]`` of every member. ``root``/``handler``/``group`` are the first member's, for reading only: prune
    through :func:`untie`.
    """

    members: tuple[tuple[ChannelGroup, torch.Tensor], ...] = ()


def _tie(first: tuple[ChannelGroup, torch.Tensor], second: tuple[ChannelGroup, torch.Tensor]
         ) -> tuple[TiedGroup, torch.Tensor]:
    (ga, sa), (gb, sb) = first, second
    oa, ob = torch.argsort(sa, stable=True), torch.argsort(sb, stable=True)
    convs: dict[tuple[nn.Conv2d, bool], float] = {}
    for conv, is_out, k in ga.convs + gb.convs:
        convs[(conv, is_out)] = convs.get((conv, is_out), 0.0) + k
    tied = TiedGroup(name=f"{ga.name}+{gb.name}", root=ga.root, handler=ga.handler, channels=ga.channels,
                     group=ga.group, convs=[(conv, is_out, k) for (conv, is_out), k in convs.items()],
                     members=((ga, oa), (gb, ob)))
    return tied, (sa[oa] + sb[ob]) / 2


def tie(graph: PruneGraph, scored: Sequence[tuple[ChannelGroup, torch.Tensor]]) -> Scored:
    """``scored`` (group, channel scores) with the two halves of every split block as one :class:`TiedGroup`
    (at the first half's place), when ``graph`` is portable; a half whose partner was not scored is left out (it
    cannot lose channels alone). Unchanged otherwise."""
    scored = list(scored)
    if not graph.portable:
        return scored
    index = {conv: i for i, (g, _) in enumerate(scored) for conv, is_out, _ in g.convs if is_out}
    partner: dict[int, int] = {}
    alone: set[int] = set()
    for first, second in graph.pairs:
        i, j = index.get(first), index.get(second)
        if i is not None and j is not None and i != j:
            partner[i] = j
        elif (i is None) != (j is None):
            alone.add(i if i is not None else j)
    joined = set(partner.values())
    out: Scored = []
    for i, entry in enumerate(scored):
        if i in partner:
            out.append(_tie(entry, scored[partner[i]]))
        elif i not in joined and i not in alone:
            out.append(entry)
    return out


def untie(plans: Sequence[tuple[ChannelGroup, list[int]]]) -> list[tuple[ChannelGroup, list[int]]]:
    """Plans (group, channel indices) over the graph's own groups: a tied group's units become each member's
    channels (unit ``k`` -> ``order[k]`` of every member)."""
    out: list[tuple[ChannelGroup, list[int]]] = []
    for group, idxs in plans:
        if isinstance(group, TiedGroup):
            units = torch.as_tensor(list(idxs), dtype=torch.long)
            out += [(member, sorted(order[units].tolist())) for member, order in group.members]
        else:
            out.append((group, idxs))
    return out


def channel_count(group: ChannelGroup) -> int:
    """Channels of ``group`` in the model (a tied group: both halves')."""
    if isinstance(group, TiedGroup):
        return sum(member.channels for member, _ in group.members)
    return group.channels


def tie_counts(graph: PruneGraph, groups: Sequence[ChannelGroup], counts: Sequence[int]) -> list[int]:
    """Per-group removal ``counts`` with both halves of every split block at the smaller of their two counts (0
    for a half whose partner is not among ``groups``), when ``graph`` is portable."""
    counts = list(counts)
    if not graph.portable:
        return counts
    index = {conv: i for i, g in enumerate(groups) for conv, is_out, _ in g.convs if is_out}
    for first, second in graph.pairs:
        i, j = index.get(first), index.get(second)
        if i == j:
            continue
        if i is None or j is None:
            counts[i if i is not None else j] = 0
        else:
            counts[i] = counts[j] = min(counts[i], counts[j])
    return counts
