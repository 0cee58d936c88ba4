"""The cost the schedule prunes toward: what a plan of channel removals leaves of the model's cost.

:func:`~yolo_prune.pruning.engine.prune_model` takes one :class:`Cost`. The schedule
(:func:`~yolo_prune.pruning.schedule.solve_for_macs`) and the allocations bisect ``cost.fraction`` of a
candidate plan toward ``cost.target``; a cost may also give each channel group its width multiple
(``round_to=auto``) and tilt the channel ranking. :class:`MacsCost` (conv MACs of the traced graph, exact) is
the default; :class:`yolo_prune.latency.LatencyCost` (a measured latency table) implements the same protocol
one layer up, so that this package does not depend on the latency model.

``delta`` in every method maps ``(conv, is_output)`` to the channels a plan removes from that side of that conv
(see :meth:`~yolo_prune.pruning.graph.PruneGraph.conv_macs`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

from torch import nn

Delta = Mapping[tuple[nn.Conv2d, bool], float]


class Cost:
    """Base of the costs the engine accepts (subclass it, or provide the same attributes and methods).

    ``name`` says what is counted (``"macs"``, ``"latency"``); ``target`` is the fraction of the reference cost to
    reach (``None``: the cost sets no goal of its own, the engine reaches ``target_macs`` in MACs and uses this
    cost for width quanta and reports only). ``has_quanta`` tells whether :meth:`quantum` gives per-group
    width multiples (needed by ``round_to=auto``).
    """

    name: ClassVar[str] = "cost"
    has_quanta: ClassVar[bool] = False
    target: float | None = None

    def bind(self, reference: Any) -> Cost:
        """This cost measured against ``reference`` (the engine's :class:`~yolo_prune.pruning.engine.Reference`:
        the model before any pruning). A cost that carries its own reference returns itself."""
        return self

    def fraction(self, graph: Any, delta: Delta) -> float:
        """The cost of the graph's model with ``delta`` removed, as a fraction of the reference's."""
        raise NotImplementedError

    def quantum(self, graph: Any, group: Any) -> int | None:
        """The width multiple ``group`` keeps with ``round_to=auto`` (None: the cost knows none)."""
        return None

    def rank_weights(self, graph: Any, groups: Sequence[Any]) -> list[float] | None:
        """One divisor per group for its channels' importance scores (None: rank by importance alone)."""
        return None

    def unreachable(self, reached: float, *, target: float, max_layer_ratio: float, round_to: Any) -> str:
        """The message of the error raised when the plan closest to ``target`` (this step's goal) keeps
        ``reached`` of the cost."""
        return (f"target {self.name}={target:.3f} is out of reach: with max_layer_ratio={max_layer_ratio} and "
                f"round_to={round_to} the model keeps at least {reached:.3f} of its {self.name}")

    def record_fields(self, graph: Any, target: float | None) -> dict[str, Any]:
        """The :class:`~yolo_prune.pruning.engine.StepRecord` fields this cost fills after a step: its goal
        ``target`` (None when it is not the goal) and any measure of the pruned model."""
        return {}


@dataclasses.dataclass(frozen=True)
class MacsCost(Cost):
    """Conv MACs of the traced graph relative to the reference's (exact; the default cost)."""

    name: ClassVar[str] = "macs"
    target: float | None = 0.5  # fraction of the reference conv MACs to keep (None: ratio mode)
    reference_macs: float | None = None  # conv MACs of the reference (set by :meth:`bind`)

    def bind(self, reference: Any) -> MacsCost:
        if self.reference_macs is not None:
            return self
        return dataclasses.replace(self, reference_macs=reference.conv_macs)

    def fraction(self, graph: Any, delta: Delta) -> float:
        if self.reference_macs is None:
            raise RuntimeError("MacsCost.fraction needs the reference MACs: bind() it to the reference first")
        return graph.conv_macs(delta) / self.reference_macs

    def unreachable(self, reached: float, *, target: float, max_layer_ratio: float, round_to: Any) -> str:
        return (f"target_macs={target:.3f} is out of reach: with max_layer_ratio={max_layer_ratio} and "
                f"round_to={round_to} the model keeps at least {reached:.3f} of its MACs")

    def record_fields(self, graph: Any, target: float | None) -> dict[str, Any]:
        return {"target_macs": target}
