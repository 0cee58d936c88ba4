"""A latency model of a detection model on a CPU runtime, measured on this machine (HALP-style lookup tables).

``T_conv`` is a lookup table per prunable convolution (HALP-style): the conv alone, as the exporters emit it
(BatchNorm folded into the conv, bias, SiLU), as a tiny model on the runtime at its real input resolution,
timed over a grid of (input, output) widths and interpolated bilinearly in between (a conv's time is close to
``a + b*cin + c*cout + d*cin*cout``, which bilinear interpolation reproduces exactly). The grid spans widths
down to ``min_fraction`` of the dense width.

Runtimes do not compute arbitrary widths: onnxruntime (NCHWc) and OpenVINO keep channels in blocks (16 with
AVX-512, 8 with AVX2) and a partly filled block costs a full one. Each conv's *quantum* is measured (narrowing
it by less than the quantum saves nothing), the grid lies on multiples of it, and a width is rounded up to it
before the lookup. ``round_to=auto`` prunes every group to multiples of its convs' quantum.

A conv alone is not quite a conv in the whole model. The tiny model converts its input and output to and from
the runtime's blocked layout, which consecutive convs in the whole model do not: only the conv's own nodes of the
runtime's per-node profile are counted (:class:`ConvBench`). What remains (caches, fusions) is one in-context
``scale``:

    latency(widths) = fixed + scale * sum over prunable convs of T_conv(input width, output width)

``scale`` and ``fixed`` are fitted on the dense model and a few randomly pruned variants, measured whole
(:func:`calibrate_table`); ``fixed`` is everything pruning cannot change (the Detect head's DFL softmax and box
decoding, its fixed output convs, concatenations, upsampling, per-call overhead), set so that the dense model is
predicted exactly. :func:`validate_table` checks the model on other random variants (predicted against measured
latency, with and without the calibration).

Timing: interleaved rounds, medians. ``clock="auto"`` uses the process CPU time with one thread (equal to the
latency of a quiet machine, and stable while other processes share the cores) and the wall clock with more.
Tables are cached per (architecture, imgsz, runtime, threads, clock, CPU, runtime version) in
``$YOLO_PRUNE_CACHE/latency`` (default ``~/.cache/yolo_prune/latency``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .bench import check_threads, interleaved_times, require_openvino, torch_threads
from .errors import UsageError
from .io import write_json
from .results import Result, table

LOGGER = logging.getLogger("yolo_prune")

RUNTIMES = ("onnxruntime", "openvino", "torch")
_ALIASES = {"onnx": "onnxruntime", "ort": "onnxruntime", "ov": "openvino", "pytorch": "torch"}
_BACKEND = {"onnxruntime": "onnx", "openvino": "openvino", "torch": "torch"}  # names in yolo_prune.bench
QUANTA = (4, 8, 16, 32)  # narrowing steps probed for a conv's quantum
TABLE_VERSION = 1
NOISY = 0.3  # (p90 - p10) / median above which measurements are reported as unreliable


def check_runtime(runtime: Any) -> str:
    """Canonical runtime name (``onnx``/``ort`` -> ``onnxruntime``, ``ov`` -> ``openvino``), else UsageError."""
    name = _ALIASES.get(str(runtime).strip().lower(), str(runtime).strip().lower())
    if name not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if name == "openvino":
        require_openvino()
    return name


def resolve_clock(clock: str, threads: int | None) -> str:
    """``auto`` -> ``cpu`` with one thread, else ``wall``."""
    if clock not in ("auto", "wall", "cpu"):
        raise UsageError(f"clock={clock!r} must be auto, wall or cpu")
    if clock == "auto":
        return "cpu" if threads == 1 else "wall"
    return clock


def cache_dir() -> Path:
    """``$YOLO_PRUNE_CACHE/latency`` or ``~/.cache/yolo_prune/latency``."""
    env = os.environ.get("YOLO_PRUNE_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "yolo_prune") / "latency"


def cpu_model() -> str:
    """The CPU's model name and the vector extensions that decide kernel block sizes."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name":
                    name = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    isa = [f for f in ("avx512_bf16", "amx_tile", "avx512f", "avx2") if f in flags]
    return f"{name} [{' '.join(isa) or 'baseline'}]"


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    if runtime == "openvino":
        return require_openvino().__version__
    return torch.__version__


# --------------------------------------------------------------------------------------------------- the convs


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A conv of the model as the runtime sees it (BN folded), with what pruning can change."""

    name: str
    cin: int
    cout: int
    kernel: int
    stride: int
    groups: int
    size: int  # input height = width at imgsz
    prune_in: bool
    prune_out: bool


def conv_specs(model: nn.Module, graph: Any, imgsz: int, trace_imgsz: int) -> list[ConvSpec]:
    """Every conv of a prepared model whose input or output channels some group can remove."""
    touched: dict[nn.Conv2d, set[bool]] = {}
    for group in graph.groups():
        for conv, is_out, _ in group.convs:
            touched.setdefault(conv, set()).add(is_out)
    specs = []
    for conv, sides in touched.items():
        if conv not in graph.conv_hw:
            continue
        out_side = math.sqrt(graph.conv_hw[conv]) * imgsz / trace_imgsz
        stride = conv.stride[0]
        if conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1]:
            raise UsageError(f"latency model: conv {graph.names.get(conv)} is not square")
        depthwise = conv.groups > 1 and conv.groups == conv.in_channels
        specs.append(ConvSpec(name=graph.names[conv], cin=conv.in_channels, cout=conv.out_channels,
                              kernel=conv.kernel_size[0], stride=stride, groups=conv.groups if depthwise else 1,
                              size=int(round(out_side * stride)), prune_in=False in sides, prune_out=True in sides))
    return sorted(specs, key=lambda s: _natural(s.name))


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def architecture_hash(specs: Sequence[ConvSpec], extra: Iterable[Any] = ()) -> str:
    text = json.dumps([dataclasses.astuple(s) for s in specs] + list(map(str, extra)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- one conv


def conv_onnx(cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1, seed: int = 0) -> bytes:
    """ONNX bytes of Conv(+bias) -> Sigmoid -> Mul (SiLU), the exported form of an ultralytics Conv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin // groups, kernel, kernel)) * 0.05).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.05).astype(np.float32)
    pad = kernel // 2
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                         pads=[pad] * 4, group=groups),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


class ConvBench:
    """One conv (cin -> cout at ``size`` x ``size``, + bias + SiLU) as a tiny model in ``runtime``; call to run it.

    In the whole model, consecutive convs exchange tensors in the runtime's blocked layout; alone, the tiny
    model also converts its input and output (onnxruntime's ReorderInput/ReorderOutput, OpenVINO's Reorder),
    which the whole model does not pay per conv. :meth:`share` is the fraction of the runtime's own time
    spent in the conv's nodes (from the runtime's per-node profile), so ``time * share`` is the conv's cost in
    context. torch eager has no such conversions (share 1).
    """

    def __init__(self, runtime: str, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int,
                 threads: int | None, *, profile_dir: str | Path | None = None):
        self.runtime = runtime
        x = np.random.default_rng(1).random((1, cin, size, size), dtype=np.float32)
        self._profile = None
        if runtime == "torch":
            conv = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups), nn.SiLU()).eval()
            xt = torch.from_numpy(x)

            def run() -> Any:
                with torch.inference_mode():
                    return conv(xt)

            self.run = run
            return
        model = conv_onnx(cin, cout, kernel, stride, size, groups)
        if runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if profile_dir is not None:
                opts.enable_profiling = True
                opts.profile_file_prefix = str(Path(profile_dir) / f"conv{cin}x{cout}_{id(self)}")  # unique
            session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
            value = ort.OrtValue.ortvalue_from_numpy(x)
            binding = session.io_binding()
            binding.bind_ortvalue_input("x", value)
            binding.bind_output("y")
            session.run_with_iobinding(binding)  # allocate the output once, then write into it
            out = binding.get_outputs()[0]
            binding = session.io_binding()
            binding.bind_ortvalue_input("x", value)
            binding.bind_ortvalue_output("y", out)
            self._session = session
            self.run = lambda: session.run_with_iobinding(binding)
            self._profile = profile_dir is not None
            return
        ov = require_openvino()
        from .bench import openvino_compiled

        compiled = openvino_compiled(model, threads, perf_count=profile_dir is not None)
        request = compiled.create_infer_request()
        request.set_input_tensor(ov.Tensor(x))
        self._request = request
        self._ov_shares: list[float] = []
        self._profile = profile_dir is not None
        if self._profile:
            def run() -> Any:
                request.infer()

            self.run = run
        else:
            self.run = request.infer

    def __call__(self) -> Any:
        return self.run()

    def share(self) -> float:
        """Fraction of the runtime's time in the conv's own nodes (1.0 without a profile)."""
        if not self._profile:
            return 1.0
        if self.runtime == "onnxruntime":
            path = self._session.end_profiling()
            self._profile = False
            try:
                events = json.loads(Path(path).read_text(encoding="utf-8"))
            finally:
                Path(path).unlink(missing_ok=True)
            runs = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
            nodes = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
            reorder = sum(e["dur"] for e in nodes if str(e.get("args", {}).get("op_name", "")).startswith("Reorder"))
            own = sum(e["dur"] for e in nodes) - reorder
            return float(min(1.0, own / sum(runs))) if runs and sum(runs) > 0 else 1.0
        # OpenVINO: the last inference's per-node times (Swish is fused into the Convolution node)
        info = self._request.profiling_info
        total = sum(p.real_time.total_seconds() for p in info)
        own = sum(p.real_time.total_seconds() for p in info if p.node_type not in ("Reorder", "Parameter", "Result"))
        return float(own / total) if total > 0 else 1.0


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


def _timed(spec: ConvSpec, pairs: Iterable[tuple[int, int]], runtime: str, threads: int | None, *, clock: str,
           runs: int, warmup: int, in_context: bool, budget_ms: float = 0.0) -> dict[tuple[int, int], list[float]]:
    """Milliseconds of the conv at each (cin, cout), interleaved; scaled to the conv's share of the runtime's time.

    With ``budget_ms``, fast convs get more rounds (up to 8x ``runs``) so that each point is timed for about
    that long in total: tiny convs are cheap to time and noisy per run.
    """
    with tempfile.TemporaryDirectory(prefix="yolo-prune-conv-") as tmp:
        benches = {p: ConvBench(runtime, p[0], p[1], spec.kernel, spec.stride, spec.size,
                                p[0] if spec.groups > 1 else 1, threads, profile_dir=tmp if in_context else None)
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
                 min_fraction: float = 0.25, in_context: bool = True, budget_ms: float = 20.0) -> Probe:
    """Time the conv narrowed by 0, 4, 8, 16, 32 channels on each prunable side; see :func:`_quantum`."""

    def probe(full: int, make: Callable[[int], tuple[int, int]]) -> tuple[int, bool]:
        ref = (full // 32) * 32 if full % 32 and full >= 64 else full  # a multiple of 32 when there is room
        widths = [ref] + [ref - d for d in QUANTA if ref - d >= max(4, full * min_fraction)]
        if len(widths) < 2:
            return 1, False
        t = _timed(spec, [make(w) for w in widths], runtime, threads, clock=clock, runs=2 * runs, warmup=warmup,
                   in_context=in_context, budget_ms=budget_ms)
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
                 probe: Probe | None = None) -> ConvTable:
    """Time the conv over the width grid on multiples of its quanta (``probe``, measured when not given).

    ``in_context``: count only the conv's own nodes (see :class:`ConvBench`), not the layout conversions of the
    tiny model; ``False`` keeps the tiny model's whole time.
    """
    kw = dict(clock=clock, runs=runs, warmup=warmup, in_context=in_context)
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


def pool_quanta(probes: Mapping[str, Probe], weights: Mapping[str, float]) -> tuple[Probe, int]:
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


# --------------------------------------------------------------------------------------------------- the model


@dataclasses.dataclass
class LatencyTable(Result):
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
        rows = [("runtime", f"{self.runtime} {self.runtime_version}"), ("threads", self.threads or "default"),
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
                "scale": self.scale, "calibration": self.calibration, "convs": {n: c.to_dict() for n, c in self.convs.items()}, "validation": self.validation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyTable:
        keys = ("runtime", "threads", "imgsz", "clock", "key", "cpu", "runtime_version", "dense_ms", "conv_ms",
                "fixed_ms", "dense_spread", "build_seconds", "created")
        return cls(**{k: d[k] for k in keys}, common_quantum=d.get("common_quantum", 16), scale=d.get("scale", 1.0),
                   calibration=d.get("calibration"), validation=d.get("validation"),
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


def _dense(model: Any) -> nn.Module:
    """An FP32 eval copy of ``model`` as given (the reference users deploy)."""
    from .stats import as_module

    return copy.deepcopy(as_module(model)).float().cpu().eval()


def _prepared(model: Any) -> nn.Module:
    """An FP32 eval copy in yolo-prune's prunable form (C2f's first conv as two convs), names as in pruning."""
    from .pruning.graph import prepare

    return prepare(_dense(model))


def table_key(specs: Sequence[ConvSpec], *, imgsz: int, runtime: str, threads: int | None, clock: str,
              points: int, min_fraction: float, in_context: bool = True, calibrate: int = 0) -> str:
    """The cache key: architecture, imgsz, runtime (and version), threads, clock, CPU model, grid settings."""
    return architecture_hash(specs, (imgsz, runtime, runtime_version(runtime), threads, clock, cpu_model(), points,
                                     min_fraction, in_context, calibrate, TABLE_VERSION))


def whole_model_runner(runtime: str, model: nn.Module, imgsz: int, folder: Path, threads: int | None):
    """A runner of the whole model (exported as users deploy it) in ``runtime``, on a fixed random image."""
    from .bench import make_runner
    from .stats import input_channels

    x = torch.rand(1, input_channels(model), imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    return make_runner(_BACKEND[runtime], model, x, folder, threads)


def measure_models(models: Mapping[str, nn.Module], *, runtime: str, imgsz: int, threads: int | None,
                   clock: str = "auto", runs: int = 20, warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds of every model's runs in ``runtime``, interleaved (the first model is usually the dense one)."""
    import warnings

    runtime = check_runtime(runtime)
    threads = check_threads(threads)
    clock = resolve_clock(clock, threads)
    before = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="yolo-prune-latency-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runners = {name: whole_model_runner(runtime, m, imgsz, Path(tmp) / str(i), threads)
                       for i, (name, m) in enumerate(models.items())}
            with torch_threads(threads or before):
                return interleaved_times(runners, runs=runs, warmup=warmup, progress=False, clock=clock)
    finally:
        torch.set_num_threads(before)


def build_table(model: Any, *, imgsz: int = 640, runtime: str = "onnxruntime", threads: int | None = None,
                clock: str = "auto", points: int = 4, min_fraction: float = 0.25, runs: int = 7, warmup: int = 2,
                dense_runs: int = 20, in_context: bool = True, calibrate: int = 6, cache: bool = True,
                rebuild: bool = False, trace_imgsz: int = 64, progress: bool = False) -> LatencyTable:
    """Measure (or load from the cache) the latency table of ``model`` at ``imgsz`` on ``runtime``.

    ``model`` is the dense model (path, YOLO or DetectionModel; never modified). ``points`` grid widths per
    prunable side of each conv, from ``min_fraction`` of its width to its width; ``runs``/``warmup`` timed and
    untimed passes per grid point; ``dense_runs`` passes of the whole model for the fixed part; ``in_context``:
    count only each conv's own nodes of its tiny model (see :class:`ConvBench`); ``calibrate``: number of random
    pruned variants measured with the dense model to fit the in-context scale and the fixed part
    (:func:`calibrate_table`; 0: fixed part = dense time - table sum at the dense widths, scale 1).
    """
    from tqdm.auto import tqdm

    from .pruning.graph import build_graph

    runtime = check_runtime(runtime)
    threads = check_threads(threads)
    clock = resolve_clock(clock, threads)
    if not isinstance(imgsz, int) or imgsz < 32 or imgsz % 32:
        raise UsageError(f"imgsz={imgsz!r} must be a multiple of 32")
    module = _prepared(model)
    graph = build_graph(module, imgsz=trace_imgsz)
    specs = conv_specs(module, graph, imgsz, trace_imgsz)
    key = table_key(specs, imgsz=imgsz, runtime=runtime, threads=threads, clock=clock, points=points,
                    min_fraction=min_fraction, in_context=in_context, calibrate=calibrate)
    path = cache_dir() / f"{runtime}-t{threads or 0}-{clock}-{imgsz}-{key}.json"
    if cache and not rebuild and path.is_file():
        try:
            LOGGER.info("latency table: %s (cached)", path)
            return LatencyTable.load(path)
        except (OSError, ValueError, KeyError, TypeError):
            LOGGER.warning("latency table %s is unreadable, measuring it again", path)
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    convs: dict[str, ConvTable] = {}
    kw = dict(clock=clock, runs=runs, warmup=warmup, in_context=in_context, min_fraction=min_fraction)
    try:
        with tqdm(total=2 * len(specs), desc=f"latency table {runtime}", disable=not progress, unit="conv") as bar:
            probes = {}
            for spec in specs:  # 1. each conv's quanta; the runtime-wide one where a conv is too small to tell
                probes[spec.name] = probe_quanta(spec, runtime, threads, **kw)
                bar.update()
            weights = {s.name: s.cin * s.cout * s.kernel ** 2 * (s.size // s.stride) ** 2 for s in specs}
            probes, common_q = pool_quanta(probes, weights)
            for spec in specs:  # 2. the width grid on multiples of the quanta
                convs[spec.name] = measure_conv(spec, runtime, threads, points=points, probe=probes[spec.name], **kw)
                bar.update()
        # the reference is the model as given (C2f's first conv whole), not its prunable form
        if not calibrate:
            dense = measure_models({"dense": _dense(model)}, runtime=runtime, imgsz=imgsz, threads=threads,
                                   clock=clock, runs=dense_runs, warmup=warmup)["dense"]
    finally:
        torch.set_num_threads(before)
    dense_ms = float(np.median(dense)) if not calibrate else float("nan")
    conv_ms = sum(c.time(c.spec.cin, c.spec.cout) for c in convs.values())
    result = LatencyTable(
        runtime=runtime, threads=threads, imgsz=imgsz, clock=clock, key=key, cpu=cpu_model(),
        runtime_version=runtime_version(runtime), dense_ms=dense_ms, conv_ms=conv_ms, fixed_ms=dense_ms - conv_ms,
        dense_spread=float((np.percentile(dense, 90) - np.percentile(dense, 10)) / dense_ms) if not calibrate else 0.0,
        build_seconds=time.perf_counter() - t0, created=time.strftime("%Y-%m-%d %H:%M:%S"), common_quantum=common_q,
        convs=convs)
    if calibrate:
        calibrate_table(result, model, n=calibrate, runs=dense_runs, warmup=warmup)
        result.build_seconds = time.perf_counter() - t0
    if result.fixed_ms < -0.05 * result.dense_ms:  # (a few % below 0 is within the fit's noise)
        LOGGER.warning("latency table: the convs alone (%.1f ms scaled) take longer than the whole model (%.1f ms): "
                       "the fixed part is taken as negative; the machine was probably busy while measuring",
                       result.scale * conv_ms, result.dense_ms)
    if cache:
        result.save(path)
    LOGGER.info("latency table built in %.0f s: dense %.1f ms, fixed part %.1f ms (%.0f%%), in-context scale %.3f",
                result.build_seconds, result.dense_ms, result.fixed_ms, 100 * result.fixed_share, result.scale)
    return result


def calibrate_table(table: LatencyTable, model: Any, *, n: int = 6, seed: int = 12345, runs: int = 20,
                    warmup: int = 3) -> LatencyTable:
    """Fit ``measured = fixed + scale * table sum`` on the dense model and ``n`` random pruned variants.

    A conv timed alone is not exactly a conv in the whole model (caches, fused neighbours, layouts): the fit
    gives the in-context scale of the table and the fixed part (the intercept: the time left with every conv
    gone). The dense model is measured in the same interleaved run and stays the reference (``dense_ms``);
    the fixed part is then set so that the dense model is predicted exactly. A fit outside [0.5, 1.5] (a busy
    machine) falls back to scale 1.
    """
    module = _prepared(model)
    rng = np.random.default_rng(seed)
    models = {"dense": _dense(model)}
    sums = {"dense": table.conv_ms}
    for i in range(n):
        v = random_variant(module, table, rng)
        models[f"c{i}"] = v
        sums[f"c{i}"] = table.conv_sum(model_widths(v, table.convs))
    times = measure_models(models, runtime=table.runtime, imgsz=table.imgsz, threads=table.threads,
                           clock=table.clock, runs=runs, warmup=warmup)
    med = {k: float(np.median(v)) for k, v in times.items()}
    dense = times["dense"]
    table.dense_ms = med["dense"]
    table.dense_spread = float((np.percentile(dense, 90) - np.percentile(dense, 10)) / table.dense_ms)
    xs, ys = np.asarray([sums[k] for k in med]), np.asarray([med[k] for k in med])
    scale, intercept = np.polyfit(xs, ys, 1) if n >= 2 else (1.0, 0.0)
    resid = ys - (scale * xs + intercept)
    r2 = float(1 - (resid ** 2).sum() / max(((ys - ys.mean()) ** 2).sum(), 1e-12)) if n >= 2 else 1.0
    ok = bool(0.5 <= scale <= 1.5 and r2 >= 0.8)
    table.scale = float(scale) if ok else 1.0
    table.fixed_ms = table.dense_ms - table.scale * table.conv_ms
    spread = {k: float((np.percentile(v, 90) - np.percentile(v, 10)) / np.median(v)) for k, v in times.items()}
    table.calibration = {"n": n, "seed": seed, "runs": runs, "fit_scale": float(scale), "fit_intercept_ms": float(intercept),
                         "fit_r2": r2, "used": ok, "max_spread": max(spread.values()), "fixed_ms_by_subtraction": table.dense_ms - table.conv_ms,
                         "points": [{"name": k, "conv_sum_ms": sums[k], "measured_ms": med[k]} for k in med],
                         "loadavg": list(os.getloadavg())}
    if not ok:
        LOGGER.warning("latency table: the calibration fit (scale %.2f, R^2 %.2f) is implausible; using scale 1",
                       scale, r2)
    if max(spread.values()) > NOISY:
        LOGGER.warning("latency measurements vary by up to %.0f%% (p90-p10 of the median): other processes are using "
                       "the CPU and the table is unreliable; rebuild it on a quiet machine (or time 1 thread: its CPU "
                       "clock hardly minds)", 100 * max(spread.values()))
    return table


def group_quantum(table: LatencyTable, group: Any, names: Mapping[nn.Module, str]) -> int:
    """The width multiple a channel group should keep: the largest quantum among the conv sides it changes."""
    q = 1
    for conv, is_out, _ in group.convs:
        q = max(q, table.quantum(names.get(conv, ""), is_out))
    return q


def random_variant(model: nn.Module, table: LatencyTable, rng: np.random.Generator, *,
                   min_fraction: float = 0.25, trace_imgsz: int = 64) -> nn.Module:
    """A copy of the prepared dense ``model`` with every group pruned to a random multiple of its quantum."""
    from .pruning.graph import build_graph

    variant = copy.deepcopy(model)
    graph = build_graph(variant, imgsz=trace_imgsz)
    plans = []
    for g in graph.groups():
        q = group_quantum(table, g, graph.names)
        lo = max(q, int(math.ceil(g.channels * min_fraction / q)) * q)
        choices = list(range(lo, g.channels, q)) + [g.channels]
        keep = int(rng.choice(choices))
        if keep < g.channels:
            plans.append((g, sorted(rng.choice(g.channels, g.channels - keep, replace=False).tolist())))
    for g, idxs in plans:
        graph.prune(g, idxs)
    return variant.eval()


def validate_table(model: Any, table: LatencyTable, *, n: int = 10, seed: int = 0, runs: int = 15, warmup: int = 3,
                   save: bool = True) -> dict[str, Any]:
    """Predicted against measured latency of ``n`` randomly pruned variants of ``model`` (and the dense one).

    All models are measured in one interleaved run; errors are on the ratio to the dense model measured in that
    run (``predicted / table.dense_ms`` vs ``measured / measured dense``) and on milliseconds. The result is
    stored in ``table.validation`` (and in the cached table file with ``save``).
    """
    module = _prepared(model)
    rng = np.random.default_rng(seed)
    variants = {"dense": _dense(model)}
    for i in range(n):
        variants[f"v{i}"] = random_variant(module, table, rng)
    t0 = time.perf_counter()
    times = measure_models(variants, runtime=table.runtime, imgsz=table.imgsz, threads=table.threads,
                           clock=table.clock, runs=runs, warmup=warmup)
    dense_ms = float(np.median(times["dense"]))
    rows = []
    for name, m in variants.items():
        measured = float(np.median(times[name]))
        predicted = table.predict_model(m) if name != "dense" else table.dense_ms
        raw = table.dense_ms - table.conv_ms + table.conv_sum(model_widths(m, table.convs)) if name != "dense" \
            else table.dense_ms
        t = np.asarray(times[name])
        rows.append({"name": name, "predicted_ms": predicted, "measured_ms": measured,
                     "predicted_ratio": predicted / table.dense_ms, "measured_ratio": measured / dense_ms,
                     "spread": float((np.percentile(t, 90) - np.percentile(t, 10)) / measured),
                     "conv_ms": predicted - table.fixed_ms, "uncalibrated_ratio": raw / table.dense_ms,
                     "params": sum(p.numel() for p in m.parameters())})
    errs = [r["predicted_ratio"] - r["measured_ratio"] for r in rows[1:]]
    raw_errs = [r["uncalibrated_ratio"] - r["measured_ratio"] for r in rows[1:]]
    rel = [r["predicted_ms"] / r["measured_ms"] - 1 for r in rows[1:]]
    # measured = a + b * (table's conv sum): b near 1 and a near the fixed part support the decomposition
    b, a = np.polyfit([r["conv_ms"] for r in rows], [r["measured_ms"] for r in rows], 1)
    result = {
        "n": n, "seed": seed, "runs": runs, "seconds": time.perf_counter() - t0,
        "dense_ms_now": dense_ms, "dense_ms_table": table.dense_ms,
        "mean_abs_ratio_error": float(np.mean(np.abs(errs))), "max_abs_ratio_error": float(np.max(np.abs(errs))),
        "mean_ratio_error": float(np.mean(errs)), "mean_abs_ms_error_rel": float(np.mean(np.abs(rel))),
        "uncalibrated_mean_abs_ratio_error": float(np.mean(np.abs(raw_errs))),
        "uncalibrated_max_abs_ratio_error": float(np.max(np.abs(raw_errs))),
        "fit_slope": float(b), "fit_intercept_ms": float(a), "loadavg": list(os.getloadavg()), "variants": rows,
    }
    table.validation = result
    if save and table.path is not None:
        table.save(table.path)
    return result


# --------------------------------------------------------------------------------------------------- the cost


class LatencyCost:
    """The latency model as the schedule's cost (see :func:`yolo_prune.pruning.engine.prune_model`).

    ``fraction(graph, delta)`` is the predicted latency of the model with ``delta[(conv, is_output)]`` channels
    removed, as a fraction of the dense model's measured latency; ``target`` is the fraction to reach (``None``:
    the table only serves ``round_to=auto``). ``quantum(graph, group)`` is the width multiple a group keeps with
    ``round_to=auto``. With ``aware`` (an exponent a in [0, 1]; True = 1), :meth:`rank_weights` gives every group
    the time t one of its channels costs and channels are ranked by importance / t**a: a = 1 is importance per
    millisecond saved (HALP's latency-aware knapsack, greedily), a = 0 importance alone.
    """

    label = "latency"

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

    def rank_weights(self, graph: Any, groups: Sequence[Any]) -> list[float]:
        """Milliseconds one channel of each group costs now (removing one quantum of it, per channel), to the
        power ``aware``: importance is divided by it (1: importance per millisecond, 0.5: a milder tilt)."""
        base = self.table.predict_ms(self._widths(graph, {}))
        out = []
        for g in groups:
            q = max(1, min(self.quantum(graph, g), g.channels - 1))
            delta = {(conv, is_out): q * k for conv, is_out, k in g.convs}
            saved = base - self.table.predict_ms(self._widths(graph, delta))
            out.append(max(saved / q, 1e-6) ** self.aware)
        return out

    def unreachable(self, reached: float, *, max_layer_ratio: float, round_to: Any) -> str:
        t = self.table
        threads = f"{t.threads} thread{'s' if (t.threads or 0) > 1 else ''}" if t.threads else "default threads"
        return (f"target_latency={self.target:.3f} is out of reach on {t.runtime} ({threads}, imgsz {t.imgsz}): with "
                f"max_layer_ratio={max_layer_ratio} and round_to={round_to} the model keeps at least {reached:.3f} "
                f"of its predicted latency; the fixed part that pruning cannot change (DFL, box decoding, Detect "
                f"outputs, concat/upsample) is {t.fixed_ms:.1f} ms = {100 * t.fixed_share:.0f}% of the dense "
                f"{t.dense_ms:.1f} ms")
