"""The pruning pass: trace, rank, plan and remove channels from a DetectionModel in place.

This module only glues the concerns together: the graph (:mod:`.graph`), the criterion (:mod:`.importance`),
the schedule (:mod:`.schedule`, :mod:`.allocation`) over a cost (:mod:`.cost`: MACs, or any object of the same
protocol such as :class:`yolo_prune.latency.LatencyCost`) and the recovery steps around every removal
(:mod:`.recovery`). It works on an ``nn.Module`` and writes no files; :func:`yolo_prune.pruning.prune` is the
user-facing operation around it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import PruningError, UsageError
from ..logs import Progress, Timings
from .allocation import make_planner, resolve_allocation
from .cost import Cost, MacsCost
from .graph import CONVS, ChannelGroup, KeptChannels, PruneGraph, build_graph, prepare
from .importance import METHODS, make_importance, resolve_method
from .recovery import Recovery, RecoveryContext, normalize_compensation, normalize_recalibration
from .portable import channel_count, tie, untie
from .sensitivity import Calibration
from .schedule import PlanOptions, solve_for_macs

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
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # wall seconds per sub-step (see prune_model)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The knobs of :func:`prune_model` (see its docstring); every field is also a keyword of it."""

    method: str = "bn"
    target_macs: float | None = 0.5
    ratio: float | None = None
    global_pruning: bool = True
    max_layer_ratio: float = 0.75
    round_to: int | str | None = 8
    steps: int = 1
    tolerance: float = 0.03
    seed: int = 0
    compensate: str | bool | None = "lstsq"
    recalibrate: bool | str | None = False
    allocation: str = "global"
    sensitivity: str | Path | dict | None = None
    search_candidates: int = 16
    trace_imgsz: int = 64
    macs_imgsz: int = 640
    portable: bool = False

    def check(self) -> None:
        """Raise :class:`UsageError` for any value out of range (``target_macs`` only when it is the goal)."""
        normalize_compensation(self.compensate)
        normalize_recalibration(self.recalibrate)
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise UsageError(f"ratio={self.ratio} is out of range: it must be in [0, 1)")
        if self.ratio is None and (self.target_macs is None or not 0 < self.target_macs <= 1):
            raise UsageError(f"target_macs={self.target_macs} is out of range: it must be in (0, 1]")
        if not 0 < self.max_layer_ratio < 1:
            raise UsageError(f"max_layer_ratio={self.max_layer_ratio} is out of range: it must be in (0, 1)")
        r = self.round_to
        if r is not None and r != "auto" and (not isinstance(r, int) or r < 1):
            raise UsageError(f"round_to={r} must be a positive integer, auto or null")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UsageError(f"steps={self.steps} must be a positive integer")


_FIELDS = {f.name for f in dataclasses.fields(EngineOptions)}


def layer_widths(model: nn.Module, graph: PruneGraph) -> dict[str, int]:
    """Output channels of every prunable conv (Proto's transposed conv too; the protected head outputs excluded), by
    module name."""
    ignored = {id(m) for layer in graph.ignored for m in layer.modules()}
    return {
        name: m.out_channels
        for name, m in model.named_modules()
        if isinstance(m, CONVS) and id(m) not in ignored
    }


def _engine_options(options: EngineOptions | None, overrides: dict[str, Any]) -> EngineOptions:
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise TypeError(f"prune_model() got an unexpected keyword argument {unknown[0]!r}")
    return dataclasses.replace(options or EngineOptions(), **overrides)


def _costs(cost: Cost | None, latency: Cost | None, opts: EngineOptions) -> tuple[Cost, Cost | None]:
    """(goal, cost): the cost whose target the schedule reaches, and the cost given (None: MACs only).

    The given cost is the goal when it has a target and no ``ratio`` is set; otherwise ``target_macs`` is reached
    in MACs and the given cost only supplies width quanta (``round_to=auto``) and its step record fields.
    """
    if cost is not None and latency is not None:
        raise UsageError("give cost= or latency= (its old name), not both")
    cost = cost if cost is not None else latency
    if cost is not None and cost.target is not None and opts.ratio is None:
        return cost, cost
    return MacsCost(opts.target_macs), cost


class _Pass:
    """One pruning pass over a prepared model and its graph: what its increments share."""

    def __init__(self, model: nn.Module, graph: PruneGraph, opts: EngineOptions, *, goal: Cost, cost: Cost | None,
                 reference: Reference, calib_images: torch.Tensor | None, progress: bool,
                 before_recalibration: Callable[[nn.Module], None] | None):
        """``opts`` with ``method`` and ``allocation`` resolved; ``goal`` bound to ``reference``."""
        self.model, self.graph, self.opts, self.goal, self.cost = model, graph, opts, goal, cost
        self.reference, self.calib_images, self.progress = reference, calib_images, progress
        self.plan_opts = PlanOptions(global_pruning=opts.global_pruning, max_layer_ratio=opts.max_layer_ratio,
                                     round_to=opts.round_to)
        self.timings = Timings()
        self.importance = make_importance(opts.method, seed=opts.seed, calib_images=calib_images, progress=progress)
        self.kept = graph.start_tracking()
        ctx = None if calib_images is None else RecoveryContext(
            model, graph, calib_images, self.kept, seed=opts.seed, progress=progress, steps=opts.steps,
            before_recalibration=before_recalibration)
        self.recovery = Recovery.of(opts.compensate, opts.recalibrate, ctx)
        self.recovery.setup()  # (references of the dense model)

    def scored(self) -> list[tuple[ChannelGroup, torch.Tensor]]:
        """Every group the criterion scores, with one score per channel."""
        if hasattr(self.importance, "calibrate"):
            self.importance.calibrate(self.model)
        scored = []
        groups = self.graph.groups()
        for g in Progress(f"{self.opts.method} ranking", len(groups), unit="groups",
                          enabled=self.progress).iterate(groups):
            s = self.importance(g.group)
            if s is not None:
                scored.append((g, s.detach().float().cpu()))
        return tie(self.graph, scored)  # portable: the halves of every split block as one tied group

    def step_plan_options(self, scored: Sequence[tuple[ChannelGroup, torch.Tensor]]) -> PlanOptions:
        """The plan options of this increment: with ``round_to=auto``, each group's quantum from the cost."""
        if self.opts.round_to != "auto":
            return self.plan_opts
        quanta = tuple(self.cost.quantum(self.graph, g) for g, _ in scored)
        return dataclasses.replace(self.plan_opts, round_to=quanta)

    def ranking(self, scored: Sequence[tuple[ChannelGroup, torch.Tensor]]) -> list[torch.Tensor]:
        """The scores the allocation plans with: tilted by the goal's per-group weights when it has them."""
        scores = [s for _, s in scored]
        weights = self.goal.rank_weights(self.graph, [g for g, _ in scored])
        if weights is not None:  # e.g. importance per millisecond (to a power) a channel costs
            scores = [s / w for s, w in zip(scores, weights)]
        return scores

    def counts(self, step: int, scored: Sequence[tuple[ChannelGroup, torch.Tensor]]) -> tuple[list[int], float | None]:
        """Channels to remove from each scored group at increment ``step``, and the goal it aimed at (None: ratio)."""
        opts, graph = self.opts, self.graph

        def cost_of(counts: list[int]) -> float:
            delta: dict[tuple[nn.Conv2d, bool], float] = {}
            for (g, _), n in zip(scored, counts):
                if n:
                    for conv, is_out, k in g.convs:
                        delta[(conv, is_out)] = delta.get((conv, is_out), 0.0) + n * k
            return self.goal.fraction(graph, delta)

        goal = None if opts.ratio is not None else 1 - (1 - self.goal.target) * step / opts.steps
        # the allocation plans with the (cost-weighted) scores and reaches the goal in the goal's own cost
        plan_scored = [(g, s) for (g, _), s in zip(scored, self.ranking(scored))]
        # recon ranking measured the Gram matrices of this model on the probes' images: the probes reuse them
        calib = None if self.calib_images is None else Calibration(self.calib_images,
                                                                  getattr(self.importance, "grams", None))
        # the allocation's measurements (sensitivity probes, search candidates) apart from the plan's solve
        with self.timings("planning" if opts.allocation == "global" else opts.allocation):
            plan_of, _ = make_planner(opts.allocation, graph=graph, scored=plan_scored,
                                      opts=self.step_plan_options(scored), macs_of=cost_of, target=goal,
                                      tolerance=opts.tolerance, calib_images=calib,
                                      sensitivity=opts.sensitivity if step == 1 else None,
                                      search_candidates=opts.search_candidates, seed=opts.seed, progress=self.progress)
        if opts.ratio is not None:
            current = sum(channel_count(g) for g, _ in scored)
            goal_removed = opts.ratio * step / opts.steps * self.reference.channels
            # removed so far: groups the criterion cannot score (e.g. bn on Proto's transposed conv) were not removed
            already = self.reference.channels - sum(g.channels for g in graph.groups())
            with self.timings("planning"):
                return plan_of(max(0.0, (goal_removed - already) / max(current, 1))), None
        with self.timings("planning"):
            counts, reached = solve_for_macs(cost_of, plan_of, goal, tolerance=opts.tolerance, max_amount=1.0)
        if reached > goal + opts.tolerance:
            raise PruningError(self.goal.unreachable(reached, target=goal, max_layer_ratio=opts.max_layer_ratio,
                                                     round_to=opts.round_to))
        return counts, goal

    def increment(self, step: int) -> StepRecord:
        """Rank, plan and remove one increment's channels (with the recovery steps around the removal)."""
        with self.timings("ranking"):
            scored = self.scored()
        counts, target = self.counts(step, scored)
        plans = untie([(g, torch.argsort(s, stable=True)[:n].tolist()) for (g, s), n in zip(scored, counts) if n])
        self.recovery.before(step, plans)
        with self.timings("removal"):
            for g, idxs in plans:
                self.graph.prune(g, idxs, self.kept)
        self.recovery.after(step, plans)
        return self.record(step, sum(len(idxs) for _, idxs in plans), target)

    def record(self, step: int, removed: int, target: float | None) -> StepRecord:
        fields: dict[str, Any] = {"target_macs": None}
        if self.cost is not None and self.cost is not self.goal:  # e.g. the predicted latency with a MACs goal
            fields.update(self.cost.record_fields(self.graph, None))
        fields.update(self.goal.record_fields(self.graph, target))
        return StepRecord(step=step, macs_fraction=self.graph.conv_macs() / self.reference.conv_macs,
                          channels_removed=int(removed), **fields)

    def run(self, on_step: Callable[[StepRecord], None] | None) -> list[StepRecord]:
        records = []
        steps = self.opts.steps
        for step in range(1, steps + 1):
            record = self.increment(step)
            records.append(record)
            if self.progress:
                LOGGER.info("pruning step %d/%d: %d channels removed, MACs %.3f of the original",
                            step, steps, record.channels_removed, record.macs_fraction)
            if on_step:
                on_step(record)
        return records


def prune_model(
    model: nn.Module,
    *,
    options: EngineOptions | None = None,
    cost: Cost | None = None,
    calib_images: torch.Tensor | None = None,
    reference: Reference | None = None,
    progress: bool = False,
    on_step: Callable[[StepRecord], None] | None = None,
    before_recalibration: Callable[[nn.Module], None] | None = None,
    latency: Cost | None = None,
    **overrides: Any,
) -> PruneOutcome:
    """Remove channels of ``model`` (a DetectionModel) in place.

    The knobs come from ``options`` (an :class:`EngineOptions`), each overridable by its keyword
    (``prune_model(model, method="l1", target_macs=0.5)``). Either ``ratio`` (fraction of prunable channels to
    remove) or ``target_macs`` (fraction of the reference MACs to keep) sets the goal, reached in ``steps``
    equal increments. ``reference`` (default: the model as passed) lets a caller prune an already pruned model
    toward a goal stated against the original, as the iterative pipeline does. With ``calib_images``, the layers
    that consume removed channels make up for them: ``compensate="lstsq"`` refits their kept weights and bias by
    least squares, ``"mean"`` folds the removed channels' mean into the bias only, ``"lstsq_seq"`` prunes first
    and then refits every conv layer by layer toward the dense model's outputs, ``"none"`` does nothing
    (:mod:`.recovery`). MACs fractions are counted at ``macs_imgsz`` (they depend on the input size when the
    model has attention blocks). ``recalibrate`` then re-estimates the BN statistics on the same images
    (:mod:`.recalibrate`; True = ``"match"``), before ``lstsq_seq`` (which fits each conv to the dense BN
    outputs, so it keeps what the re-estimation got right); ``before_recalibration(model)`` is called right
    before the last step's re-estimation when there is no ``lstsq_seq`` (the prune report measures the model
    there too). ``allocation`` chooses how the removal is spread over the groups (:mod:`.allocation`:
    ``global`` threshold, ``sensitivity`` curves, measured or read from ``sensitivity`` (a sensitivity.csv), or
    ``search``).

    ``cost`` (a :class:`~yolo_prune.pruning.cost.Cost`, e.g. :class:`yolo_prune.latency.LatencyCost`; ``latency``
    is its old name) plugs another cost model into the same schedule: with ``cost.target`` the solver (and the
    allocation) reaches that fraction of the cost instead of ``target_macs``, dividing the channel scores by the
    cost's ``rank_weights`` when it gives any (``LatencyCost(aware=...)``: per millisecond a channel costs);
    ``round_to="auto"`` keeps every group at a multiple of the width quantum the cost gives it.

    ``progress`` logs a line per increment and the progress of every long sub-step on the ``yolo_prune`` logger
    (:class:`~yolo_prune.logs.Progress`). The outcome's ``timings`` are the wall seconds of each sub-step that ran:
    ``trace``, ``ranking``, the allocation's measurements (``sensitivity``, ``search``), ``planning``, ``removal``,
    ``compensation`` and ``recalibration`` (their reference measurements on the dense model included).

    ``portable=True`` removes only what stock ultralytics classes can compute without (:mod:`.portable`: both
    halves of every split block lose the same channel count, attention keeps its input width), so that
    :func:`yolo_prune.modules.to_stock` can convert the pruned model back; the model stays in prunable form here.
    """
    opts = _engine_options(options, overrides)
    goal, cost = _costs(cost, latency, opts)
    dataclasses.replace(opts, target_macs=goal.target).check()  # (the goal's target, a latency one too)
    if opts.round_to == "auto" and (cost is None or not cost.has_quanta):
        raise UsageError("round_to=auto takes each layer's width multiple from a latency model: pass a latency table")
    method = resolve_method(opts.method, calib_images is not None)
    allocation = resolve_allocation(opts.allocation, has_images=calib_images is not None,
                                    has_sensitivity=opts.sensitivity is not None, ratio_mode=opts.ratio is not None)
    if allocation != "global" and opts.ratio is not None:
        raise UsageError(f"allocation={allocation} works toward target_macs; it cannot be combined with ratio=")
    opts = dataclasses.replace(opts, method=method, allocation=allocation)
    timings = Timings()
    with timings("trace"):
        prepare(model)
        graph = build_graph(model, imgsz=opts.trace_imgsz, macs_imgsz=opts.macs_imgsz, portable=opts.portable)
    before = layer_widths(model, graph)
    if reference is None:
        reference = Reference(conv_macs=graph.conv_macs(), channels=sum(g.channels for g in graph.groups()))
    run = _Pass(model, graph, opts, goal=goal.bind(reference), cost=cost, reference=reference,
                calib_images=calib_images, progress=progress, before_recalibration=before_recalibration)
    records = run.run(on_step)
    return PruneOutcome(steps=records, layers_before=before, layers_after=layer_widths(model, graph),
                        reference=reference, allocation=allocation, method=method, kept=run.kept,
                        timings=timings.add(run.timings).add(run.recovery.timings))
