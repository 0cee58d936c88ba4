"""The options schema: every yolo-prune key, once, with its type, default, range or choices, modes and doc line.

Everything else is derived from :data:`SCHEMA`:

- ``cfg/default.yaml`` (the file users read; ``yolo-prune cfg`` prints :func:`default_yaml`, a test keeps the
  file equal to it);
- validation of a merged configuration and of API keyword options (:func:`coerce`, :func:`check`);
- the CLI's value parsing by declared type (``compensate=none`` stays the string ``"none"``);
- ``tools/prune_yolo.py``'s flags (the keys of mode ``pipeline``);
- the typed, frozen option objects the API takes (:class:`PruneOptions`, :class:`LatencyOptions`,
  :class:`TrainOptions`, :class:`SparseOptions`, :class:`DistillOptions`, :class:`SparsifyOptions`,
  :class:`StageOptions`, :class:`BenchOptions`, :class:`RunOptions`), one per :attr:`Key.group`;
- the choices other modules use (``choices("method")`` is :data:`yolo_prune.pruning.importance.METHODS`).

Adding a key is one :class:`Key` here plus the code that reads it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import logging
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from .errors import UsageError

LOGGER = logging.getLogger("yolo_prune")

MODES = ("sparse", "prune", "sparsify", "sensitivity", "finetune", "val", "bench", "export", "pipeline", "demo")
_ALL = frozenset(MODES)
_TRAIN = frozenset({"sparse", "finetune", "pipeline", "demo", "sparsify"})
_PIPE = frozenset({"pipeline", "demo"})
_PRUNE = frozenset({"prune", "pipeline", "demo"})
_GREG = _PRUNE | {"sparse"}  # greg plans a pruning while it trains (the pruning keys it reads)
_SPARSE = frozenset({"sparse", "pipeline", "demo"})
_STEPPED = frozenset({"pipeline", "demo", "sparsify"})


@dataclasses.dataclass(frozen=True)
class Key:
    """One configuration key. ``kind`` is how a value is read: ``int``, ``float``, ``bool``, ``str``,
    ``int|auto``, ``bool|str``, ``bool|float``; ``lo``/``hi`` bound numbers (``open`` = "(", "]" ...)."""

    name: str
    default: Any
    kind: str
    doc: str
    group: str
    modes: frozenset = _ALL
    optional: bool = False
    choices: tuple = ()
    mode_choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    lo: float | None = None
    hi: float | None = None
    bounds: str = "[]"  # "[]", "(]", "[)", "()"
    label: str = ""  # the type as cfg/default.yaml shows it, when it differs from kind

    def type_label(self) -> str:
        return (self.label or self.kind.replace("|", " | ")) + (", optional" if self.optional else "")

    def choices_for(self, mode: str | None) -> tuple:
        """The choices in ``mode``; without a mode (an option object), those of every mode."""
        if mode is None:
            extra = tuple(c for cs in self.mode_choices.values() for c in cs if c not in self.choices)
            return self.choices + extra
        return self.mode_choices.get(mode, self.choices)


def K(name: str, default: Any, kind: str, doc: str, group: str, **kw: Any) -> Key:  # noqa: N802  (reads as a table)
    return Key(name, default, kind, doc, group, **kw)


_SR_NOTE = """\
sr_mode: how the penalty is applied (yolo_prune/train/penalty.py); sr: its strength, per mode:
  proximal: after each optimizer step every penalised gamma is soft-thresholded by lr*sr (lr: the current lr of
    the BN parameter group, warmup included), which gives exact zeros with any optimizer. In Adam(W) units sr~1
    is as fast as the largest step Adam can take, so a gamma whose gradient does not consistently push back
    shrinks at lr*sr per step: with optimizer=auto (AdamW, lr0 = 0.002*5/(4+nc), e.g. 0.0014 for 3 classes)
    30 epochs move a gamma by at most ~sum(lr), so sensible sr is 1..10. SGD (lr0 0.01, ~10x larger steps):
    sr in units of the loss gradient on gamma, sensible 0.05..1.
  subgradient: sr*sign(gamma) is added to the gradient (Network Slimming as published: sr 1e-5..1e-3 with SGD
    over long runs; Adam(W) normalises it away and no gamma ever reaches 0).
  greg: the L2 penalty on the channels of greg's target plan grows so that at the end of greg_ramp each step
    shrinks them by a fraction sr (times lr/lr0); then they are 0. Sensible 0.02..0.1, any optimizer."""

CHANNEL_METHODS = ("auto", "bn", "l1", "l2", "activation", "recon", "random")
WEIGHT_METHODS = ("l1", "random", "percentile")

# (section title, note, keys) in the order cfg/default.yaml shows them
SECTIONS: tuple[tuple[str, str, tuple[Key, ...]], ...] = (
    ("Run", "", (
        K("mode", "prune", "str", ", ".join(MODES), "input", choices=MODES),
        K("model", "yolov8n.yaml", "str", "input: ultralytics .pt checkpoint or model yaml (yolov8n.yaml = random init)",
          "input"),
        K("data", None, "str", "dataset yaml: ultralytics YOLO format, or COCO format (train/val + train_json/val_json)",
          "input", optional=True),
        K("imgsz", 640, "int", "image size for training, validation, calibration and latency; a multiple of 32",
          "train", lo=32),
        K("batch", 16, "int", "batch size for training and validation; training steps the optimizer once per batch "
          "(ultralytics' nbs is set to batch: pass nbs=64 for its gradient accumulation)", "train", lo=1,
          modes=_ALL - {"bench", "export"}),
        K("workers", 2, "int", "dataloader workers", "train", lo=0, modes=_TRAIN),
        K("device", None, "str", "cpu, or CUDA devices such as 0 or 0,1 (multi-GPU training uses ultralytics DDP); "
          "empty: a GPU if any, else cpu", "train", optional=True, modes=_ALL - {"bench", "export"}),
        K("seed", 0, "int", "random seed for ranking (method=random), calibration sampling and training", "train",
          lo=0),
        K("project", None, "str", "parent folder of the run folder: project=P name=N writes to P/N (relative to the "
          "working folder, or absolute); empty: runs/<mode>/<name>", "run", optional=True),
        K("name", None, "str", "run folder name, default: the mode; an existing folder is never reused: name2, "
          "name3... unless exist_ok", "run", optional=True),
        K("exist_ok", False, "bool", "reuse an existing run folder instead of creating name2, name3...", "run"),
        K("verbose", False, "bool", "ultralytics' full training output and full tracebacks on errors; False: one "
          "progress line per training epoch", "run"),
    )),
    ("Sparsity training (mode=sparse, pipeline)", _SR_NOTE, (
        K("sr", 0.05, "float", "penalty strength, its meaning depends on sr_mode (above); 0.05 suits the default "
          "greg", "sparse", lo=0, modes=_SPARSE),
        K("sr_mode", "greg", "str", "greg (growing L2 on the channels target_macs would remove: the only mode that "
          "freed channels without collapsing on bccd, BENCHMARKS.md section 8), proximal (exact zeros by "
          "soft-thresholding), subgradient (the published L1 sub-gradient; frees nothing under AdamW)", "sparse",
          choices=("greg", "proximal", "subgradient"), modes=_SPARSE),
        K("sr_group", False, "bool", "proximal: group soft-thresholding over the channels pruning removes together "
          "(all BNs coupled to a channel: residual ends, C2f halves...)", "sparse", modes=_SPARSE),
        K("sr_head", True, "bool", "also penalise the Detect head's BatchNorms", "sparse", modes=_SPARSE),
        K("sr_schedule", "constant", "str", "how sr evolves over the epochs: constant, linear (decays to 0), cosine "
          "(decays to 0), ramp (rises to sr over the first half)", "sparse",
          choices=("constant", "linear", "cosine", "ramp"), modes=_SPARSE),
        K("greg_ramp", 0.5, "float", "greg: fraction of the sparse training over which the penalty grows; the chosen "
          "channels are 0 afterwards, in (0, 1]", "sparse", lo=0, hi=1, bounds="(]", modes=_SPARSE),
        K("gamma_threshold", 0.01, "float", "|gamma| below this counts as near zero; channels whose coupled gammas "
          "are all below it are \"free\" (logged per epoch, removed first by the pipeline's prune stage)", "sparse",
          lo=0, modes=_SPARSE),
        K("epochs", 10, "int", "training epochs for mode=sparse and mode=finetune", "train", lo=0,
          modes=frozenset({"sparse", "finetune", "demo"})),
    )),
    ("Pruning (mode=prune, pipeline)", "", (
        K("method", None, "str", "prune/pipeline: channel ranking auto (the default: recon with data=, bn without), "
          "bn (|BN gamma|), l1, l2 (filter norms), activation (mean |activation| on data images), recon (error left "
          "after least-squares compensation, on data images), random; sparsify: weight ranking l1 (smallest |w|, the "
          "default), random, percentile (below the amount-th percentile of |w|)", "prune", optional=True,
          choices=CHANNEL_METHODS, mode_choices={"sparsify": WEIGHT_METHODS}, modes=_GREG | {"sparsify", "sensitivity"}),
        K("target_macs", None, "float", "fraction of the original MACs to keep, in (0, 1]; empty: 0.5, except prune "
          "with threshold= (only the free channels go); also greg's target", "prune", optional=True, lo=0, hi=1,
          bounds="(]", modes=_GREG),
        K("threshold", None, "float", "prune: first remove every channel whose coupled BN gammas are all below this, "
          "folding its constant output into its consumers (lossless for gammas at 0), then rank the rest to reach "
          "target_macs; pipeline: defaults to gamma_threshold after proximal/greg sparse training", "prune",
          optional=True, lo=0, bounds="()", modes=_PRUNE),
        K("ratio", None, "float", "fraction of prunable channels to remove, in [0, 1); when set it replaces "
          "target_macs", "prune", optional=True, lo=0, hi=1, bounds="[)", modes=_PRUNE),
        K("global_pruning", True, "bool", "rank channels across all layers (True) or remove the same fraction in "
          "every layer (False)", "prune", modes=_PRUNE),
        K("max_layer_ratio", 0.75, "float", "no layer loses more than this fraction of its channels, in (0, 1)",
          "prune", lo=0, hi=1, bounds="()", modes=_GREG),
        K("round_to", 8, "int|auto", "keep channel counts multiples of this (hardware-friendly widths); auto: per "
          "layer, the multiple its convs run fastest at on `runtime` (measured latency table); null for none",
          "prune", optional=True, lo=1, modes=_GREG),
        K("steps", "auto", "int|auto", "pruning increments toward the target; in a pipeline each increment is followed "
          "by a short fine-tune of step_epochs (on top of finetune_epochs); auto: in a pipeline a trial prune to the "
          "target picks 1 step if it keeps >= 75% of the mAP, else 2-4, and finetune_epochs is spread over them "
          "(same total epochs; BENCHMARKS.md section 10); prune and sparsify: 1", "prune", lo=1,
          modes=_PRUNE | _STEPPED),
        K("calib_images", 64, "int", "images from the data's train split for method=activation|recon, compensate, "
          "recalibrate and allocation (the sensitivity probes use the first 32); export int8=True: the quantization's "
          "calibration images (ultralytics' fraction= takes that fraction of the split instead), and with "
          "max_map_drop= also the number of val-split images the accuracy control scores each candidate on", "prune", lo=0,
          modes=_PRUNE | {"sensitivity", "sparsify", "export"}),
        K("compensate", "lstsq_seq", "str", "with data=: how the pruned model makes up for removed channels on "
          "calib_images: lstsq_seq (refit every conv layer by layer toward the dense model's outputs), lstsq (refit "
          "the consumers of removed channels, one shot), mean (bias only), none; sparsify: anything but none "
          "corrects every BatchNorm's running mean/variance for the zeroed weights", "prune",
          choices=("lstsq_seq", "lstsq", "mean", "none", True, False), modes=_PRUNE | {"sparsify"}),
        K("recalibrate", True, "bool|str", "with data=: re-estimate every BatchNorm's statistics on calib_images "
          "after pruning: True/match (moment matching to the dense model), reset (EagleEye: plain re-estimation), "
          "False", "prune", choices=(True, False, "match", "reset"), modes=_PRUNE),
        K("allocation", "auto", "str", "how the removal is spread over channel groups: auto (sensitivity with data= "
          "or sensitivity=, else global), global (one score threshold), sensitivity (least predicted loss per group "
          "at the MACs target; needs data= or sensitivity=), search (best of search_candidates random allocations, "
          "scored on calib_images)", "prune", choices=("auto", "global", "sensitivity", "search"), modes=_PRUNE),
        K("sensitivity", None, "str", "a sensitivity.csv (yolo-prune sensitivity) for allocation=sensitivity|search "
          "instead of measuring", "prune", optional=True, modes=_PRUNE),
        K("search_candidates", 16, "int", "allocation=search: random per-group allocations tried (plus the global and "
          "sensitivity ones)", "prune", lo=0, modes=_PRUNE),
        K("sensitivity_validate", 0, "int", "mode=sensitivity: groups also pruned for real and validated (mAP), to "
          "report the proxy's rank correlation", "prune", lo=0, modes=frozenset({"sensitivity"})),
        K("tolerance", 0.03, "float", "accepted distance of the reached MACs fraction from target_macs", "prune",
          lo=0, hi=1, bounds="(]", modes=_PRUNE),
        K("portable", True, "bool", "save the pruned model in stock ultralytics classes only, so that YOLO(path) "
          "predicts, validates and exports where yolo-prune is not installed: both halves of every C2f/C3k2/C2/C2PSA "
          "split lose the same channels and attention blocks keep their input width; False: any widths (the free "
          "form), loading then needs yolo-prune; also greg's plan (sparse), which then zeroes what portable pruning "
          "removes", "prune", modes=frozenset({"prune", "pipeline", "sparse"})),
        K("target_latency", None, "float", "fraction of the dense model's latency to keep, in (0, 1], measured on "
          "`runtime` with `threads`; replaces target_macs (pipeline: reached in `steps` equal increments of the dense "
          "latency, one table of the input model; int8=True: on INT8 kernels)", "latency", optional=True, lo=0, hi=1,
          bounds="(]", modes=_PRUNE),
        K("target_ms", None, "float", "latency to reach in milliseconds on `runtime` with `threads`; replaces "
          "target_macs", "latency", optional=True, lo=0, bounds="(]", modes=_PRUNE),
        K("runtime", "onnxruntime", "str", "where latency targets and round_to=auto are measured: onnxruntime, "
          "openvino (pip install yolo-prune[openvino]), torch; pipeline/demo with int8=True: the runtime the INT8 "
          "stage exports for (openvino or onnxruntime) and measures on", "latency", choices=("onnxruntime", "openvino", "torch"),
          aliases={"onnx": "onnxruntime", "ort": "onnxruntime", "ov": "openvino", "pytorch": "torch"},
          modes=_PRUNE),
        K("threads", None, "int", "intra-op threads of the runtime for latency targets and mode=bench; empty: the "
          "runtime's default", "latency", optional=True, lo=0, modes=_PRUNE | {"bench"}),
        K("latency_aware", False, "bool|float", "with a latency target: rank channels by importance per millisecond "
          "they cost (True), or by importance / ms**latency_aware (a number in (0, 1]); False: by importance alone",
          "latency", lo=0, hi=1, bounds="(]", modes=frozenset({"prune"})),
        K("verify_latency", True, "bool", "with a latency target: export the pruned model and measure it against the "
          "dense one (the report shows predicted and measured latency)", "latency", modes=frozenset({"prune"})),
    )),
    ("Unstructured pruning (mode=sparsify; also steps, step_epochs, max_map_drop, method)", "", (
        K("amount", 0.5, "float", "fraction of the selected conv weights set to exactly 0, in [0, 1); with steps=N "
          "reached in N equal increments", "sparsify", lo=0, hi=1, bounds="[)", modes=frozenset({"sparsify"})),
        K("scope", "global", "str", "global (one ranking / threshold across all selected weights) or layer (every "
          "layer loses the same fraction)", "sparsify", choices=("global", "layer"), modes=frozenset({"sparsify"})),
        K("layers", "conv", "str", "conv (every conv except Detect's box/class output convs and DFL) or all (with the "
          "box/class output convs; never DFL)", "sparsify", choices=("conv", "all"), modes=frozenset({"sparsify"})),
    )),
    ("Fine-tuning (mode=finetune, pipeline)", "", (
        K("sparse_epochs", 0, "int", "pipeline: sparsity-training epochs before pruning; 0 (default) prunes the input "
          "directly and gives every epoch to the fine-tune, which measured best on bccd at an equal budget "
          "(BENCHMARKS.md section 7)", "stage", lo=0, modes=_PIPE),
        K("finetune_epochs", 10, "int", "pipeline: fine-tuning epochs after the last pruning step", "stage", lo=0,
          modes=_PIPE),
        K("step_epochs", 1, "int", "pipeline/sparsify with steps>1: fine-tuning epochs after each pruning increment",
          "stage", lo=0, modes=_STEPPED),
        K("max_map_drop", None, "float", "pipeline/sparsify with steps>1: stop early and keep the last model whose "
          "mAP50-95 dropped by at most this (absolute, 0.01 = one point); export with int8=True format=openvino: "
          "NNCF accuracy control keeps layers in FP32 until the INT8 mAP50-95, scored on calib_images val images, "
          "is at most this below FP32's (int8_report.json lists them)", "stage", optional=True, lo=0, hi=1,
          modes=_STEPPED | {"export"}),
        K("resume", False, "bool|str", "continue an interrupted run with its own settings (no data= needed): "
          "sparse/finetune from model=.../weights/last.pt (or the project/name run folder); pipeline/demo/sparsify "
          "from the last finished stage of model=<run folder> (or project/name); the API also takes the path of a "
          "last.pt", "run", modes=_TRAIN, label="bool | path"),
    )),
    ("Distillation (mode=sparse, finetune, pipeline)", "", (
        K("teacher", "auto", "str", "checkpoint to distil from while training (usually the dense model); auto: in a "
          "pipeline its input model (when it has the data's classes), in sparse/finetune none; none: no "
          "distillation", "distill", optional=True, modes=_TRAIN - {"sparsify"}),
        K("distill", "output", "str", "output: the student's class scores and DFL box distributions follow the "
          "teacher's, anchor by anchor; feature: ultralytics' feature distillation (1x1 projectors from the "
          "student's to the teacher's neck widths, weight dis); both", "distill", choices=("output", "feature", "both"),
          modes=_TRAIN - {"sparsify"}),
        K("distill_cls", 1.0, "float", "weight of the class-score term (binary KL per anchor and class, over the "
          "teacher's soft foreground count)", "distill", lo=0, modes=_TRAIN - {"sparsify"}),
        K("distill_box", 1.0, "float", "weight of the box term (KL of the DFL distributions per box side, weighted by "
          "the teacher's class confidence)", "distill", lo=0, modes=_TRAIN - {"sparsify"}),
        K("distill_temp", 1.0, "float", "temperature of both output terms, > 0 (the terms are multiplied by its "
          "square)", "distill", lo=0, bounds="(]", modes=_TRAIN - {"sparsify"}),
        K("distill_fade", "linear", "str", "linear: the distillation terms' weight falls from 1 in the first epoch to "
          "1/epochs in the last, so the labels have the last word (a teacher that is itself under-trained caps the "
          "student less: +1.1 points on an under-trained model, -0.2 on a converged one, BENCHMARKS.md section 10); "
          "none: constant weights", "distill", choices=("none", "linear"),
          modes=_TRAIN - {"sparsify"}),
        K("labels", True, "bool", "False: no ground-truth loss, train on images alone against the teacher's outputs "
          "(needs teacher)", "distill", modes=_TRAIN - {"sparsify"}),
        K("unlabeled", None, "str", "with labels=False: the training images (a folder or an image-list file) instead "
          "of the data's train split; validation still uses the labeled val split", "distill", optional=True,
          modes=_TRAIN - {"sparsify"}),
    )),
    ("Validation, benchmark, export", "", (
        K("conf", 0.001, "float", "confidence threshold for validation", "val", lo=0, hi=1,
          modes=frozenset({"val"})),
        K("iou", 0.7, "float", "NMS IoU threshold for validation", "val", lo=0, hi=1, modes=frozenset({"val"})),
        K("bench_runs", 50, "int", "timed forward passes per model in mode=bench", "bench", lo=1,
          modes=_STEPPED | {"bench"}),
        K("bench_warmup", 10, "int", "untimed warmup passes per model in mode=bench", "bench", lo=0,
          modes=_STEPPED | {"bench"}),
        K("backends", "torch,onnx", "str", "runtimes to time in mode=bench: torch (eager), onnx (onnxruntime), "
          "openvino", "bench", optional=True, modes=_STEPPED | {"bench"}),
        K("format", "onnx", "str", "export format for mode=export (any ultralytics export format)", "export",
          modes=frozenset({"export"})),
        K("int8", False, "bool|str", "mode=export: post-training INT8 quantization of the export, calibrated on "
          "calib_images images of data's train split (needs data=); format=openvino: NNCF (pip install "
          "yolo-prune[openvino]), writes <name>_int8_openvino_model/; format=onnx: onnxruntime QDQ, per-channel "
          "weights, writes <name>_int8.onnx; Detect's box/DFL decode and final concat stay float; pipeline/demo: "
          "a quantize stage after val exports the final model INT8 for `runtime` (openvino|onnxruntime) and reports "
          "its mAP, size and latency against the dense FP32 export; prune with target_latency/target_ms: the latency "
          "table is measured on INT8 kernels of `runtime` and the pruned model is verified as an INT8 export; auto (the "
          "demo's setting, demo only): True with runtime=openvino when openvino and nncf are installed, else False",
          "latency", choices=(True, False, "auto"), modes=_PRUNE | {"export"}),
        K("qat_epochs", 0, "int", "mode=export with int8=True: quantization-aware training first, for N epochs of "
          "ultralytics' loop on data's train split with NNCF fake-quantizers (pruned shapes kept; the run folder is "
          "<export folder>/qat; batch, workers, device and ultralytics train keys apply; unless given: optimizer=AdamW "
          "lr0=1e-5 warmup_epochs=0 mosaic=0, as ultralytics' defaults wreck a converged model), then the trained "
          "model is exported to INT8 (openvino: FakeQuantize IR; onnx: QDQ); 0: post-training quantization only",
          "export", lo=0, modes=frozenset({"export"})),
    )),
)

SCHEMA: dict[str, Key] = {k.name: k for _, _, keys in SECTIONS for k in keys}

_HEADER = """\
yolo-prune defaults. Override with `cfg=recipe.yaml` and `key=value` on the command line
(later wins: defaults < cfg= recipe < key=value). Any ultralytics train/val key (lr0, mosaic,
close_mosaic, amp, optimizer, ...) is accepted as well and passed through to the ultralytics trainer.
This file is generated from yolo_prune/options.py (the schema): edit the schema, then run
`python -m yolo_prune.options > cfg/default.yaml`."""


def choices(name: str, mode: str | None = None) -> tuple:
    """The string choices of a key (its bool values left out)."""
    return tuple(c for c in SCHEMA[name].choices_for(mode) if isinstance(c, str))


def defaults() -> dict[str, Any]:
    """Every key's default, as a fresh dict."""
    return {name: key.default for name, key in SCHEMA.items()}


def keys_for(mode: str) -> list[Key]:
    """The keys a mode reads, in schema order."""
    return [k for k in SCHEMA.values() if mode in k.modes]


def _yaml_value(value: Any) -> str:
    return "" if value is None else str(value)


def default_yaml() -> str:
    """cfg/default.yaml: every key with its default, its type and its doc line, by section."""
    lines = ["# " + line if line else "#" for line in _HEADER.splitlines()]
    for title, note, keys in SECTIONS:
        lines += ["", f"# {title} " + "-" * max(3, 95 - len(title))]
        lines += ["# " + line for line in note.splitlines()]
        for k in keys:
            lines.append(f"{k.name}: {_yaml_value(k.default)}  # ({k.type_label()}) {k.doc}".replace(":   #", ":  #"))
    return "\n".join(lines) + "\n"


def suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------- reading values
def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _bool(key: Key, value: Any) -> bool:
    if isinstance(value, str):
        value = {"true": True, "false": False}.get(value.strip().lower(), value)
    if not isinstance(value, bool):
        raise UsageError(f"{key.name}={value!r} must be True or False")
    return value


def _in_range(key: Key, value: float) -> None:
    lo_bad = key.lo is not None and (value <= key.lo if key.bounds[0] == "(" else value < key.lo)
    hi_bad = key.hi is not None and (value >= key.hi if key.bounds[1] == ")" else value > key.hi)
    if lo_bad or hi_bad:
        hi = key.hi if key.hi is not None else "inf"
        raise UsageError(f"{key.name}={value} is out of range: it must be in {key.bounds[0]}{key.lo}, {hi}{key.bounds[1]}")


def _number(key: Key, value: Any, kind: type) -> int | float:
    if isinstance(value, str):
        value = _literal(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise UsageError(f"{key.name}={value!r} must be {'an integer' if kind is int else 'a number'}")
    value = kind(value)
    _in_range(key, value)
    return value


def _choice(key: Key, value: Any, mode: str | None) -> Any:
    options = key.choices_for(mode)
    if isinstance(value, str):
        text = value.strip()
        text = key.aliases.get(text.lower(), text)
        words = [c for c in options if isinstance(c, str)]
        if text not in words and text.lower() in words:
            text = text.lower()
        if text in words:
            return text
        if any(isinstance(c, bool) for c in options) and text.lower() in ("true", "false"):
            return text.lower() == "true"
        value = text
    elif any(v is value for v in options if isinstance(v, bool)):
        return value
    words = [str(c) for c in options]
    where = f" for {mode}" if key.mode_choices and mode in key.mode_choices else ""
    raise UsageError(f"unknown {key.name} {value!r}{where}{suggest(str(value), words)}; choose one of {', '.join(words)}")


def coerce(name: str, value: Any, mode: str | None = None) -> Any:
    """``value`` read as key ``name`` declares it (strings from the command line, or typed values); raises a
    one-line :class:`UsageError` for a bad one."""
    key = SCHEMA[name]
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null") and key.optional):
        if key.optional or key.default is None:
            return None
        raise UsageError(f"{name} needs a value")
    if key.optional and key.kind not in ("str",) and isinstance(value, str) and value.strip().lower() == "none":
        return None
    if key.kind == "bool":
        return _bool(key, value)
    if key.kind in ("int", "float"):
        return _number(key, value, int if key.kind == "int" else float)
    if key.kind == "int|auto":
        return "auto" if str(value).strip().lower() == "auto" else _number(key, value, int)
    if key.kind == "bool|float":
        if isinstance(value, bool) or str(value).strip().lower() in ("true", "false"):
            return _bool(key, value)
        return _number(key, value, float)
    if key.kind == "bool|str":
        if isinstance(value, bool):
            return _choice(key, value, mode) if key.choices else value
        text = str(os.fspath(value) if isinstance(value, os.PathLike) else value).strip()
        if text.lower() in ("true", "false", "none", ""):
            return text.lower() == "true"
        if not key.choices:
            return text
    if name == "unlabeled" and isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if key.choices or key.mode_choices:
        return _choice(key, value, mode)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if name == "backends" and isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        if key.name in ("teacher",) and value is False:
            return None
        if isinstance(value, (int, float)) and key.name in ("device", "name", "project", "backends"):
            return str(value)
        raise UsageError(f"{name}={value!r} must be {'a path' if key.name in ('teacher', 'unlabeled') else 'text'}")
    return value.strip()


def check(cfg: dict[str, Any], mode: str | None = None) -> dict[str, Any]:
    """Read every schema key of ``cfg`` by its type (in place) and check the combinations; return ``cfg``."""
    mode = mode or cfg.get("mode")
    for name in [n for n in cfg if n in SCHEMA]:
        cfg[name] = coerce(name, cfg[name], mode)
    if "method" in cfg and cfg["method"] is None:
        cfg["method"] = SCHEMA["method"].choices_for(mode)[0]
    if cfg.get("target_latency") is not None and cfg.get("target_ms") is not None:
        raise UsageError("give target_latency (a fraction of the dense latency) or target_ms, not both")
    if cfg.get("imgsz") and cfg["imgsz"] % 32:
        new = int(math.ceil(cfg["imgsz"] / 32) * 32)
        LOGGER.warning("imgsz=%s is not a multiple of 32, using imgsz=%s", cfg["imgsz"], new)
        cfg["imgsz"] = new
    return cfg


def target_macs(cfg: Mapping[str, Any]) -> float | None:
    """``target_macs`` of a configuration: empty means 0.5, except for ``prune`` with a ``threshold`` (then only
    the free channels are removed). The one place this rule lives."""
    if cfg.get("target_macs") is not None:
        return cfg["target_macs"]
    return None if cfg.get("mode") == "prune" and cfg.get("threshold") is not None else 0.5


# --------------------------------------------------------------------------------------------- option objects
class Options:
    """Base of the frozen option objects: validated on creation, ``replace(**kw)`` gives a changed copy."""

    GROUP = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name)))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def make(cls, options: Options | Mapping[str, Any] | None = None, **overrides: Any):
        """``options`` (an instance, a mapping of its keys, or None for the defaults) with ``overrides``."""
        base = dict(dataclasses.asdict(options) if isinstance(options, Options) else options or {})
        base.update(overrides)
        unknown = set(base) - set(cls.names())
        if unknown:
            bad = sorted(unknown)[0]
            raise UsageError(f"unknown {cls.__name__} key {bad!r}{suggest(bad, cls.names())}")
        return cls(**base)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _options_class(class_name: str, group: str, doc: str, *, extra: Iterable[str] = ()) -> type:
    fields = [(k.name, Any, dataclasses.field(default=k.default)) for k in SCHEMA.values()
              if k.group == group or k.name in extra]
    cls = dataclasses.make_dataclass(class_name, fields, bases=(Options,), frozen=True,
                                     namespace={"GROUP": group, "__doc__": doc, "__module__": __name__})
    return cls


PruneOptions = _options_class("PruneOptions", "prune", "How channels are ranked, allocated, removed and made up for "
                              "(the keys of section Pruning).")
LatencyOptions = _options_class("LatencyOptions", "latency", "Latency targets: runtime, threads, target.")
TrainOptions = _options_class("TrainOptions", "train", "What every training, calibration and validation shares.")
SparseOptions = _options_class("SparseOptions", "sparse", "The sparsity penalty of the sparse stage.")
DistillOptions = _options_class("DistillOptions", "distill", "Distillation from a teacher while training.")
SparsifyOptions = _options_class("SparsifyOptions", "sparsify", "Unstructured (weight) pruning.")
StageOptions = _options_class("StageOptions", "stage", "The epochs of a stepped run's stages and its mAP guard.")
BenchOptions = _options_class("BenchOptions", "bench", "The latency benchmark at the end of a run.")
RunOptions = _options_class("RunOptions", "run", "The run folder and how a run starts.", extra=())

OPTION_CLASSES = (PruneOptions, LatencyOptions, TrainOptions, SparseOptions, DistillOptions, SparsifyOptions,
                  StageOptions, BenchOptions, RunOptions)


def split_options(overrides: Mapping[str, Any], *classes: type) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Route keyword ``overrides`` to the option classes that own them; also return what none owns."""
    routed: list[dict[str, Any]] = [{} for _ in classes]
    rest: dict[str, Any] = {}
    for name, value in overrides.items():
        for i, cls in enumerate(classes):
            if name in cls.names():
                routed[i][name] = value
                break
        else:
            rest[name] = value
    return routed, rest


class Settings:
    """Option objects by group (``settings.prune``, ``settings.train``...), built from typed objects and keyword
    overrides by :func:`settings`."""

    def __init__(self, objects: Iterable[Options]):
        self._objects = list(objects)
        for obj in self._objects:
            setattr(self, obj.GROUP, obj)

    def with_(self, *changed: Options) -> Settings:
        """A copy with ``changed`` objects in place of those of their groups."""
        new = {type(o): o for o in self._objects}
        new.update({type(o): o for o in changed})
        return Settings(new.values())

    def flat(self) -> dict[str, Any]:
        """Every key of every group in one dict."""
        out: dict[str, Any] = {}
        for obj in self._objects:
            out.update(obj.to_dict())
        return out


def settings(classes: Sequence[type], options: Iterable[Any] = (), overrides: Mapping[str, Any] | None = None, *,
             where: str) -> Settings:
    """Typed ``options`` (instances of ``classes``) with keyword ``overrides`` routed to the class owning each key;
    an unknown key is a one-line :class:`UsageError` naming ``where``."""
    result, rest = settings_and_rest(classes, options, overrides, where=where)
    if rest:
        bad = sorted(rest)
        known = [n for c in classes for n in c.names()]
        raise UsageError(f"unknown {where} option(s): {', '.join(bad)}{suggest(bad[0], known)}")
    return result


def settings_and_rest(classes: Sequence[type], options: Iterable[Any] = (), overrides: Mapping[str, Any] | None = None,
                      *, where: str) -> tuple[Settings, dict[str, Any]]:
    """As :func:`settings`, but the keys no class owns are returned (the training functions pass them on to
    ultralytics, which checks them)."""
    given: dict[type, Any] = {}
    for obj in options:
        if type(obj) not in classes:
            names = ", ".join(c.__name__ for c in classes)
            raise UsageError(f"{where} takes option objects of types {names}, not {type(obj).__name__}")
        given[type(obj)] = obj
    routed, rest = split_options(overrides or {}, *classes)
    return Settings(cls.make(given.get(cls), **r) for cls, r in zip(classes, routed)), rest


if __name__ == "__main__":  # python -m yolo_prune.options > cfg/default.yaml
    print(default_yaml(), end="")
