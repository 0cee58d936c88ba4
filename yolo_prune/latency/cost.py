"""The latency model as the schedule's cost (:class:`yolo_prune.pruning.cost.Cost`)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from ..errors import UsageError
from ..pruning.cost import Cost
from .table import LatencyTable, group_quantum


class LatencyCost(Cost):
    """The latency model as the schedule's cost (see :func:`yolo_prune.pruning.engine.prune_model`).

    ``fraction(graph, delta)`` is the predicted latency of the model with ``delta[(conv, is_output)]`` channels
    removed, as a fraction of the dense model's measured latency; ``target`` is the fraction to reach (``None``:
    the table only serves ``round_to=auto``). ``quantum(graph, group)`` is the width multiple a group keeps with
    ``round_to=auto``. With ``aware`` (an exponent a in [0, 1]; True = 1), :meth:`rank_weights` gives every group
    the time t one of its channels costs and channels are ranked by importance / t**a: a = 1 is importance per
    millisecond saved (HALP's latency-aware knapsack, greedily), a = 0 importance alone (no weights).
    """

    name = "latency"
    has_quanta = True

    def __init__(self, table: LatencyTable, target: float | None = None, *, aware: bool | float = True,
                 reference_ms: float | None = None):
        if isinstance(aware, bool):
            aware = 1.0 if aware else 0.0
        if not isinstance(aware, (int, float)) or not 0 <= aware <= 1:
            raise UsageError(f"latency_aware={aware!r} must be True, False or an exponent in [0, 1]")
        self.table = table
        self.target = target
        self.aware = float(aware)
        self.reference_ms = reference_ms or table.dense_ms

    def _widths(self, graph: Any, delta: Mapping[tuple[nn.Conv2d, bool], float]) -> dict[str, tuple[float, float]]:
        widths = {}
        for conv, name in graph.names.items():
            if name in self.table.convs and isinstance(conv, nn.Conv2d):
                widths[name] = (conv.in_channels - delta.get((conv, False), 0.0),
                                conv.out_channels - delta.get((conv, True), 0.0))
        return widths

    def fraction(self, graph: Any, delta: Mapping[tuple[nn.Conv2d, bool], float]) -> float:
        return self.table.predict_ms(self._widths(graph, delta)) / self.reference_ms

    def quantum(self, graph: Any, group: Any) -> int:
        return group_quantum(self.table, group, graph.names)

    def rank_weights(self, graph: Any, groups: Sequence[Any]) -> list[float] | None:
        """Milliseconds one channel of each group costs now (removing one quantum of it, per channel), to the
        power ``aware``: importance is divided by it (1: importance per millisecond, 0.5: a milder tilt; 0: None,
        importance alone)."""
        if self.aware <= 0:
            return None
        base = self.table.predict_ms(self._widths(graph, {}))
        out = []
        for g in groups:
            q = max(1, min(self.quantum(graph, g), g.channels - 1))
            delta = {(conv, is_out): q * k for conv, is_out, k in g.convs}
            saved = base - self.table.predict_ms(self._widths(graph, delta))
            out.append(max(saved / q, 1e-6) ** self.aware)
        return out

    def unreachable(self, reached: float, *, target: float | None = None, max_layer_ratio: float,
                    round_to: Any) -> str:
        """Names the fixed part pruning cannot change (the message states the final ``self.target``)."""
        t = self.table
        threads = f"{t.threads} thread{'s' if (t.threads or 0) > 1 else ''}" if t.threads else "default threads"
        return (f"target_latency={self.target:.3f} is out of reach on {t.runtime} ({threads}, imgsz {t.imgsz}): with "
                f"max_layer_ratio={max_layer_ratio} and round_to={round_to} the model keeps at least {reached:.3f} "
                f"of its predicted latency; the fixed part that pruning cannot change (DFL, box decoding, Detect "
                f"outputs, concat/upsample) is {t.fixed_ms:.1f} ms = {100 * t.fixed_share:.0f}% of the dense "
                f"{t.dense_ms:.1f} ms")

    def record_fields(self, graph: Any, target: float | None) -> dict[str, Any]:
        return {"target_latency": target, "latency_fraction": self.fraction(graph, {})}
