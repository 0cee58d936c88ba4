"""CPU latency benchmark of several models in torch eager, onnxruntime and OpenVINO.

What is timed
    * ``torch``: the model as ultralytics runs it for inference (a deep copy, FP32, eval mode,
      Conv+BN fused with ``model.fuse()``), called under ``torch.inference_mode()``. Only the network
      forward (including the Detect head's box decoding) is timed: no pre-processing or NMS.
    * ``onnx``: the same model exported with :func:`yolo_prune.deploy.export_onnx` (the ultralytics
      ONNX exporter, static shape, onnxslim) and run by onnxruntime's CPUExecutionProvider.
    * ``openvino``: the same model exported by the ultralytics OpenVINO exporter (FP32 IR) and compiled
      for OpenVINO's CPU plugin with the LATENCY hint and the plugin's default inference precision (bf16 on
      CPUs with AVX512-BF16 or AMX, else f32: what an ultralytics user deploying the export gets). Needs the
      ``openvino`` package (``pip install yolo-prune[openvino]``).

How
    All sessions are built first. Then, backend after backend, every model gets ``warmup`` untimed passes
    and ``runs`` timed passes in *interleaved rounds*: each round times every model once, with the
    starting model rotated from round to round, so thermal/frequency drift and background load hit
    all models alike. Backends are not interleaved with each other: a runtime's idle worker threads
    (torch's OpenMP, OpenVINO's TBB) keep spinning for a while after a pass and would slow down the
    next runtime's pass (measured: onnxruntime's ratio 0.647 interleaved with OpenVINO and torch, 0.615
    alone). Medians and 90th percentiles are reported, and each model's ratio to the first
    model (the reference) in the same backend: ``ratio_vs_reference = median / reference median``
    (below 1 means faster than the reference).

``threads`` sets torch's intra-op threads (restored afterwards), onnxruntime's
``intra_op_num_threads`` and OpenVINO's ``INFERENCE_NUM_THREADS``; ``None`` keeps each runtime's default. onnxruntime's thread spinning is
turned off so that an idle session does not slow down the pass timed after it. Latency on a shared
machine is noisy: compare models through ``ratio_vs_reference`` of one run, and prefer ``threads=1``
when other processes compete for the cores. ``clock="cpu"`` times the process's CPU time instead of the
wall clock: with one thread it equals the latency of a quiet machine and hardly moves when other processes
take turns on the cores (it is not a latency with several threads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .errors import UsageError
from .logs import Progress, progress_output
from .results import Result, markdown_table, table
from .runtimes import require_openvino
from .forms import PRUNABLE_TASKS, ModelLike, as_detection_model
from .stats import inference_copy, input_channels
from .deploy import export_model
from .deploy import export_onnx
from .evaluate import exported_format, exported_metadata

BACKENDS = ("torch", "onnx", "openvino")
CLOCKS = ("wall", "cpu")
Runner = Callable[[], Any]


@dataclasses.dataclass
class LatencyRow:
    """Latency of one model in one backend."""

    model: str
    backend: str
    imgsz: int
    median_ms: float
    p90_ms: float
    ratio_vs_reference: float


@dataclasses.dataclass
class LatencyResult(Result):
    """All rows of one benchmark run; ``str()`` prints them as a table."""

    entries: list[LatencyRow]
    reference: str
    imgsz: int
    batch: int
    runs: int
    warmup: int
    threads: int | None
    clock: str = "wall"

    HEADER = ("model", "backend", "imgsz", "median_ms", "p90_ms", "ratio_vs_reference")

    def get(self, model: str, backend: str) -> LatencyRow:
        """The row of ``model`` in ``backend`` (KeyError if it was not measured)."""
        for r in self.entries:
            if r.model == model and r.backend == backend:
                return r
        raise KeyError((model, backend))

    def table_rows(self) -> list[tuple[Any, ...]]:
        """One tuple per (model, backend), in :attr:`HEADER` order."""
        return [dataclasses.astuple(r) for r in self.entries]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the run settings plus ``entries``, a list of row dicts."""
        out: dict[str, Any] = {k: v for k, v in super().rows()}
        out["entries"] = [dataclasses.asdict(r) for r in self.entries]
        return out

    def markdown(self) -> str:
        """The rows as a markdown table (for reports)."""
        return markdown_table(self.table_rows(), self.HEADER)

    def __str__(self) -> str:
        threads = "default" if self.threads is None else self.threads
        head = (
            f"{type(self).__name__} (batch {self.batch}, {self.runs} runs, {self.warmup} warmup, "
            f"threads {threads}, reference {self.reference})"
        )
        return head + "\n" + table(self.table_rows(), self.HEADER)


def parse_backends(backends: str | Sequence[str]) -> list[str]:
    """``"torch,onnx"`` or a sequence -> unique lower-case names (``onnxruntime`` -> ``onnx``); checked."""
    if isinstance(backends, str):  # "torch,onnx" as in cfg/default.yaml
        backends = backends.split(",")
    aliases = {"onnxruntime": "onnx", "ort": "onnx", "ov": "openvino"}
    names = [str(b).strip().lower() for b in backends if str(b).strip()]
    names = list(dict.fromkeys(aliases.get(b, b) for b in names))
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise UsageError(f"unknown backend(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(BACKENDS)}")
    if "openvino" in names:
        require_openvino()
    return names


def check_threads(threads: Any) -> int | None:
    """``None``/0 (the runtime's default) or a positive integer; anything else raises :class:`UsageError`."""
    if threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 0):
        return threads or None
    raise UsageError(f"threads={threads!r} must be a positive integer (0 or null: the runtime's default)")


def _check_args(models: dict[str, ModelLike], backends: Sequence[str], runs: int, warmup: int, batch: int) -> None:
    if not models:
        raise UsageError("measure_latency needs at least one model")
    if runs < 1 or warmup < 0 or batch < 1:
        raise UsageError(f"need runs >= 1, warmup >= 0, batch >= 1 (got runs={runs}, warmup={warmup}, batch={batch})")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the duration (no-op for ``None``)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def torch_runner(model: ModelLike, x: torch.Tensor) -> Runner:
    """A no-argument callable running one inference forward of the fused copy of ``model`` on ``x``."""
    module = inference_copy(model)

    def run() -> Any:
        with torch.inference_mode():
            return module(x)

    return run


def onnx_session(path: str | Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` (or ONNX bytes) with ``intra_op_num_threads`` = ``threads`` (or default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # Idle onnxruntime workers otherwise busy-wait after each run and steal the CPU from the next
    # interleaved pass (seen on 2 cores: passes timed right after a spinning session up to 3x slower).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = path if isinstance(path, bytes) else str(path)  # a file or the serialized model
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_runner(model: ModelLike, x: np.ndarray, folder: Path, threads: int | None) -> Runner:
    """Export ``model`` to ONNX under ``folder`` and return a callable running one onnxruntime pass on ``x``."""
    return export_runner(export_onnx(model, folder, imgsz=x.shape[-1], batch=x.shape[0]), x, threads)


def export_runner(path: str | Path, x: np.ndarray, threads: int | None) -> Runner:
    """A callable running one pass of an existing export on ``x``: a ``.onnx`` file in onnxruntime, an OpenVINO
    folder (or its ``.xml``) in OpenVINO (FP32 or INT8 alike)."""
    path = Path(path)
    if path.suffix == ".onnx":
        session = onnx_session(path, threads)
        feed = {session.get_inputs()[0].name: x}
        return lambda: session.run(None, feed)
    xml = path if path.suffix == ".xml" else next(path.glob("*.xml"), None)
    if xml is None:
        raise UsageError(f"{path} is neither an .onnx file nor an OpenVINO folder")
    ov = require_openvino()
    request = openvino_compiled(xml, threads).create_infer_request()
    request.set_input_tensor(ov.Tensor(np.ascontiguousarray(x)))
    return request.infer


def openvino_compiled(model: Any, threads: int | None = None, *, precision: str | None = None,
                      perf_count: bool = False):
    """An OpenVINO CPU ``CompiledModel`` of ``model`` (an IR .xml / .onnx path, ONNX bytes or ``ov.Model``).

    LATENCY hint, ``INFERENCE_NUM_THREADS`` = ``threads`` (default: the plugin's choice), inference precision
    ``precision`` (``"f32"``, ``"bf16"``; default: the plugin's, bf16 where the CPU has it).
    """
    ov = require_openvino()
    core = ov.Core()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if perf_count:  # per-node times in request.profiling_info
        config["PERF_COUNT"] = True
    source = model if isinstance(model, (bytes, ov.Model)) else str(model)
    return core.compile_model(core.read_model(source) if not isinstance(source, ov.Model) else source, "CPU", config)


def export_openvino(model: ModelLike, save_dir: str | Path, *, imgsz: int = 640, batch: int = 1) -> Path:
    """Export ``model`` with the ultralytics OpenVINO exporter (FP32 IR, static shape); return the ``.xml``."""
    folder = export_model(model, format="openvino", imgsz=imgsz, save_dir=save_dir, batch=batch)
    return next(Path(folder).glob("*.xml"))


def openvino_runner(model: ModelLike, x: np.ndarray, folder: Path, threads: int | None) -> Runner:
    """Export ``model`` to OpenVINO under ``folder`` and return a callable running one inference on ``x``."""
    return export_runner(export_openvino(model, folder, imgsz=x.shape[-1], batch=x.shape[0]), x, threads)


def make_runner(backend: str, model: ModelLike, x: torch.Tensor, folder: Path, threads: int | None) -> Runner:
    """The runner of ``model`` in ``backend`` (``torch``, ``onnx``, ``openvino``) on the input ``x``."""
    if backend == "torch":
        return torch_runner(model, x)
    if backend == "onnx":
        return onnx_runner(model, x.numpy(), folder, threads)
    if backend == "openvino":
        return openvino_runner(model, x.numpy(), folder, threads)
    raise UsageError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def interleaved_times(
    runners: dict[Any, Runner], *, runs: int, warmup: int, progress: bool = True, clock: str = "wall",
    label: str = "latency rounds"
) -> dict[Any, list[float]]:
    """Milliseconds of ``runs`` timed calls of every runner, in rotating interleaved rounds after ``warmup`` rounds.

    ``clock="wall"`` times elapsed time, ``"cpu"`` the CPU time of the whole process (all its threads).
    ``progress``: progress lines of the rounds, named ``label`` (:class:`~yolo_prune.logs.Progress`).
    """
    if clock not in CLOCKS:
        raise UsageError(f"clock={clock!r} must be one of {', '.join(CLOCKS)}")
    now = time.perf_counter if clock == "wall" else time.process_time
    keys = list(runners)
    times: dict[Any, list[float]] = {k: [] for k in keys}
    with Progress(label, warmup + runs, unit="rounds", enabled=progress) as bar:
        for i in range(warmup + runs):
            start = i % len(keys)
            for key in keys[start:] + keys[:start]:
                t0 = now()
                runners[key]()
                dt = (now() - t0) * 1e3
                if i >= warmup:
                    times[key].append(dt)
            bar.update()
    return times


EXPORT_BACKEND = {"onnx": "onnx", "openvino": "openvino"}  # the backend an existing export runs in


def _with_export_backends(backends: list[str], exports: dict[str, str]) -> list[str]:
    """The asked backends plus the one of every export given as a model (an OpenVINO folder adds ``openvino``)."""
    return backends + [b for b in dict.fromkeys(EXPORT_BACKEND[f] for f in exports.values()) if b not in backends]


def _check_export_shape(path: str | Path, fmt: str, imgsz: int, batch: int) -> None:
    """An export has a static input: refuse, in one line, an ``imgsz`` or ``batch`` it was not exported at."""
    meta = exported_metadata(path, fmt)
    size = meta.get("imgsz")
    size = list(size) if isinstance(size, (list, tuple)) else [size, size]
    args = meta.get("args") or {}  # a dict in metadata.yaml, its repr in ONNX metadata
    dynamic = bool(args.get("dynamic")) if isinstance(args, dict) else "'dynamic': True" in str(args)
    if not dynamic and (size != [imgsz, imgsz] or int(meta.get("batch", 1)) != batch):
        raise UsageError(f"{path} was exported static at imgsz={size[0]} batch={meta.get('batch', 1)}: bench it with "
                         f"imgsz={size[0]} batch={meta.get('batch', 1)}")


def summarise(
    times: dict[tuple[str, str], list[float]], names: Sequence[str], backends: Sequence[str], imgsz: int
) -> list[LatencyRow]:
    """Rows with median, p90 and ratio to the median of the first model measured in the same backend (a model given
    as an export is measured only in its own backend)."""
    rows = []
    for backend in backends:
        measured = [n for n in names if (n, backend) in times]
        ref = float(np.median(times[(measured[0], backend)]))
        for name in measured:
            t = np.asarray(times[(name, backend)])
            med = float(np.median(t))
            rows.append(LatencyRow(name, backend, imgsz, med, float(np.percentile(t, 90)), med / ref))
    return rows


def measure_latency(
    models: dict[str, ModelLike],
    *,
    imgsz: int = 640,
    backends: Sequence[str] | str = ("torch", "onnx"),
    runs: int = 50,
    warmup: int = 10,
    batch: int = 1,
    threads: int | None = None,
    seed: int = 0,
    progress: bool = True,
    clock: str = "wall",
) -> LatencyResult:
    """CPU latency of each model (name -> DetectionModel / YOLO / path) in each backend; see the module docstring.

    A model given as an existing export (a ``.onnx`` file, an OpenVINO folder; FP32 or INT8, e.g. from ``yolo-prune
    export int8=True``) runs only in its own backend, which is added to ``backends``; its static ``imgsz``/``batch``
    must be the ones asked. The first model measured in a backend is the reference of ``ratio_vs_reference``. ``backends`` is a
    sequence or a comma-separated string of ``torch``, ``onnx`` (``onnxruntime``) and ``openvino``. Input: one
    fixed uniform-random ``batch x 3 x imgsz x imgsz`` tensor drawn with ``seed``. ``progress``: progress lines of
    the exports and the timed rounds (:class:`~yolo_prune.logs.Progress`; on stderr when no logging is set up).
    """
    threads = check_threads(threads)
    exports = {name: fmt for name, m in models.items() if (fmt := exported_format(m))}
    backends = _with_export_backends(parse_backends(backends), exports)
    _check_args(models, backends, runs, warmup, batch)
    names = list(models)
    modules = {name: m if name in exports else as_detection_model(m, tasks=PRUNABLE_TASKS) for name, m in models.items()}
    for name, fmt in exports.items():
        _check_export_shape(models[name], fmt, imgsz, batch)
    torch_models = [modules[n] for n in names if n not in exports]
    channels = input_channels(torch_models[0]) if torch_models else 3
    x = torch.rand(batch, channels, imgsz, imgsz, generator=torch.Generator().manual_seed(seed))
    # ultralytics' exporter (inside onnx_runner) resets torch's thread count: remember what to time with,
    # build every runner first, then time under that count and give the process its count back.
    before = torch.get_num_threads()
    want = threads or before
    try:
        with tempfile.TemporaryDirectory(prefix="yolo-prune-bench-") as tmp, progress_output(progress):
            pairs = [(n, b) for n in names for b in backends if n not in exports or EXPORT_BACKEND[exports[n]] == b]
            runners: dict[tuple[str, str], Runner] = {}
            bar = Progress("bench setup", len(pairs), unit="runners", enabled=progress)
            for name, backend in pairs:
                runners[(name, backend)] = (export_runner(models[name], x.numpy(), threads) if name in exports else
                                            make_runner(backend, modules[name], x, Path(tmp) / f"{name}_{backend}",
                                                        threads))
                bar.update()
            bar.close()
            times: dict[tuple[str, str], list[float]] = {}
            with torch_threads(want):
                for backend in backends:
                    times.update(interleaved_times({k: r for k, r in runners.items() if k[1] == backend}, runs=runs,
                                                   warmup=warmup, progress=progress, clock=clock,
                                                   label=f"bench {backend}"))
    finally:
        torch.set_num_threads(before)
    return LatencyResult(
        entries=summarise(times, names, backends, imgsz),
        reference=names[0],
        imgsz=imgsz,
        batch=batch,
        runs=runs,
        warmup=warmup,
        threads=threads,
        clock=clock,
    )
