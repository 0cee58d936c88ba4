"""Timing one conv over its width grid: each side's width quantum, then the grid on multiples of it.

Runtimes keep channels in blocks (16 with AVX-512, 8 with AVX2) and a partly filled block costs a full one: each
conv's *quantum* is measured first (:func:`probe_quanta`; narrowing it by less than the quantum saves nothing),
inconclusive ones take the runtime-wide quantum (:func:`pool_quanta`), then :func:`measure_conv` times the grid.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..bench import interleaved_times, torch_threads
from .convs import ConvBench, ConvSpec
from .table import ConvTable

QUANTA = (4, 8, 16, 32)  # narrowing steps probed for a conv's quantum
NOISY = 0.3  # (p90 - p10) / median above which measurements are reported as unreliable


def _time(runners: dict[Any, Callable[[], Any]], *, runs: int, warmup: int, clock: str, threads: int | None,
          runtime: str) -> dict[Any, list[float]]:
    if runtime == "torch":
        with torch_threads(threads):
            return interleaved_times(runners, runs=runs, warmup=warmup, progress=False, clock=clock)
    return interleaved_times(runners, runs=runs, warmup=warmup, progress=False, clock=clock)


def _grid(full: int, q: int, lo_fraction: float, points: int) -> list[int]:
    """Up to ``points`` widths on multiples of ``q`` from about ``lo_fraction * full`` to ``full`` (included)."""
    lo = max(q, int(math.floor(full * lo_fraction / q)) * q)
    cands = list(range(lo, full, q)) + [full]
    if len(cands) <= points:
        return cands
    idx = np.linspace(0, len(cands) - 1, points).round().astype(int)
    return sorted({cands[i] for i in idx})


def _quantum(samples: Mapping[int, Sequence[float]], ref: int) -> tuple[int, bool]:
    """The smallest probed narrowing step that saves time, from timings at ``ref`` and ``ref - d`` (d in QUANTA).

    The time per channel is taken over the widest probed span (32 channels when there is room); narrowing by
    ``d`` is free when it saves less than half of ``d`` channels' worth of that. The quantum is the first ``d``
    that is not free (the span when all are). Returns (quantum, conclusive): conclusive when the span's saving
    is at least three standard errors of the medians (else the caller uses the runtime-wide quantum).
    """
    probed = [d for d in QUANTA if ref - d in samples]
    if not probed:
        return 1, False
    med = {w: float(np.median(v)) for w, v in samples.items()}
    span = max(probed)
    saving = med[ref] - med[ref - span]
    noise = sum(1.25 * float(np.subtract(*np.percentile(samples[w], [75, 25]))) / 1.35 / math.sqrt(len(samples[w]))
                for w in (ref, ref - span))
    per_channel = saving / span
    if per_channel <= 0:
        return span, False
    for d in probed:
        if med[ref] - med[ref - d] >= per_channel * d / 2:
            return d, saving >= 3 * noise
    return span, saving >= 3 * noise


def _timed(spec: ConvSpec, pairs: Iterable[tuple[int, int]], runtime: str, threads: int | None, *, clock: str,
           runs: int, warmup: int, in_context: bool, budget_ms: float = 0.0,
           int8: bool = False) -> dict[tuple[int, int], list[float]]:
    """Milliseconds of the conv at each (cin, cout), interleaved; scaled to the conv's share of the runtime's time.

    With ``budget_ms``, fast convs get more rounds (up to 8x ``runs``) so that each point is timed for about
    that long in total: tiny convs are cheap to time and noisy per run.
    """
    with tempfile.TemporaryDirectory(prefix="yolo-prune-conv-") as tmp:
        benches = {p: ConvBench(runtime, p[0], p[1], spec.kernel, spec.stride, spec.size,
                                p[0] if spec.groups > 1 else 1, threads, profile_dir=tmp if in_context else None,
                                int8=int8)
                   for p in dict.fromkeys(pairs)}
        n = runs
        if budget_ms > 0:
            first = _time(benches, runs=1, warmup=warmup, clock=clock, threads=threads, runtime=runtime)
            typical = max(float(np.median([v[0] for v in first.values()])), 1e-3)
            n = int(min(8 * runs, max(runs, math.ceil(budget_ms / typical))))
        times = _time(benches, runs=n, warmup=0 if budget_ms > 0 else warmup, clock=clock, threads=threads,
                      runtime=runtime)
        shares = {p: b.share() if in_context else 1.0 for p, b in benches.items()}
        return {p: [t * shares[p] for t in v] for p, v in times.items()}


@dataclasses.dataclass
class Probe:
    """A conv's measured quanta (input and output side) and whether each measurement was conclusive."""

    q_in: int = 1
    q_out: int = 1
    in_conclusive: bool = False
    out_conclusive: bool = False


def probe_quanta(spec: ConvSpec, runtime: str, threads: int | None, *, clock: str, runs: int = 7, warmup: int = 2,
                 min_fraction: float = 0.25, in_context: bool = True, budget_ms: float = 20.0,
                 int8: bool = False) -> Probe:
    """Time the conv narrowed by 0, 4, 8, 16, 32 channels on each prunable side; see :func:`_quantum`. ``int8``:
    the conv's INT8 form (:class:`ConvBench`), whose kernels block channels differently."""

    def probe(full: int, make: Callable[[int], tuple[int, int]]) -> tuple[int, bool]:
        ref = (full // 32) * 32 if full % 32 and full >= 64 else full  # a multiple of 32 when there is room
        widths = [ref] + [ref - d for d in QUANTA if ref - d >= max(4, full * min_fraction)]
        if len(widths) < 2:
            return 1, False
        t = _timed(spec, [make(w) for w in widths], runtime, threads, clock=clock, runs=2 * runs, warmup=warmup,
                   in_context=in_context, budget_ms=budget_ms, int8=int8)
        return _quantum({w: t[make(w)] for w in widths}, ref)

    result = Probe()
    depthwise = spec.groups > 1
    if spec.prune_out:
        result.q_out, result.out_conclusive = probe(spec.cout, (lambda w: (w, w)) if depthwise else
                                                    (lambda w: (spec.cin, w)))
    if spec.prune_in and not depthwise:
        result.q_in, result.in_conclusive = probe(spec.cin, lambda w: (w, spec.cout))
    if depthwise:
        result.q_in, result.in_conclusive = result.q_out, result.out_conclusive
    return result


def measure_conv(spec: ConvSpec, runtime: str, threads: int | None, *, clock: str, points: int = 4,
                 min_fraction: float = 0.25, runs: int = 7, warmup: int = 2, in_context: bool = True,
                 probe: Probe | None = None, int8: bool = False) -> ConvTable:
    """Time the conv over the width grid on multiples of its quanta (``probe``, measured when not given).

    ``in_context``: count only the conv's own nodes (see :class:`ConvBench`), not the layout conversions of the
    tiny model; ``False`` keeps the tiny model's whole time.
    """
    kw = dict(clock=clock, runs=runs, warmup=warmup, in_context=in_context, int8=int8)
    if probe is None:
        probe = probe_quanta(spec, runtime, threads, min_fraction=min_fraction, **kw)
    q_in, q_out = probe.q_in, probe.q_out
    ins = _grid(spec.cin, q_in, min_fraction, points) if spec.prune_in else [spec.cin]
    outs = _grid(spec.cout, q_out, min_fraction, points) if spec.prune_out else [spec.cout]
    if spec.groups > 1:  # depthwise: in == out, a function of one width
        t = _timed(spec, [(w, w) for w in outs], runtime, threads, budget_ms=10.0, **kw)
        ms = _fill_diagonal(outs, [[float(np.median(t[(a, a)])) if a == b else float("nan") for b in outs]
                                   for a in outs])
        ins = outs
    else:
        t = _timed(spec, [(i, o) for i in ins for o in outs], runtime, threads, budget_ms=10.0, **kw)
        ms = [[float(np.median(t[(i, o)])) for o in outs] for i in ins]
    spread = float(np.median([(np.percentile(v, 90) - np.percentile(v, 10)) / max(np.median(v), 1e-9)
                              for v in t.values()]))
    return ConvTable(spec=spec, q_in=q_in, q_out=q_out, ins=ins, outs=outs, ms=ms, spread=spread)


def pool_quanta(probes: Mapping[str, Probe], weights: Mapping[str, float]) -> tuple[dict[str, Probe], int]:
    """Replace inconclusive quanta by the runtime-wide one (the weighted median of the conclusive ones)."""
    votes = [(p.q_out, weights[n]) for n, p in probes.items() if p.out_conclusive]
    votes += [(p.q_in, weights[n]) for n, p in probes.items() if p.in_conclusive]
    common = 16
    if votes:
        votes.sort()
        total, acc = sum(w for _, w in votes), 0.0
        for q, w in votes:
            acc += w
            if acc >= total / 2:
                common = q
                break
    out = {}
    for n, p in probes.items():
        out[n] = Probe(q_in=p.q_in if p.in_conclusive or p.q_in == 1 else common,
                       q_out=p.q_out if p.out_conclusive or p.q_out == 1 else common,
                       in_conclusive=p.in_conclusive, out_conclusive=p.out_conclusive)
    return out, common


def _fill_diagonal(ws: Sequence[int], ms: list[list[float]]) -> list[list[float]]:
    """A depthwise conv depends on one width: make the table a function of the output width only."""
    diag = [ms[k][k] for k in range(len(ws))]
    return [list(diag) for _ in ws]
