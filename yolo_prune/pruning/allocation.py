"""How the channels to remove are spread over the groups: the ``allocation`` option of the schedule.

- ``auto`` (default): ``sensitivity`` when there are calibration images (``data=``) or a ``sensitivity.csv``,
  ``global`` otherwise;
- ``global``: the original schedule (:func:`.schedule.plan`): one threshold on the channel scores across all groups
  (or the same fraction everywhere with ``global_pruning=False``).
- ``sensitivity``: per-group loss curves (each group pruned alone at 0.25 / 0.5 / 0.75, scored by
  :func:`.sensitivity.detection_distance` on calibration images, or read from a ``sensitivity.csv``) and the
  Lagrangian allocation :class:`.schedule.LossAllocation`: the least predicted loss at the MACs target.
- ``search`` (EagleEye-style): ``search_candidates`` random per-group ratio vectors, each brought to the target
  by the same solver, plus the ``global`` and ``sensitivity`` plans; every candidate is simulated on calibration
  images with BN statistics re-estimated (moment matching) and scored by the same proxy; the best one wins.

Each returns a ``plan_of(amount)`` with the contract of :func:`.schedule.plan`, so the solver
(:func:`.schedule.solve_for_macs`) and the cost model are the same for all.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import UsageError
from ..logs import Progress
from .graph import ChannelGroup, PruneGraph
from .schedule import DirectionAllocation, LossAllocation, LossCurve, PlanOptions, plan, solve_for_macs
from .sensitivity import PROBE_IMAGES, RATIOS, Calibration, GroupSensitivity, Probe, measure_sensitivity
from .recalibrate import bn_reference
from ..options import choices

LOGGER = logging.getLogger("yolo_prune")

ALLOCATIONS = choices("allocation")

Planner = Callable[[float], list[int]]


def check_allocation(allocation: str) -> str:
    if allocation not in ALLOCATIONS:
        raise UsageError(f"allocation={allocation!r} must be one of {', '.join(ALLOCATIONS)}")
    return allocation


def resolve_allocation(allocation: str, *, has_images: bool, has_sensitivity: bool, ratio_mode: bool) -> str:
    """``auto`` -> ``sensitivity`` when it can be measured or read (and a MACs target is set), else ``global``."""
    check_allocation(allocation)
    if allocation != "auto":
        return allocation
    return "sensitivity" if (has_images or has_sensitivity) and not ratio_mode else "global"


def saved_per_channel(scored: Sequence[tuple[ChannelGroup, torch.Tensor]],
                      macs_of: Callable[[list[int]], float]) -> list[float]:
    """Fraction of the reference cost one channel of each group saves, that group alone.

    Measured over a quarter of the group's channels and divided by their count: exact for MACs (linear in the
    channels removed), and a usable slope for a latency cost, which moves in width quanta (one channel alone
    often saves nothing measurable)."""
    base = macs_of([0] * len(scored))
    out = []
    for i, (g, _) in enumerate(scored):
        n = max(1, g.channels // 4)
        counts = [0] * len(scored)
        counts[i] = n
        out.append((base - macs_of(counts)) / n)
    return out


def read_sensitivity_csv(path: str | Path) -> dict[str, LossCurve]:
    """Curves by group name from a ``sensitivity.csv`` written by :func:`yolo_prune.sensitivity`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sensitivity file not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "group" not in rows[0]:
        raise UsageError(f"{path} is not a sensitivity.csv (no 'group' column)")
    ratios = sorted(float(k.split("@", 1)[1]) for k in rows[0] if k.startswith("loss@"))
    if not ratios:
        raise UsageError(f"{path} is not a sensitivity.csv (no loss@<ratio> columns)")
    return {r["group"]: LossCurve(tuple(ratios), tuple(float(r[f"loss@{x:g}"]) for x in ratios)) for r in rows}


def curves_from(measured: Sequence[GroupSensitivity]) -> dict[str, LossCurve]:
    return {s.name: LossCurve(tuple(s.ratios), tuple(s.losses)) for s in measured}


def curve_of(group: ChannelGroup, curves: dict[str, LossCurve]) -> LossCurve | None:
    """The curve of ``group`` by its name; for a tied group (portable pruning) without one, the sum of its
    halves' curves (both lose the same fraction), when both are known."""
    if group.name in curves:
        return curves[group.name]
    parts = [curves.get(member.name) for member, _ in getattr(group, "members", ())]
    if not parts or any(c is None for c in parts):
        return None
    ratios = parts[0].ratios
    return LossCurve(ratios, tuple(sum(c.at(r) for c in parts) for r in ratios))


def make_planner(
    allocation: str,
    *,
    graph: PruneGraph,
    scored: Sequence[tuple[ChannelGroup, torch.Tensor]],
    opts: PlanOptions,
    macs_of: Callable[[list[int]], float],
    target: float | None,
    tolerance: float,
    calib_images: torch.Tensor | Calibration | None,
    sensitivity: str | Path | dict[str, LossCurve] | None = None,
    search_candidates: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Planner, dict]:
    """The ``plan_of`` of ``allocation`` for the groups ``scored`` (group, channel scores); returns it with a
    small record of what was measured (for the report). ``graph.model`` is the model being pruned; ``calib_images``
    may come as a :class:`~.sensitivity.Calibration` with the Gram matrices the probes need, measured already."""
    model = graph.model
    grams = calib_images.grams if isinstance(calib_images, Calibration) else None
    calib_images = calib_images.images if isinstance(calib_images, Calibration) else calib_images
    scores = [s for _, s in scored]
    channels = [g.channels for g, _ in scored]

    def global_plan(amount: float) -> list[int]:
        return plan(scores, channels, amount, opts)

    if allocation == "global":
        return global_plan, {}
    if target is None:
        raise UsageError(f"allocation={allocation} needs target_macs (not ratio=)")
    if calib_images is None and (allocation == "search" or sensitivity is None):
        raise UsageError(f"allocation={allocation} measures the model on calibration images: pass data=")
    probe = None
    if calib_images is not None and (allocation == "search" or sensitivity is None):
        probe = Probe(model, graph, calib_images[:PROBE_IMAGES], grams=grams, seed=seed, progress=progress)
    saved = saved_per_channel(scored, macs_of)
    if isinstance(sensitivity, (str, Path)):
        curves = read_sensitivity_csv(sensitivity)
    elif isinstance(sensitivity, dict):
        curves = sensitivity
    else:
        measured = measure_sensitivity(probe, scored, macs_saved=saved, ratios=RATIOS, progress=progress)
        curves = curves_from(measured)
    found = [curve_of(g, curves) for g, _ in scored]
    missing = [g.name for (g, _), c in zip(scored, found) if c is None]
    if missing:
        raise UsageError(f"the sensitivity data has no curve for group(s) {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}: measure it on this model")
    by_loss = LossAllocation(found, channels, saved, opts)
    if allocation == "sensitivity":
        return by_loss, {"curves": {k: list(v.losses) for k, v in curves.items()}}

    # search: candidates at the target, scored with re-estimated BN statistics -----------------------------------

    ref = bn_reference(model, calib_images[:PROBE_IMAGES])
    gen = torch.Generator().manual_seed(seed)
    candidates: list[tuple[str, Planner]] = [("global", global_plan), ("sensitivity", by_loss)]
    for k in range(search_candidates):
        directions = (torch.rand(len(scored), generator=gen) * 0.95 + 0.05).tolist()
        candidates.append((f"random{k}", DirectionAllocation(directions, channels, opts)))
    results = []
    bar = Progress("allocation search", len(candidates), unit="candidates", enabled=progress)
    for name, planner in bar.iterate(candidates):
        counts, reached = solve_for_macs(macs_of, planner, target, tolerance=tolerance, max_amount=1.0)
        if reached > target + tolerance:
            continue
        plans = [(g, torch.argsort(s, stable=True)[:n].tolist()) for (g, s), n in zip(scored, counts) if n]
        loss = probe.loss(plans, bn_reference=ref)
        results.append((loss, name, planner))
        LOGGER.debug("allocation search: %s loss %.4f (MACs %.3f)", name, loss, reached)
    if not results:
        return global_plan, {}
    best = min(results, key=lambda r: r[0])
    (LOGGER.info if progress else LOGGER.debug)("allocation search: %s wins (loss %.4f; global %.4f)", best[1],
                                                best[0], next((r[0] for r in results if r[1] == "global"), float("nan")))
    return best[2], {"search": [{"candidate": n, "loss": loss} for loss, n, _ in results], "winner": best[1]}
