"""The pruning pass: trace, rank, plan and remove channels from a DetectionModel in place.

This module only glues the three concerns together: the graph (:mod:`.graph`), the criterion
(:mod:`.importance`) and the schedule (:mod:`.schedule`). It works on an ``nn.Module`` and writes no
files; :func:`yolo_prune.pruning.prune` is the user-facing operation around it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import PruningError, UsageError
from .compensate import compensate as compensate_means
from .compensate import input_means
from .reconstruct import reconstruct
from .recalibrate import RECALIBRATE_MODES, bn_reference, recalibrate_bn
from .sequential import reconstruct_sequential
from .graph import KeptChannels, PruneGraph, build_graph, prepare
from .importance import METHODS, make_importance, resolve_method
from .allocation import make_planner, resolve_allocation
from .schedule import PlanOptions, solve_for_macs

if TYPE_CHECKING:
    from ..latency import LatencyCost

LOGGER = logging.getLogger("yolo_prune")


@dataclasses.dataclass
class StepRecord:
    """What one pruning increment did."""

    step: int
    target_macs: float | None  # fraction of the reference MACs asked for (None in ratio mode)
    macs_fraction: float  # conv MACs after the step / reference conv MACs
    channels_removed: int
    target_latency: float | None = None  # fraction of the dense latency asked for (latency targets)
    latency_fraction: float | None = None  # predicted latency after the step / dense latency


@dataclasses.dataclass
class Reference:
    """The model before any pruning: targets of every step are fractions of these."""

    conv_macs: float
    channels: int


@dataclasses.dataclass
class PruneOutcome:
    steps: list[StepRecord]
    layers_before: dict[str, int]
    layers_after: dict[str, int]
    reference: Reference
    allocation: str = "global"  # the allocation used (``auto`` resolved)
    method: str = "bn"  # the ranking used (``auto`` resolved)
    kept: KeptChannels | None = None  # original indices of the channels every conv and BN keeps


def layer_widths(model: nn.Module, graph: PruneGraph) -> dict[str, int]:
    """Output channels of every prunable conv (the protected Detect outputs excluded), by module name."""
    ignored = {id(m) for layer in graph.ignored for m in layer.modules()}
    return {
        name: m.out_channels
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and id(m) not in ignored
    }


COMPENSATIONS = ("lstsq_seq", "lstsq", "mean", "none")


def _compensation(value: str | bool | None) -> str:
    """Normalise ``compensate``: True -> lstsq, False/None -> none."""
    if value is True:
        return "lstsq"
    if value in (False, None):
        return "none"
    if value not in COMPENSATIONS:
        raise UsageError(f"compensate={value!r} must be one of {', '.join(COMPENSATIONS)}")
    return value


def _recalibration(value: bool | str | None) -> str | None:
    """Normalise ``recalibrate``: True -> match (moment matching to the dense model), False/None -> off."""
    if value is True:
        return "match"
    if value in (False, None, "none"):
        return None
    if value not in RECALIBRATE_MODES:
        raise UsageError(f"recalibrate={value!r} must be True, False or one of {', '.join(RECALIBRATE_MODES)}")
    return value


def _check_options(method, target_macs, ratio, max_layer_ratio, round_to, steps) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if ratio is not None and not 0 <= ratio < 1:
        raise UsageError(f"ratio={ratio} is out of range: it must be in [0, 1)")
    if ratio is None and (target_macs is None or not 0 < target_macs <= 1):
        raise UsageError(f"target_macs={target_macs} is out of range: it must be in (0, 1]")
    if not 0 < max_layer_ratio < 1:
        raise UsageError(f"max_layer_ratio={max_layer_ratio} is out of range: it must be in (0, 1)")
    if round_to is not None and round_to != "auto" and (not isinstance(round_to, int) or round_to < 1):
        raise UsageError(f"round_to={round_to} must be a positive integer, auto or null")
    if not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps={steps} must be a positive integer")


def prune_model(
    model: nn.Module,
    *,
    method: str = "bn",
    target_macs: float | None = 0.5,
    ratio: float | None = None,
    global_pruning: bool = True,
    max_layer_ratio: float = 0.75,
    round_to: int | None = 8,
    steps: int = 1,
    tolerance: float = 0.03,
    seed: int = 0,
    calib_images: torch.Tensor | None = None,
    compensate: str | bool = "lstsq",
    recalibrate: bool | str = False,
    allocation: str = "global",
    sensitivity: str | Path | dict | None = None,
    search_candidates: int = 16,
    reference: Reference | None = None,
    trace_imgsz: int = 64,
    macs_imgsz: int = 640,
    progress: bool = False,
    on_step: Callable[[StepRecord], None] | None = None,
    before_recalibration: Callable[[nn.Module], None] | None = None,
    latency: LatencyCost | None = None,
) -> PruneOutcome:
    """Remove channels of ``model`` (a DetectionModel) in place.

    Either ``ratio`` (fraction of prunable channels to remove) or ``target_macs`` (fraction of the
    reference MACs to keep) sets the goal, reached in ``steps`` equal increments. ``reference``
    (default: the model as passed) lets a caller prune an already pruned model toward a goal stated
    against the original, as the iterative pipeline does. With ``calib_images``, the layers that consume
    removed channels make up for them: ``compensate="lstsq"`` refits their kept weights and bias by least
    squares (:mod:`.reconstruct`), ``"mean"`` folds the removed channels' mean into the bias only
    (:mod:`.compensate`), ``"lstsq_seq"`` prunes first and then refits every conv layer by layer toward the
    dense model's outputs (:mod:`.sequential`), ``"none"`` does nothing. MACs fractions are counted at ``macs_imgsz`` (they depend on the input
    size when the model has attention blocks). ``recalibrate`` then re-estimates the BN
    statistics on the same images (:mod:`.recalibrate`; True = ``"match"``), before ``lstsq_seq`` (which fits each
    conv to the dense BN outputs, so it keeps what the re-estimation got right); ``before_recalibration(model)``
    is called right before the last step's re-estimation when there is no ``lstsq_seq`` (the prune report
    measures the model there too).
    ``allocation`` chooses how the removal is spread over the groups (:mod:`.allocation`: ``global`` threshold,
    ``sensitivity`` curves, measured or read from ``sensitivity`` (a sensitivity.csv), or ``search``).

    ``latency`` (a :class:`yolo_prune.latency.LatencyCost`) plugs a measured latency model into the same
    schedule: with ``latency.target`` the solver (and the allocation) reaches that fraction of the dense latency
    instead of ``target_macs``, and with ``latency.aware`` channels are ranked by importance per millisecond they
    cost; ``round_to="auto"`` keeps every group at a multiple of its width quantum on that runtime.
    """
    compensate = _compensation(compensate)
    by_latency = latency is not None and latency.target is not None and ratio is None
    _check_options(method, latency.target if by_latency else target_macs, ratio, max_layer_ratio, round_to, steps)
    if round_to == "auto" and latency is None:
        raise UsageError("round_to=auto takes each layer's width multiple from a latency model: pass a latency table")
    method = resolve_method(method, calib_images is not None)
    allocation = resolve_allocation(allocation, has_images=calib_images is not None,
                                    has_sensitivity=sensitivity is not None, ratio_mode=ratio is not None)
    if allocation != "global" and ratio is not None:
        raise UsageError(f"allocation={allocation} works toward target_macs; it cannot be combined with ratio=")
    prepare(model)
    graph = build_graph(model, imgsz=trace_imgsz, macs_imgsz=macs_imgsz)
    importance = make_importance(method, seed=seed, calib_images=calib_images)
    opts = PlanOptions(global_pruning=global_pruning, max_layer_ratio=max_layer_ratio, round_to=round_to)
    before = layer_widths(model, graph)
    if reference is None:
        reference = Reference(conv_macs=graph.conv_macs(), channels=sum(g.channels for g in graph.groups()))

    kept = graph.start_tracking()
    dense = bn_ref = None
    if calib_images is not None and compensate == "lstsq_seq":
        dense = copy.deepcopy(model).eval()
    recal_mode = _recalibration(recalibrate)
    if calib_images is not None and recal_mode == "match":
        bn_ref = bn_reference(model, calib_images)
    records: list[StepRecord] = []
    bar = tqdm(range(1, steps + 1), desc="pruning", disable=not progress, unit="step")
    for step in bar:
        groups = graph.groups()
        if hasattr(importance, "calibrate"):
            importance.calibrate(model)
        scored = []
        for g in groups:
            s = importance(g.group)
            if s is not None:
                scored.append((g, s.detach().float().cpu()))
        scores = [s for _, s in scored]
        channels = [g.channels for g, _ in scored]
        step_opts = opts
        if latency is not None:
            if round_to == "auto":
                step_opts = dataclasses.replace(opts, round_to=tuple(latency.quantum(graph, g) for g, _ in scored))
            if by_latency and latency.aware > 0:  # importance per millisecond (to a power) a channel costs
                weights = latency.rank_weights(graph, [g for g, _ in scored])
                scores = [s / w for s, w in zip(scores, weights)]

        def delta_of(counts: list[int]) -> dict[tuple[nn.Conv2d, bool], float]:
            delta: dict[tuple[nn.Conv2d, bool], float] = {}
            for (g, _), n in zip(scored, counts):
                if n:
                    for conv, is_out, k in g.convs:
                        delta[(conv, is_out)] = delta.get((conv, is_out), 0.0) + n * k
            return delta

        def macs_of(counts: list[int]) -> float:
            return graph.conv_macs(delta_of(counts)) / reference.conv_macs

        def cost_of(counts: list[int]) -> float:
            return latency.fraction(graph, delta_of(counts)) if by_latency else macs_of(counts)

        current = sum(channels)
        final_goal = latency.target if by_latency else target_macs
        goal = None if ratio is not None else 1 - (1 - final_goal) * step / steps
        # the allocation plans with the (latency-weighted) scores and reaches the goal in the target's own cost
        plan_scored = [(g, s) for (g, _), s in zip(scored, scores)]
        plan_of, _ = make_planner(allocation, model=model, graph=graph, scored=plan_scored, opts=step_opts,
                                  macs_of=cost_of,
                                  target=goal, tolerance=tolerance, calib_images=calib_images,
                                  sensitivity=sensitivity if step == 1 else None,
                                  search_candidates=search_candidates, seed=seed, progress=progress)
        if ratio is not None:
            goal_removed = ratio * step / steps * reference.channels
            already = reference.channels - current
            amount = max(0.0, (goal_removed - already) / max(current, 1))
            counts, target = plan_of(amount), None
            reached = macs_of(counts)
        else:
            target = goal
            counts, reached = solve_for_macs(cost_of, plan_of, target, tolerance=tolerance, max_amount=1.0)
            if reached > target + tolerance:
                if by_latency:
                    raise PruningError(latency.unreachable(reached, max_layer_ratio=max_layer_ratio,
                                                           round_to=round_to))
                raise PruningError(
                    f"target_macs={target:.3f} is out of reach: with max_layer_ratio={max_layer_ratio} and "
                    f"round_to={round_to} the model keeps at least {reached:.3f} of its MACs"
                )
        plans = [(g, torch.argsort(s, stable=True)[:n].tolist()) for (g, s), n in zip(scored, counts) if n]
        if calib_images is not None and plans:
            if compensate == "lstsq":
                reconstruct(graph, plans, calib_images, seed=seed)
            elif compensate == "mean":
                compensate_means(graph, plans, input_means(model, calib_images))
        for g, idxs in plans:
            graph.prune(g, idxs, kept)
        if calib_images is not None and plans:
            if recal_mode is not None:
                if before_recalibration is not None and step == steps and dense is None:
                    before_recalibration(model)  # (with lstsq_seq the statistics are refit afterwards anyway)
                recalibrate_bn(model, calib_images, reference=bn_ref, kept=kept.out, mode=recal_mode)
            if dense is not None:  # after the BN statistics: each conv is fit to the dense BN outputs
                reconstruct_sequential(model, dense, kept, calib_images, seed=seed, progress=progress)
        record = StepRecord(step=step, target_macs=None if by_latency else target,
                            macs_fraction=graph.conv_macs() / reference.conv_macs,
                            channels_removed=int(sum(counts)), target_latency=target if by_latency else None,
                            latency_fraction=latency.fraction(graph, {}) if latency is not None else None)
        records.append(record)
        bar.set_postfix(macs=f"{record.macs_fraction:.3f}")
        LOGGER.info("pruning step %d/%d: %d channels removed, MACs %.3f of the original",
                    step, steps, record.channels_removed, record.macs_fraction)
        if on_step:
            on_step(record)
    return PruneOutcome(steps=records, layers_before=before, layers_after=layer_widths(model, graph), reference=reference,
                        allocation=allocation, method=method, kept=kept)
