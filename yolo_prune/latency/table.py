"""The latency model: per-conv lookup tables (:class:`ConvTable`) and the whole model's (:class:`LatencyTable`).

    latency(widths) = fixed + scale * sum over prunable convs of T_conv(input width, output width)

A :class:`LatencyTable` is a plain model (no measuring here; see :mod:`.build`): it predicts milliseconds from
conv widths and saves to / loads from json.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from torch import nn

from ..io import write_json
from ..results import table
from .convs import ConvSpec

TABLE_VERSION = 1


@dataclasses.dataclass
class ConvTable:
    """Measured milliseconds of one conv over a grid of (input, output) widths."""

    spec: ConvSpec
    q_in: int
    q_out: int
    ins: list[int]
    outs: list[int]
    ms: list[list[float]]  # ms[i][j]: ins[i] input channels, outs[j] output channels
    spread: float  # median over grid points of (p90 - p10) / median

    def time(self, cin: float, cout: float) -> float:
        """Interpolated milliseconds at (cin, cout), widths first rounded up to the quanta."""
        cin = min(self.spec.cin, math.ceil(cin / self.q_in) * self.q_in) if self.spec.prune_in else self.spec.cin
        cout = min(self.spec.cout, math.ceil(cout / self.q_out) * self.q_out) if self.spec.prune_out else self.spec.cout
        return float(_bilinear(self.ins, self.outs, np.asarray(self.ms), cin, cout))

    def to_dict(self) -> dict[str, Any]:
        return {"spec": dataclasses.asdict(self.spec), "q_in": self.q_in, "q_out": self.q_out, "ins": self.ins,
                "outs": self.outs, "ms": self.ms, "spread": self.spread}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvTable:
        return cls(spec=ConvSpec(**d["spec"]), q_in=d["q_in"], q_out=d["q_out"], ins=d["ins"], outs=d["outs"],
                   ms=d["ms"], spread=d["spread"])


def _interp_axis(xs: Sequence[int], x: float) -> tuple[int, int, float]:
    """Indices (i, j) and weight of ``x`` between ``xs[i]`` and ``xs[j]``; extrapolates from the end segments."""
    if len(xs) == 1:
        return 0, 0, 0.0
    k = int(np.searchsorted(xs, x))
    k = min(max(k, 1), len(xs) - 1)
    i, j = k - 1, k
    return i, j, (x - xs[i]) / (xs[j] - xs[i])


def _bilinear(ins: Sequence[int], outs: Sequence[int], ms: np.ndarray, cin: float, cout: float) -> float:
    i0, i1, a = _interp_axis(ins, cin)
    j0, j1, b = _interp_axis(outs, cout)
    v = (ms[i0, j0] * (1 - a) * (1 - b) + ms[i1, j0] * a * (1 - b) + ms[i0, j1] * (1 - a) * b + ms[i1, j1] * a * b)
    return max(float(v), 0.0)


@dataclasses.dataclass
class LatencyTable:
    """The latency model of one architecture at one imgsz on one runtime; ``str()`` prints a summary."""

    runtime: str
    threads: int | None
    imgsz: int
    clock: str
    key: str
    cpu: str
    runtime_version: str
    dense_ms: float  # measured, whole dense model
    conv_ms: float  # the table's sum at the dense widths
    fixed_ms: float  # the part pruning cannot change: dense_ms - scale * conv_ms
    dense_spread: float  # (p90 - p10) / median of the dense measurements
    build_seconds: float
    created: str
    common_quantum: int = 16  # the runtime-wide quantum (used for convs too small to measure their own)
    scale: float = 1.0  # in-context scale of the convs' isolated times (fitted on calibration variants)
    int8: bool = False  # measured on the runtime's INT8 kernels (convs and whole models quantized as exported)
    calibration: dict[str, Any] | None = dataclasses.field(repr=False, default=None)
    convs: dict[str, ConvTable] = dataclasses.field(repr=False, default_factory=dict)
    validation: dict[str, Any] | None = dataclasses.field(repr=False, default=None)
    path: Path | None = dataclasses.field(repr=False, default=None)

    @property
    def fixed_share(self) -> float:
        """Fraction of the dense time that pruning cannot remove."""
        return self.fixed_ms / self.dense_ms

    def predict_ms(self, widths: Mapping[str, tuple[float, float]]) -> float:
        """Predicted milliseconds with conv ``name`` at ``widths[name] = (cin, cout)`` (dense where absent)."""
        return self.fixed_ms + self.scale * self.conv_sum(widths)

    def conv_sum(self, widths: Mapping[str, tuple[float, float]]) -> float:
        """The table's sum over the convs (isolated milliseconds, before ``scale``)."""
        total = 0.0
        for name, entry in self.convs.items():
            cin, cout = widths.get(name, (entry.spec.cin, entry.spec.cout))
            total += entry.time(cin, cout)
        return total

    def predict_model(self, model: nn.Module) -> float:
        """Predicted milliseconds of ``model`` (same architecture, pruned or not) from its conv widths."""
        return self.predict_ms(model_widths(model, self.convs))

    def quantum(self, name: str, is_out: bool) -> int:
        entry = self.convs.get(name)
        if entry is None:
            return 1
        return entry.q_out if is_out else entry.q_in

    def rows(self) -> list[tuple[str, Any]]:
        rows = [("runtime", f"{self.runtime} {self.runtime_version}{' INT8' if self.int8 else ''}"),
                ("threads", self.threads or "default"),
                ("imgsz", self.imgsz), ("clock", self.clock), ("cpu", self.cpu), ("convs in table", len(self.convs)),
                ("dense measured (ms)", self.dense_ms), ("convs at dense widths (ms)", self.conv_ms),
                ("in-context scale", self.scale), ("fixed part (ms)", self.fixed_ms), ("fixed share", self.fixed_share),
                ("build time (s)", self.build_seconds)]
        q = sorted({e.q_out for e in self.convs.values() if e.spec.prune_out})
        rows.append(("measured quanta (out)", ",".join(map(str, q))))
        rows.append(("runtime-wide quantum", self.common_quantum))
        if self.validation:
            v = self.validation
            rows += [("validation variants", v["n"]), ("ratio error, mean |.|", v["mean_abs_ratio_error"]),
                     ("ratio error, max |.|", v["max_abs_ratio_error"])]
        return rows

    def __str__(self) -> str:
        return f"LatencyTable {self.key}\n" + table(self.rows())

    def to_dict(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, "runtime": self.runtime, "threads": self.threads, "imgsz": self.imgsz,
                "clock": self.clock, "key": self.key, "cpu": self.cpu, "runtime_version": self.runtime_version,
                "dense_ms": self.dense_ms, "conv_ms": self.conv_ms, "fixed_ms": self.fixed_ms,
                "fixed_share": self.fixed_share, "dense_spread": self.dense_spread,
                "build_seconds": self.build_seconds, "created": self.created, "common_quantum": self.common_quantum,
                "scale": self.scale, "int8": self.int8, "calibration": self.calibration, "convs": {n: c.to_dict() for n, c in self.convs.items()}, "validation": self.validation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyTable:
        keys = ("runtime", "threads", "imgsz", "clock", "key", "cpu", "runtime_version", "dense_ms", "conv_ms",
                "fixed_ms", "dense_spread", "build_seconds", "created")
        return cls(**{k: d[k] for k in keys}, common_quantum=d.get("common_quantum", 16), scale=d.get("scale", 1.0),
                   int8=bool(d.get("int8", False)), calibration=d.get("calibration"), validation=d.get("validation"),
                   convs={n: ConvTable.from_dict(c) for n, c in d["convs"].items()})

    def save(self, path: str | Path) -> Path:
        self.path = write_json(path, self.to_dict())
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        t = cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        t.path = Path(path)
        return t


def model_widths(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(in, out) channels of the named convs of ``model`` (names as in the prepared model)."""
    wanted = set(names)
    return {n: (m.in_channels, m.out_channels) for n, m in model.named_modules()
            if n in wanted and isinstance(m, nn.Conv2d)}


def group_quantum(table: LatencyTable, group: Any, names: Mapping[nn.Module, str]) -> int:
    """The width multiple a channel group should keep: the largest quantum among the conv sides it changes."""
    q = 1
    for conv, is_out, _ in group.convs:
        q = max(q, table.quantum(names.get(conv, ""), is_out))
    return q
