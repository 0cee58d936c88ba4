"""Recovery steps: what the engine does around each removal of channels to keep the model's outputs.

A step is a :class:`RecoveryStep` with three hooks the engine calls on calibration images:

- :meth:`~RecoveryStep.setup` once, on the dense model, before the first increment (references to match);
- :meth:`~RecoveryStep.before` before an increment's channels are removed (fits that need the removed channels);
- :meth:`~RecoveryStep.after` after they are removed, steps in increasing ``after_order``: BN statistics (0)
  before fits to the dense model's outputs (1), so that those fits keep what the re-estimation got right.

``compensate`` picks one of :data:`COMPENSATIONS` (``lstsq``: least-squares refit of the consumers of removed
channels, :mod:`.reconstruct`; ``mean``: their mean folded into the bias, :mod:`.compensate`; ``lstsq_seq``: every
conv refit layer by layer toward the dense model after pruning, :mod:`.sequential`; ``none``), ``recalibrate`` one
of :data:`RECALIBRATIONS` (``match``: moment matching to the dense model; ``reset``: plain re-estimation; see
:mod:`.recalibrate`). A new step is one class and one entry in its registry.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..errors import UsageError
from ..logs import Timings
from .compensate import compensate as compensate_means
from .compensate import input_means
from .graph import ChannelGroup, KeptChannels, PruneGraph
from .recalibrate import bn_reference, recalibrate_bn
from .reconstruct import reconstruct
from .sequential import reconstruct_sequential

Plans = Sequence[tuple[ChannelGroup, list[int]]]


@dataclasses.dataclass
class RecoveryContext:
    """What the hooks work on: the model being pruned, its graph, the calibration images and the increment."""

    model: nn.Module
    graph: PruneGraph
    images: torch.Tensor
    kept: KeptChannels
    seed: int = 0
    progress: bool = False
    step: int = 1  # the increment (1-based) of ``steps``
    steps: int = 1
    # called with the model right before the last increment's BN re-estimation (None: not called)
    before_recalibration: Callable[[nn.Module], None] | None = None


class RecoveryStep:
    """Base of the recovery steps: every hook does nothing."""

    name: ClassVar[str] = "none"
    timing: ClassVar[str] = "compensation"  # the sub-step its hooks' time counts as (the prune report's timings)
    after_order: ClassVar[int] = 0  # order of the ``after`` hooks: 0 BN statistics, 1 fits to the dense outputs
    refits_after_statistics: ClassVar[bool] = False  # True: the BN statistics are refit afterwards anyway

    def setup(self, ctx: RecoveryContext) -> None:
        """Once, on the dense model, before the first increment."""

    def before(self, ctx: RecoveryContext, plans: Plans) -> None:
        """Before ``plans`` (group, channel indices) are removed."""

    def after(self, ctx: RecoveryContext, plans: Plans) -> None:
        """After ``plans`` were removed."""


class LeastSquares(RecoveryStep):
    """``compensate=lstsq``: the consumers of removed channels refit their kept weights and bias."""

    name = "lstsq"

    def before(self, ctx: RecoveryContext, plans: Plans) -> None:
        reconstruct(ctx.graph, plans, ctx.images, seed=ctx.seed)


class MeanShift(RecoveryStep):
    """``compensate=mean``: the removed channels' mean input is folded into the consumers' bias."""

    name = "mean"

    def before(self, ctx: RecoveryContext, plans: Plans) -> None:
        compensate_means(ctx.graph, plans, input_means(ctx.model, ctx.images))


class SequentialRefit(RecoveryStep):
    """``compensate=lstsq_seq``: after removal (and the BN statistics), every conv is refit layer by layer to the
    dense model's BN outputs."""

    name = "lstsq_seq"
    after_order = 1
    refits_after_statistics = True

    def __init__(self) -> None:
        self.dense: nn.Module | None = None

    def setup(self, ctx: RecoveryContext) -> None:
        self.dense = copy.deepcopy(ctx.model).eval()

    def after(self, ctx: RecoveryContext, plans: Plans) -> None:
        reconstruct_sequential(ctx.model, self.dense, ctx.kept, ctx.images, seed=ctx.seed, progress=ctx.progress)


class Recalibration(RecoveryStep):
    """BN re-estimation after removal (``mode`` of :func:`~.recalibrate.recalibrate_bn`)."""

    mode: ClassVar[str] = "reset"
    timing = "recalibration"

    def __init__(self) -> None:
        self.reference: dict[str, Any] | None = None

    def after(self, ctx: RecoveryContext, plans: Plans) -> None:
        if ctx.before_recalibration is not None and ctx.step == ctx.steps:
            ctx.before_recalibration(ctx.model)
        recalibrate_bn(ctx.model, ctx.images, reference=self.reference, kept=ctx.kept.out, mode=self.mode,
                       progress=ctx.progress)


class MatchStatistics(Recalibration):
    """``recalibrate=match``: moment matching to the dense model's BN outputs."""

    name = mode = "match"

    def setup(self, ctx: RecoveryContext) -> None:
        self.reference = bn_reference(ctx.model, ctx.images, progress=ctx.progress)


class ResetStatistics(Recalibration):
    """``recalibrate=reset``: EagleEye's plain re-estimation."""

    name = mode = "reset"


COMPENSATIONS: dict[str, type[RecoveryStep]] = {
    "lstsq_seq": SequentialRefit,
    "lstsq": LeastSquares,
    "mean": MeanShift,
    "none": RecoveryStep,
}
RECALIBRATIONS: dict[str, type[RecoveryStep]] = {"match": MatchStatistics, "reset": ResetStatistics}


def normalize_compensation(value: str | bool | None) -> str:
    """Normalise ``compensate``: True -> lstsq, False/None -> none."""
    if value is True:
        return "lstsq"
    if value in (False, None):
        return "none"
    if value not in COMPENSATIONS:
        raise UsageError(f"compensate={value!r} must be one of {', '.join(COMPENSATIONS)}")
    return value


def normalize_recalibration(value: bool | str | None) -> str | None:
    """Normalise ``recalibrate``: True -> match (moment matching to the dense model), False/None -> off."""
    if value is True:
        return "match"
    if value in (False, None, "none"):
        return None
    if value not in RECALIBRATIONS:
        raise UsageError(f"recalibrate={value!r} must be True, False or one of {', '.join(RECALIBRATIONS)}")
    return value


class Recovery:
    """The recovery steps of one pruning pass, run in their order around every increment; ``timings`` adds up the
    wall time of their hooks under each step's :attr:`~RecoveryStep.timing` name."""

    def __init__(self, steps: Sequence[RecoveryStep], ctx: RecoveryContext | None):
        self.steps = [s for s in steps if type(s) is not RecoveryStep] if ctx is not None else []  # (none: no-op)
        self.ctx = ctx
        self.timings = Timings()
        if ctx is not None and any(s.refits_after_statistics for s in self.steps):
            ctx.before_recalibration = None  # the statistics it would see are refit afterwards anyway

    @classmethod
    def of(cls, compensate: str | bool | None, recalibrate: bool | str | None,
           ctx: RecoveryContext | None) -> Recovery:
        """The steps for the ``compensate`` and ``recalibrate`` options (none without images: ``ctx`` None)."""
        steps = [COMPENSATIONS[normalize_compensation(compensate)]()]
        mode = normalize_recalibration(recalibrate)
        if mode is not None:
            steps.append(RECALIBRATIONS[mode]())
        return cls(steps, ctx)

    def setup(self) -> None:
        for s in self.steps:
            with self.timings(s.timing):
                s.setup(self.ctx)

    def before(self, step: int, plans: Plans) -> None:
        if self.steps and plans:
            self.ctx.step = step
            for s in self.steps:
                with self.timings(s.timing):
                    s.before(self.ctx, plans)

    def after(self, step: int, plans: Plans) -> None:
        if self.steps and plans:
            self.ctx.step = step
            for s in sorted(self.steps, key=lambda s: s.after_order):
                with self.timings(s.timing):
                    s.after(self.ctx, plans)
