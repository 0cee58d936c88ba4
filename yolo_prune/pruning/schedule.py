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
    rounds = _rounds(opts, len(channels))
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


# Per-group allocations ----------------------------------------------------------------------------------------
# The two planners below keep the same contract as :func:`plan` (an amount in [0, 1] -> per-group counts,
# monotone in the amount) so that :func:`solve_for_macs` and any other cost model bisect them unchanged.


@dataclasses.dataclass(frozen=True)
class LossCurve:
    """Predicted loss of one group against the fraction of its channels removed, from measured points
    (``ratios`` ascending, ``losses``); 0 at ratio 0, linear in between, made non-decreasing, extended
    linearly past the last point."""

    ratios: tuple[float, ...]
    losses: tuple[float, ...]
    quadratic_start: bool = True  # below the first measured ratio: y1 * (r / r1)^2 instead of a straight line

    def at(self, ratio: float) -> float:
        xs = [0.0, *self.ratios]
        ys = [0.0]
        for v in self.losses:
            ys.append(max(ys[-1], float(v)))
        if ratio <= 0:
            return 0.0
        if self.quadratic_start and ratio <= xs[1]:
            return ys[1] * (ratio / xs[1]) ** 2
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if ratio <= x1:
                return y0 + (y1 - y0) * (ratio - x0) / max(x1 - x0, 1e-12)
        slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-12)
        return ys[-1] + slope * (ratio - xs[-1])


def _rounds(opts: PlanOptions, n_groups: int) -> tuple[int | None, ...]:
    """The ``round_to`` of every group (one value for all, or the per-group tuple of ``round_to=auto``)."""
    return opts.round_to if isinstance(opts.round_to, tuple) else (opts.round_to,) * n_groups


def _candidates(channels: int, opts: PlanOptions, r: int | None) -> list[int]:
    """Every count a group may lose under the layer limit and rounding to ``r``, ascending."""
    return sorted({_limit(channels, n, opts, r) for n in range(channels + 1)})


class LossAllocation:
    """``plan_of`` for ``allocation=sensitivity``: the least predicted loss for the MACs removed.

    Each group's candidate counts give points (MACs saved, predicted loss); the lower convex hull of each
    group's points is cut into segments, all segments of all groups are taken in increasing order of loss per
    MACs saved (the Lagrangian solution for every budget at once), and each segment is walked one candidate
    count at a time, so that the plan moves by one ``round_to`` step of one group, never a whole group at once.
    ``amount`` in [0, 1] is the fraction of that sequence taken: a larger amount never removes fewer channels.
    """

    def __init__(self, curves: Sequence[LossCurve], channels: Sequence[int], saved: Sequence[float],
                 opts: PlanOptions):
        self.n_groups = len(channels)
        segments: list[tuple[float, int, int, list[int]]] = []  # (slope, group, order in group, counts)
        for g, (curve, c, s, r) in enumerate(zip(curves, channels, saved, _rounds(opts, len(channels)))):
            s = max(float(s), 0.0)
            ns = _candidates(c, opts, r)
            if s <= 0 or len(ns) < 2:
                continue
            pts = [(n * s, curve.at(n / c), n) for n in ns]
            hull = [pts[0]]
            for p in pts[1:]:  # lower convex hull (x increasing)
                while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
                    hull.pop()
                hull.append(p)
            for k, (a, b) in enumerate(zip(hull, hull[1:])):
                slope = (b[1] - a[1]) / max(b[0] - a[0], 1e-18)
                steps = [n for n in ns if a[2] < n <= b[2]]
                segments.append((slope, g, k, steps))
        segments.sort(key=lambda t: (t[0], t[1], t[2]))
        self.sequence = [(g, n) for _, g, _, steps in segments for n in steps]

    def __call__(self, amount: float) -> list[int]:
        counts = [0] * self.n_groups
        k = len(self.sequence) if amount >= 1 else int(round(max(amount, 0.0) * len(self.sequence)))
        for g, n in self.sequence[:k]:
            counts[g] = n
        return counts


def _cross(o: tuple, a: tuple, b: tuple) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


class DirectionAllocation:
    """``plan_of`` for one random candidate of ``allocation=search``: group g loses the fraction
    ``min(1, direction_g * amount / (1 - amount))`` of its channels (then the layer limit and rounding)."""

    def __init__(self, directions: Sequence[float], channels: Sequence[int], opts: PlanOptions):
        self.directions, self.channels, self.opts = list(directions), list(channels), opts

    def __call__(self, amount: float) -> list[int]:
        if amount <= 0:
            return [0] * len(self.channels)
        scale = math.inf if amount >= 1 else amount / (1 - amount)
        rounds = _rounds(self.opts, len(self.channels))
        return [_limit(c, int(min(1.0, u * scale) * c), self.opts, r)
                for u, c, r in zip(self.directions, self.channels, rounds)]
