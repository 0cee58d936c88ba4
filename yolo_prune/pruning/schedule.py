"""The schedule: how many channels each group loses, from a ratio or a cost target (MACs or latency).

Given one score vector per channel group, :func:`plan` turns a pruning *amount* (fraction of all
prunable channels to remove) into a per-group count, ranking globally (one threshold across layers) or
per layer, never removing more than ``max_layer_ratio`` of a group and keeping widths multiples of
``round_to`` (one multiple for all groups, or one per group: ``round_to=auto`` takes each group's from the
latency model). :func:`solve_for_macs` finds the amount whose plan keeps a target fraction of a cost by
bisection: an exact MACs model of the traced graph, or a measured latency model
(:class:`yolo_prune.latency.LatencyCost`), so one pruning pass lands on the target.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    global_pruning: bool = True
    max_layer_ratio: float = 0.75
    round_to: int | None | tuple[int | None, ...] = 8  # a tuple: one multiple per group


def _limit(channels: int, n: int, opts: PlanOptions, r: int | None) -> int:
    """Clip a removal count to the layer limit and round the kept width up to a multiple of ``r``."""
    n = min(n, int(channels * opts.max_layer_ratio), channels - 1)
    if n <= 0:
        return 0
    keep = channels - n
    if r and r > 1 and channels > r:
        keep = min(channels, int(math.ceil(keep / r) * r))
    return channels - keep


def plan(scores: Sequence[torch.Tensor], channels: Sequence[int], amount: float, opts: PlanOptions) -> list[int]:
    """Channels to remove from each group for a pruning ``amount`` in [0, 1)."""
    if amount <= 0:
        return [0] * len(channels)
    rounds = opts.round_to if isinstance(opts.round_to, tuple) else (opts.round_to,) * len(channels)
    if not opts.global_pruning:
        return [_limit(c, int(amount * c), opts, r) for c, r in zip(channels, rounds)]
    flat = torch.cat([s.float().flatten() for s in scores])
    owner = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(scores)])
    n_total = int(round(amount * len(flat)))
    order = torch.argsort(flat, stable=True)[:n_total]
    counts = torch.bincount(owner[order], minlength=len(channels)).tolist()
    return [_limit(c, n, opts, r) for c, n, r in zip(channels, counts, rounds)]


def solve_for_macs(
    macs_of: Callable[[list[int]], float],
    plan_of: Callable[[float], list[int]],
    target: float,
    *,
    tolerance: float,
    max_amount: float,
    iters: int = 30,
) -> tuple[list[int], float]:
    """Find the plan whose cost (a fraction of the reference: MACs, or predicted latency) is closest to ``target``.

    ``macs_of(counts)`` is any cost that falls with the amount (MACs exactly, a latency model nearly), so
    bisection brackets the target between the largest amount above it and the smallest below it; of the two,
    the one below wins when it is within ``tolerance``, else the closer one. Returns (counts, reached fraction).
    """
    lo, hi = 0.0, max_amount
    lo_plan = plan_of(lo)
    lo_frac = macs_of(lo_plan)
    hi_plan = plan_of(hi)
    hi_frac = macs_of(hi_plan)
    if lo_frac <= target:
        return lo_plan, lo_frac
    if hi_frac > target:
        return hi_plan, hi_frac  # the caller decides whether that is close enough
    for _ in range(iters):
        mid = (lo + hi) / 2
        p = plan_of(mid)
        f = macs_of(p)
        if f > target:
            lo, lo_plan, lo_frac = mid, p, f
        else:
            hi, hi_plan, hi_frac = mid, p, f
        if hi - lo < 1e-5:
            break
    if target - hi_frac <= tolerance or (target - hi_frac) <= (lo_frac - target):
        return hi_plan, hi_frac
    return lo_plan, lo_frac
