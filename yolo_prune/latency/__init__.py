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
Tables are cached per (architecture, imgsz, runtime, threads, clock, CPU, runtime version, INT8 or not) in
``$YOLO_PRUNE_CACHE/latency`` (default ``~/.cache/yolo_prune/latency``).

Modules, bottom-up (this package sits above :mod:`yolo_prune.pruning`, whose traced graph it measures; the
pruning engine only sees the :class:`~yolo_prune.pruning.cost.Cost` protocol that :class:`LatencyCost` implements):

- :mod:`.probe`: the CPU, runtime, clock and cache folder a table is measured for;
- :mod:`.convs`: the prunable convs (:class:`ConvSpec`) and one conv alone in a runtime (:class:`ConvBench`);
- :mod:`.table`: the model, :class:`ConvTable` per conv and :class:`LatencyTable` (predictions, json);
- :mod:`.measure`: timing one conv: quanta (:func:`probe_quanta`, :func:`pool_quanta`) and its grid
  (:func:`measure_conv`);
- :mod:`.build`: :func:`build_table` (cached), :func:`calibrate_table`, :func:`validate_table`,
  :func:`measure_models`;
- :mod:`.cost`: :class:`LatencyCost`, the table as the schedule's cost.
"""

from .build import (
    build_table,
    calibrate_table,
    dense_model,
    measure_models,
    prepared_model,
    random_variant,
    table_key,
    validate_table,
    whole_model_runner,
)
from .convs import ConvBench, ConvSpec, architecture_hash, conv_onnx, conv_specs
from .cost import LatencyCost
from .measure import NOISY, QUANTA, Probe, measure_conv, pool_quanta, probe_quanta
from .probe import ALIASES, RUNTIMES, cache_dir, check_runtime, cpu_model, resolve_clock, runtime_version
from .table import TABLE_VERSION, ConvTable, LatencyTable, group_quantum, model_widths


__all__ = [
    "ALIASES",
    "NOISY",
    "QUANTA",
    "RUNTIMES",
    "TABLE_VERSION",
    "ConvBench",
    "ConvSpec",
    "ConvTable",
    "LatencyCost",
    "LatencyTable",
    "Probe",
    "architecture_hash",
    "build_table",
    "cache_dir",
    "calibrate_table",
    "check_runtime",
    "conv_onnx",
    "conv_specs",
    "cpu_model",
    "dense_model",
    "group_quantum",
    "measure_conv",
    "measure_models",
    "model_widths",
    "pool_quanta",
    "prepared_model",
    "probe_quanta",
    "random_variant",
    "resolve_clock",
    "runtime_version",
    "table_key",
    "validate_table",
    "whole_model_runner",
]
