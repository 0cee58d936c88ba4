"""Fine-grained (unstructured) pruning: single conv weights set to zero with ``torch.nn.utils.prune``.

Everything about unstructured sparsity lives here:

* **masks** (:func:`apply_masks`): ``l1`` (smallest |w|) and ``random`` through ``torch.nn.utils.prune``'s
  ``l1_unstructured`` / ``random_unstructured`` per layer (``scope=layer``) or ``global_unstructured`` across
  layers (``scope=global``); ``percentile`` is :class:`PercentileUnstructured`, a ``BasePruningMethod`` that cuts
  every weight whose |w| lies below a percentile of |w| (per layer, or one threshold across layers, as in the
  classic magnitude-threshold recipe). Weights that are already exactly 0 count as pruned, so ``amount`` is the
  fraction of the selected weights that are 0 afterwards (exactly, for ``l1`` and ``random``);
* **permanence** (:func:`make_permanent`): ``prune.remove`` folds every mask into a plain ``weight`` tensor, so the
  checkpoint loads with ``YOLO(path)`` and exports as any ultralytics model;
* **zeros that survive training** (:class:`KeepZerosMixin`): a sparsified model carries the names of its
  sparsified parameters in the attribute :data:`SPARSITY_ATTR`, which travels inside every checkpoint (the EMA
  ultralytics saves is a deep copy of the model). The fine-tuning trainer derives the masks from the zero pattern
  of those parameters when it builds the model from the checkpoint on disk - also in a DDP worker and on
  ``resume`` - and re-applies them to the model and the EMA after every optimizer step;
* **the stage** (:func:`sparsify`): load -> mask -> remove -> (fine-tune, in ``steps``) -> save -> report,
  with the pipeline's run-folder state (:class:`yolo_prune.pipeline._State`) for ``resume``.

Unstructured zeros keep every tensor's shape: dense runtimes (PyTorch, onnxruntime on CPU) do exactly the
same work, so the model is not faster. The saving is in the compressed checkpoint, on sparse-aware runtimes
and hardware, and in combination with channel pruning (``yolo-prune prune`` first).
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.utils.prune as tprune
from torch import nn

from .errors import UsageError
from .results import Result, markdown_table, table

LOGGER = logging.getLogger("yolo_prune")

SCOPES = ("global", "layer")
METHODS = ("l1", "random", "percentile")
LAYER_SETS = ("conv", "all")
#: Attribute of a sparsified ``DetectionModel``: ``{"params": [parameter names], "amount", "scope", "method",
#: "layers"}``. Pickled with the model, so it is in every checkpoint written afterwards (including ultralytics').
SPARSITY_ATTR = "yolo_prune_sparsity"

SPEED_NOTE = ("Unstructured zeros do not make a dense runtime faster: every tensor keeps its shape and "
              "PyTorch or onnxruntime on CPU still multiply by each zero, so expect a latency ratio near 1 "
              "(differences measured on a busy machine are noise). The saving is the compressed checkpoint; "
              "speed needs a sparse-aware runtime or hardware, or channel pruning (yolo-prune prune).")


# --------------------------------------------------------------------------------------------- the custom method
def percentile_threshold(values: torch.Tensor, q: float) -> float:
    """``numpy.percentile(values, q)`` with numpy's default linear interpolation, computed in float64 by torch."""
    v = values.detach().flatten().double()
    n = v.numel()
    if n == 0:
        raise ValueError("percentile of an empty tensor")
    pos = q / 100.0 * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    v_lo = torch.kthvalue(v, lo + 1).values
    v_hi = torch.kthvalue(v, hi + 1).values if hi != lo else v_lo
    return float(v_lo + (v_hi - v_lo) * (pos - lo))


class PercentileUnstructured(tprune.BasePruningMethod):
    """Prune every entry whose magnitude is below the ``q``-th percentile of the magnitudes.

    The threshold is ``numpy.percentile(|t|, q)`` (linear interpolation); entries with ``|t| < threshold``
    are cut. Applied to one layer it is the classic per-layer magnitude threshold; through
    ``prune.global_unstructured`` it is one threshold across all the layers given.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, q: float):
        if not 0 <= q < 100:
            raise ValueError(f"percentile q={q} must be in [0, 100)")
        self.q = float(q)

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if t.numel() and self.q > 0:
            mask[t.abs() < percentile_threshold(t.abs(), self.q)] = 0
        return mask

    @classmethod
    def apply(cls, module: nn.Module, name: str, q: float, importance_scores: torch.Tensor | None = None) -> Any:
        return super().apply(module, name, q=q, importance_scores=importance_scores)


def percentile_unstructured(module: nn.Module, name: str, q: float,
                            importance_scores: torch.Tensor | None = None) -> nn.Module:
    """Like ``prune.l1_unstructured``: cut the entries of ``module.<name>`` below the ``q``-th percentile of |w|."""
    PercentileUnstructured.apply(module, name, q=q, importance_scores=importance_scores)
    return module


# --------------------------------------------------------------------------------------------- which weights
def prunable_convs(model: nn.Module, layers: str = "conv") -> list[tuple[str, nn.Conv2d]]:
    """``(name, conv)`` of every conv whose weight may be sparsified, in model order.

    ``layers=conv``: every ``nn.Conv2d`` except the Detect head's final box/class convs and the DFL (as in
    structured pruning: :func:`yolo_prune.pruning.graph.protected_layers`); ``layers=all`` adds the box/class
    output convs. The DFL is never touched (a fixed, untrained integral).
    """
    if layers not in LAYER_SETS:
        raise UsageError(f"unknown layers {layers!r}; choose one of {', '.join(LAYER_SETS)}")
    head = model.model[-1]
    never = {id(m) for m in head.dfl.modules()} if hasattr(head, "dfl") else set()
    skip = set(never)
    if layers == "conv":
        from .pruning.graph import protected_layers

        for layer in protected_layers(model):
            skip |= {id(m) for m in layer.modules()}
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in skip]


@dataclasses.dataclass
class LayerSparsity:
    """Zeros of one sparsified weight tensor."""

    name: str
    params: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0


def layer_sparsity(model: nn.Module, names: Iterable[str] | None = None, *,
                   layers: str = "conv") -> list[LayerSparsity]:
    """Per-layer zeros of the listed parameter names (default: the weights of :func:`prunable_convs`)."""
    params = dict(model.named_parameters())
    if names is None:
        names = [f"{n}.weight" for n, _ in prunable_convs(model, layers)]
    rows = []
    for n in names:
        p = params.get(n)
        if p is not None:
            rows.append(LayerSparsity(n.removesuffix(".weight"), p.numel(), int((p.detach() == 0).sum())))
    return rows


def global_sparsity(rows: Sequence[LayerSparsity]) -> float:
    total = sum(r.params for r in rows)
    return sum(r.zeros for r in rows) / total if total else 0.0


def count_nonzero(model: nn.Module) -> tuple[int, int]:
    """(non-zero parameters, all parameters) of ``model``."""
    nz = total = 0
    for p in model.parameters():
        total += p.numel()
        nz += int(torch.count_nonzero(p.detach()))
    return nz, total


# --------------------------------------------------------------------------------------------- masks
def _check(amount: Any, scope: str, method: str, layers: str) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount):
        raise UsageError(f"amount={amount!r} must be a number")
    if not 0 <= amount < 1:
        raise UsageError(f"amount={amount} is out of range: it must be in [0, 1)")
    if scope not in SCOPES:
        raise UsageError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r} for sparsify; choose one of {', '.join(METHODS)}")
    if layers not in LAYER_SETS:
        raise UsageError(f"unknown layers {layers!r}; choose one of {', '.join(LAYER_SETS)}")
    return float(amount)


def apply_masks(model: nn.Module, *, amount: float, scope: str = "global", method: str = "l1",
                layers: str = "conv", seed: int = 0) -> list[tuple[str, nn.Conv2d]]:
    """Register ``torch.nn.utils.prune`` masks on the selected conv weights of ``model`` (in place).

    Returns the ``(name, conv)`` pairs that now carry a ``weight_mask`` / ``weight_orig`` reparametrisation;
    :func:`make_permanent` removes it. ``l1`` / ``random``: weights that are already 0 are registered as pruned
    first (``prune.custom_from_mask``), then ``round(amount * n)`` minus those are cut, per layer (``scope=layer``,
    ``n`` = the layer's weights) or across the selection (``scope=global``). ``percentile``: per layer, or one
    global threshold, at the ``100 * amount``-th percentile of |w|.
    """
    amount = _check(amount, scope, method, layers)
    convs = prunable_convs(model, layers)
    if amount == 0 or not convs:
        return []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method == "percentile":
            if scope == "global":
                tprune.global_unstructured([(m, "weight") for _, m in convs], PercentileUnstructured, q=100 * amount)
            else:
                for _, m in convs:
                    percentile_unstructured(m, "weight", q=100 * amount)
            return convs
        zeros = {}
        for _, m in convs:
            zeros[m] = int((m.weight == 0).sum())
            tprune.custom_from_mask(m, "weight", mask=m.weight != 0)
        if scope == "global":
            total = sum(m.weight.numel() for _, m in convs)
            k = round(amount * total) - sum(zeros.values())
            if k > 0:
                cls = tprune.L1Unstructured if method == "l1" else tprune.RandomUnstructured
                tprune.global_unstructured([(m, "weight") for _, m in convs], cls, amount=k)
        else:
            fn = tprune.l1_unstructured if method == "l1" else tprune.random_unstructured
            for _, m in convs:
                k = round(amount * m.weight.numel()) - zeros[m]
                if k > 0:
                    fn(m, "weight", amount=k)
    return convs


def make_permanent(model: nn.Module) -> int:
    """``prune.remove`` on every pruned tensor of ``model``: plain parameters holding the zeros. Returns the count."""
    n = 0
    for m in model.modules():
        for hook in [h for h in m._forward_pre_hooks.values() if isinstance(h, tprune.BasePruningMethod)]:
            tprune.remove(m, hook._tensor_name)
            n += 1
    return n


def sparsify_module(model: nn.Module, *, amount: float, scope: str = "global", method: str = "l1",
                    layers: str = "conv", seed: int = 0, calib: torch.Tensor | None = None) -> list[LayerSparsity]:
    """Mask, make permanent and mark ``model`` (in place); returns the per-layer sparsity of the selection.

    The mark (:data:`SPARSITY_ATTR`) lists the sparsified parameters, so that fine-tuning keeps their zeros.
    A model sparsified before keeps its earlier list too (``amount`` is the total fraction, zeros stay zeros).
    With ``calib`` images, every BatchNorm's running statistics are corrected for what the zeros changed in its
    input (:func:`correct_batchnorm`).
    """
    reference = batchnorm_input_stats(model, calib) if calib is not None else None
    apply_masks(model, amount=amount, scope=scope, method=method, layers=layers, seed=seed)
    make_permanent(model)
    if reference is not None:
        correct_batchnorm(model, reference, calib)
    names = [f"{n}.weight" for n, _ in prunable_convs(model, layers)]
    old = getattr(model, SPARSITY_ATTR, None) or {}
    merged = list(dict.fromkeys([*old.get("params", []), *names]))
    setattr(model, SPARSITY_ATTR, {"params": merged, "amount": float(amount), "scope": scope, "method": method,
                                   "layers": layers})
    return layer_sparsity(model, merged)


# --------------------------------------------------------------------------------------------- BN correction
def _batchnorms(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.running_var is not None]


class _Moments:
    """Running per-channel mean and (biased) variance of a layer input over (N, H, W), in float64."""

    def __init__(self) -> None:
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().double()
        self.n += x.numel() // x.shape[1]
        self.s = self.s + x.sum((0, 2, 3))
        self.ss = self.ss + (x * x).sum((0, 2, 3))
        mean = self.s / self.n
        return mean, (self.ss / self.n - mean * mean).clamp_min(0)


@torch.no_grad()
def batchnorm_input_stats(model: nn.Module, images: torch.Tensor, *, batch: int = 8) -> dict[str, list[tuple]]:
    """Per-channel mean and variance of every BatchNorm's input on ``images`` (eval mode, in batches of ``batch``):
    ``{name: [(mean, var) over the first 1, 2, ... batches]}`` (cumulative, as :func:`correct_batchnorm` needs)."""
    from .pruning.calibration import run_with_hooks

    moments = {m: _Moments() for _, m in _batchnorms(model)}
    out: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in moments}
    run_with_hooks(model, images, list(moments), lambda mod, i, o: out[mod].append(moments[mod].add(i[0])),
                   batch=batch)
    return {n: out[m] for n, m in _batchnorms(model) if out.get(m)}


@torch.no_grad()
def correct_batchnorm(model: nn.Module, reference: dict[str, list[tuple]], images: torch.Tensor, *,
                      batch: int = 8) -> int:
    """Re-fit each BatchNorm's running statistics so that its output keeps the mean and variance it had before pruning.

    ``reference`` holds the per-channel input mean ``m0`` and variance ``v0`` of every BatchNorm before the weights
    were zeroed (:func:`batchnorm_input_stats`, same ``images`` and ``batch``). Running ``images`` through the pruned
    model in order, each BatchNorm measures its new input moments ``m``, ``v`` just before it normalises and takes
    ``running_mean = m - (m0 - running_mean) * k`` and ``running_var = (running_var + eps) * k**2 - eps`` with
    ``k = sqrt(v / v0)``: on these images its output has the dense model's per-channel mean and variance again,
    and the layers after it see corrected activations. Moments accumulate over the batches and are compared with
    the reference over the same batches, so an unchanged model keeps its statistics exactly. No weight changes.
    Returns the number of corrected BatchNorms.
    """
    original = {m: (m.running_mean.clone(), m.running_var.clone()) for _, m in _batchnorms(model)}
    names = {m: n for n, m in _batchnorms(model)}
    moments = {m: _Moments() for m in original}
    index = [0]

    def pre(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        ref = reference.get(names[mod])
        if not ref:
            return
        mean, var = moments[mod].add(inputs[0])
        mean0, var0 = ref[min(index[0], len(ref) - 1)]
        rm, rv = (t.double() for t in original[mod])
        k = torch.where(var0 > 1e-12, (var / var0.clamp_min(1e-12)).sqrt(), torch.ones_like(var0)).clamp(1e-2, 1e2)
        mod.running_mean.copy_(mean - (mean0 - rm) * k)
        mod.running_var.copy_(((rv + mod.eps) * k * k - mod.eps).clamp_min(0))

    handles = [m.register_forward_pre_hook(pre) for m in original]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for index[0], i in enumerate(range(0, len(images), batch)):
            model(images[i:i + batch].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sum(1 for m in original if reference.get(names[m]))


# --------------------------------------------------------------------------------------------- training
def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: bool tensor, True where the weight is pruned}`` of a sparsified model, from its zeros.

    Empty for a model without the :data:`SPARSITY_ATTR` mark (a dense model keeps its exact zeros free).
    """
    info = getattr(model, SPARSITY_ATTR, None)
    if not info:
        return {}
    params = dict(model.named_parameters())
    return {n: (params[n].detach() == 0) for n in info.get("params", []) if n in params}


@torch.no_grad()
def apply_zero_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Set the masked weights of ``model`` back to exactly 0 (in place). Masks move to the weights' device once."""
    params = dict(model.named_parameters())
    for name, pruned in masks.items():
        p = params.get(name)
        if p is None or p.shape != pruned.shape:
            continue
        if pruned.device != p.device:
            pruned = masks[name] = pruned.to(p.device)
        p.masked_fill_(pruned, 0)


class KeepZerosMixin:
    """Trainer mixin: the weights a sparsified checkpoint pruned stay exactly 0 through training.

    Put it first in the bases (``class T(KeepZerosMixin, KeepArchitectureMixin, DetectionTrainer)``).
    :meth:`get_model` runs wherever ultralytics builds the model from the checkpoint on disk (``args.model``: the
    input checkpoint, a DDP worker's copy, or ``last.pt`` on ``resume``); it derives the masks from the zeros of
    the parameters the checkpoint's :data:`SPARSITY_ATTR` lists. :meth:`optimizer_step` re-applies them to the
    model and the EMA after every step, so ``last.pt`` / ``best.pt`` (the EMA) hold the same zeros, and the mark
    travels on inside them. A model without the mark trains as usual.
    """

    zero_masks: dict[str, torch.Tensor] = {}

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        info = getattr(weights, SPARSITY_ATTR, None) if isinstance(weights, nn.Module) else None
        self.zero_masks = {}
        if info:
            if getattr(model, SPARSITY_ATTR, None) is None:  # ultralytics rebuilt the model (new class count)
                setattr(model, SPARSITY_ATTR, copy.deepcopy(info))
            self.zero_masks = zero_masks(model)
            n = sum(int(m.sum()) for m in self.zero_masks.values())
            from ultralytics.utils import LOGGER as ULOGGER

            ULOGGER.info(f"yolo-prune: keeping {n} pruned weights of {len(self.zero_masks)} sparsified layers at 0")
        return model

    def optimizer_step(self) -> None:
        super().optimizer_step()
        self.keep_zeros()

    def keep_zeros(self) -> None:
        """Re-apply the masks to the model (unwrapped from DDP) and to the EMA."""
        if not self.zero_masks:
            return
        from ultralytics.utils.torch_utils import unwrap_model

        apply_zero_masks(unwrap_model(self.model), self.zero_masks)
        ema = getattr(getattr(self, "ema", None), "ema", None)
        if ema is not None:
            apply_zero_masks(ema, self.zero_masks)


# --------------------------------------------------------------------------------------------- sizes
def checkpoint_sizes(path: str | Path, level: int = 9) -> tuple[int, int]:
    """(raw bytes, gzip bytes at ``level``) of a checkpoint file. torch stores tensors uncompressed, so gzip is
    where unstructured zeros become a real saving."""
    data = Path(path).read_bytes()
    return len(data), len(gzip.compress(data, compresslevel=level, mtime=0))


def _model_sizes(module: nn.Module, folder: Path) -> tuple[int, int]:
    """Sizes of ``module`` written as :func:`yolo_prune.models.save_checkpoint` writes it (fp16, no optimizer)."""
    from .models import save_checkpoint

    tmp = save_checkpoint(module, folder / ".size_probe.pt")
    try:
        return checkpoint_sizes(tmp)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- result
@dataclasses.dataclass
class SparsifyResult(Result):
    """What :func:`sparsify` did. ``str()`` prints the before/after table; ``model`` loads the checkpoint."""

    save_dir: Path
    checkpoint: Path
    amount: float
    scope: str
    method: str
    layers: str
    imgsz: int
    sparsity: float  # fraction of the selected conv weights that are 0
    sparsity_before: float
    selected_params: int
    params: int
    nonzero_before: int
    nonzero_after: int
    size_before: int
    size_after: int
    gzip_before: int
    gzip_after: int
    map50_95_before: float | None = None
    map50_95_after: float | None = None
    map50_before: float | None = None
    map50_after: float | None = None
    latency_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # backend -> [dense, sparse]
    kept_step: int = 1
    seconds: float = 0.0
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)
    layer_rows: list[LayerSparsity] = dataclasses.field(default_factory=list, repr=False)

    @property
    def model(self) -> Any:
        from .models import load_model

        return load_model(self.checkpoint)

    def comparison(self) -> list[tuple[str, Any, Any, Any]]:
        def row(label, a, b):
            return (label, a, b, (b / a) if a and b is not None else None)

        rows = [
            row("sparsity of selected weights", self.sparsity_before, self.sparsity),
            row("non-zero params (M)", self.nonzero_before / 1e6, self.nonzero_after / 1e6),
            row("checkpoint (MB)", self.size_before / 1e6, self.size_after / 1e6),
            row("gzip checkpoint (MB)", self.gzip_before / 1e6, self.gzip_after / 1e6),
        ]
        if self.map50_95_before is not None:
            rows.append(row("mAP50-95", self.map50_95_before, self.map50_95_after))
            rows.append(row("mAP50", self.map50_before, self.map50_after))
        for backend, (a, b) in self.latency_ms.items():
            rows.append(row(f"CPU latency {backend} (ms)", a, b))
        return rows

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layer_rows"}
        d["layers_sparsity"] = [{**dataclasses.asdict(r), "sparsity": r.sparsity} for r in self.layer_rows]
        d["table"] = [dict(zip(("metric", "before", "after", "ratio"), r)) for r in self.comparison()]
        d["speed_note"] = SPEED_NOTE
        return d

    def __str__(self) -> str:
        head = (f"SparsifyResult: amount={self.amount} scope={self.scope} method={self.method} layers={self.layers}, "
                f"{self.seconds:.1f} s\ncheckpoint: {self.checkpoint}")
        if len(self.steps) > 1:
            head += f" (step {self.kept_step} of {len(self.steps)})"
        return head + "\n" + table(self.comparison(), header=("", "before", "after", "ratio"))


# --------------------------------------------------------------------------------------------- the stage
def sparsify(
    model: Any,
    *,
    amount: float = 0.5,
    scope: str = "global",
    method: str = "l1",
    layers: str = "conv",
    data: str | Path | None = None,
    compensate: bool = True,
    calib_images: int = 32,
    steps: int = 1,
    step_epochs: int = 1,
    max_map_drop: float | None = None,
    imgsz: int = 640,
    batch: int = 16,
    workers: int = 2,
    device: str | None = None,
    seed: int = 0,
    bench: bool = True,
    bench_runs: int = 30,
    bench_warmup: int = 5,
    backends: Sequence[str] = ("torch", "onnx"),
    project: str | Path | None = None,
    name: str | None = None,
    exist_ok: bool = False,
    resume: bool = False,
    verbose: bool = False,
    train_args: dict[str, Any] | None = None,
) -> SparsifyResult:
    """Set ``amount`` of the conv weights of ``model`` to zero (unstructured), permanently, and report.

    Args:
        model: a ``.pt`` checkpoint (dense, or channel-pruned by yolo-prune), a model yaml, a ``YOLO`` object or a
            ``DetectionModel``; it is never modified.
        amount: fraction of the selected weights that are 0 afterwards, in [0, 1).
        scope: ``global`` (one ranking / threshold across all selected weights) or ``layer`` (each layer by the
            same amount).
        method: ``l1`` (smallest |w|), ``random``, or ``percentile`` (cut below the percentile of |w|).
        layers: ``conv`` (every conv but Detect's box/class outputs and the DFL) or ``all`` (with the box/class
            outputs).
        data: a dataset yaml: mAP before and after, the BatchNorm correction and the fine-tuning between steps.
        compensate, calib_images: with ``data``, correct every BatchNorm's running statistics for the zeroed
            weights on ``calib_images`` train images (:func:`correct_batchnorm`); no weight changes.
        steps, step_epochs, max_map_drop: reach ``amount`` in ``steps`` equal increments (``amount * k / steps``),
            each followed (when ``steps > 1``) by ``step_epochs`` epochs of fine-tuning that keeps the zeros;
            stop at the first step whose mAP50-95 is more than ``max_map_drop`` below the dense model's and keep
            the step before.
        bench, bench_runs, bench_warmup, backends: measure CPU latency, dense against sparse (it does not
            improve: see :data:`SPEED_NOTE`).
        project, name, exist_ok, resume: the run folder ``project/name`` (default ``runs/sparsify/sparsify``);
            ``resume=True`` continues an interrupted run from its ``sparsify.json``.
        train_args: extra ultralytics train keys for the fine-tuning steps.

    The run folder gets ``weights/sparse.pt`` (plain tensors with zeros: ``YOLO(path)`` loads it,
    ``yolo-prune finetune`` keeps its zeros), ``report.json`` / ``report.md``, ``layers.csv``, ``sparsity.png``
    (per-layer bar chart) and ``weight_hist.png`` (weights of a few layers before and after).
    """
    from .io import run_dir, run_path, write_yaml
    from .models import load_model
    from .pipeline import _State

    amount = _check(amount, scope, method, layers)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps={steps!r} must be an integer >= 1")
    if isinstance(step_epochs, bool) or not isinstance(step_epochs, int) or step_epochs < 0:
        raise UsageError(f"step_epochs={step_epochs!r} must be an integer >= 0")
    tune = steps > 1 and step_epochs > 0
    if (tune or max_map_drop is not None) and data is None:
        raise UsageError("sparsify with steps>1 (fine-tuning between steps) or max_map_drop needs data=<dataset yaml>")
    backends = tuple(b for b in (backends or ()) if b)
    t_start = time.perf_counter()
    calib = None
    if data is not None:
        from .data import resolve_data

        spec = resolve_data(data)  # fails early on a bad dataset
        if compensate and calib_images > 0:
            from .pruning.calibration import load_calibration_images

            calib = load_calibration_images(spec.train_images, n=calib_images, imgsz=imgsz, seed=seed)

    if resume:
        save_dir = run_path(project, "sparsify", name)
        if not (save_dir / "sparsify.json").is_file():
            raise UsageError(f"resume=True but {save_dir} holds no sparsify.json to resume from")
    else:
        save_dir = run_dir(project, "sparsify", name, exist_ok=exist_ok)
    args = dict(model=str(model), amount=amount, scope=scope, method=method, layers=layers, data=data,
                compensate=calib is not None, calib_images=calib_images, steps=steps, step_epochs=step_epochs,
                max_map_drop=max_map_drop, imgsz=imgsz, batch=batch, seed=seed)
    if not resume:
        write_yaml(save_dir / "args.yaml", args)
    state = _State(save_dir / "sparsify.json", args, load=resume)  # a reused folder (exist_ok) starts afresh
    val_kw = dict(imgsz=imgsz, batch=batch, device=device)

    source = load_model(model)
    dense = copy.deepcopy(source.model).float().cpu().eval()

    # baseline: the dense model's size and mAP
    base = state.done("baseline")
    if base is None:
        size, gz = _model_sizes(dense, save_dir)
        nz, total = count_nonzero(dense)
        base = {"size": size, "gzip": gz, "nonzero": nz, "params": total, "map50_95": None, "map50": None,
                "sparsity": global_sparsity(layer_sparsity(dense, layers=layers))}
        if data is not None:
            from .evaluate import evaluate

            v = evaluate(dense, data, save_dir=save_dir / "val_before", **val_kw)
            base.update(map50_95=v.map50_95, map50=v.map50)
        base = state.finish("baseline", base)

    # the steps ------------------------------------------------------------------------------------------
    records: list[dict[str, Any]] = []
    current: Any = dense
    for step in range(1, steps + 1):
        done = state.done(f"step{step}")
        if done is None:
            done = _sparsify_step(state, step, steps, current, amount=amount * step / steps, scope=scope,
                                  method=method, layers=layers, seed=seed, data=data, calib=calib, tune=tune,
                                  step_epochs=step_epochs, resume=resume, save_dir=save_dir, val_kw=val_kw,
                                  train_kw=dict(imgsz=imgsz, batch=batch, device=device, seed=seed, verbose=verbose,
                                                workers=workers, **(train_args or {})), base=base,
                                  max_map_drop=max_map_drop, first=not records)
        records.append(done)
        if done.get("rejected"):
            break
        current = done.get("finetuned") or done["checkpoint"]
    kept = [r for r in records if not r.get("rejected")][-1]

    # the final checkpoint: the kept step, marked and with provenance --------------------------------------
    fin = state.done("final")
    final_ckpt = save_dir / "weights" / "sparse.pt"
    if fin is None:
        fin = _write_final(final_ckpt, kept, model, seed, args)
        fin = state.finish("final", fin)

    # latency (does not improve; measured to show it) ---------------------------------------------------------
    lat = state.done("bench")
    if lat is None and bench and backends:
        from .bench import measure_latency

        res = measure_latency({"dense": dense, "sparse": final_ckpt}, imgsz=imgsz, backends=backends,
                              runs=bench_runs, warmup=bench_warmup, seed=seed, progress=verbose)
        lat = state.finish("bench", res.to_dict())

    result = SparsifyResult(
        save_dir=save_dir, checkpoint=final_ckpt, amount=amount, scope=scope, method=method, layers=layers,
        imgsz=imgsz, sparsity=fin["sparsity"], sparsity_before=base["sparsity"],
        selected_params=fin["selected_params"], params=fin["params"],
        nonzero_before=base["nonzero"], nonzero_after=fin["nonzero"], size_before=base["size"],
        size_after=fin["size"], gzip_before=base["gzip"], gzip_after=fin["gzip"],
        map50_95_before=base["map50_95"], map50_95_after=kept.get("map50_95"), map50_before=base["map50"],
        map50_after=kept.get("map50"), latency_ms=_latency_pairs(lat), kept_step=kept["step"],
        seconds=time.perf_counter() - t_start, steps=records,
        layer_rows=[LayerSparsity(**r) for r in fin["layers"]],
    )
    _write_report(result, dense, final_ckpt, base)
    return result


def _sparsify_step(state, step, steps, current, *, amount, scope, method, layers, seed, data, calib, tune, step_epochs,
                   resume, save_dir, val_kw, train_kw, base, max_map_drop, first) -> dict[str, Any]:
    """One increment: sparsify ``current`` to ``amount``, evaluate, fine-tune (keeping the zeros), evaluate."""
    from .models import load_model, save_checkpoint

    LOGGER.info("sparsify step %d/%d: %s %s to %.3f of the %s weights", step, steps, method, scope, amount, layers)
    module = copy.deepcopy(current if isinstance(current, nn.Module) else load_model(current).model).float().cpu()
    t0 = time.perf_counter()
    rows = sparsify_module(module, amount=amount, scope=scope, method=method, layers=layers, seed=seed + step - 1,
                           calib=calib)
    record: dict[str, Any] = {"step": step, "amount": amount, "sparsity": global_sparsity(rows),
                              "bn_corrected": calib is not None, "seconds": time.perf_counter() - t0}
    # one step: straight to the final checkpoint (rewritten with its provenance by _write_final)
    ckpt = save_checkpoint(module, save_dir / "weights" / "sparse.pt" if steps == 1 else
                           save_dir / "steps" / f"step{step}.pt")
    record["checkpoint"] = str(ckpt)
    if data is not None:
        from .evaluate import evaluate

        v = evaluate(ckpt, data, save_dir=save_dir / "val" / f"step{step}", **val_kw)
        record.update(map50_95_sparse=v.map50_95, map50_sparse=v.map50, map50_95=v.map50_95, map50=v.map50)
    if tune:
        from .pipeline import train_stage
        from .train import finetune

        out = train_stage(finetune, ckpt, data, save_dir / "finetune" / f"step{step}", step_epochs, resume=resume,
                          **train_kw)
        tuned = out.get("best") or out.get("last")
        from .evaluate import evaluate

        v = evaluate(tuned, data, save_dir=Path(out["save_dir"]) / "val", **val_kw)
        record.update(finetuned=str(tuned), map50_95=v.map50_95, map50=v.map50)
    if (max_map_drop is not None and base.get("map50_95") is not None and record.get("map50_95") is not None
            and base["map50_95"] - record["map50_95"] > max_map_drop and not first):
        LOGGER.warning("sparsify step %d dropped mAP50-95 by %.3f > max_map_drop=%s: keeping step %d",
                       step, base["map50_95"] - record["map50_95"], max_map_drop, step - 1)
        record["rejected"] = True
    return state.finish(f"step{step}", record)


def _write_final(final_ckpt: Path, kept: dict[str, Any], source: Any, seed: int, args: dict[str, Any]) -> dict[str, Any]:
    """Write the kept step's model as ``weights/sparse.pt`` with its provenance; its sparsity facts for the state."""
    from .models import load_model, save_checkpoint
    from .provenance import provenance

    module = load_model(kept.get("finetuned") or kept["checkpoint"]).model
    info = getattr(module, SPARSITY_ATTR, None) or {}
    rows = layer_sparsity(module, info.get("params"))
    nz, total = count_nonzero(module)
    prov = provenance(source, seed=seed, stage="sparsify", args=args)
    prov["sparsity"] = {**info, "params": len(info.get("params", [])), "sparsity": global_sparsity(rows),
                        "kept_step": kept["step"]}
    save_checkpoint(module, final_ckpt, train_args=getattr(module, "args", None), provenance=prov)
    size, gz = checkpoint_sizes(final_ckpt)
    return {"checkpoint": str(final_ckpt), "sparsity": global_sparsity(rows),
            "selected_params": sum(r.params for r in rows),
            "nonzero": nz, "params": total, "size": size, "gzip": gz, "layers": [dataclasses.asdict(r) for r in rows]}


def _latency_pairs(lat: dict[str, Any] | None) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for e in (lat or {}).get("entries", []):
        out.setdefault(e["backend"], [None, None])[0 if e["model"] == "dense" else 1] = e["median_ms"]
    return out


def _histogram_layers(rows: Sequence[LayerSparsity], n: int = 4) -> list[str]:
    """A few layers to plot: the first, the largest, one from the middle and the last of the selection."""
    if not rows:
        return []
    largest = max(rows, key=lambda r: r.params).name
    picks = [rows[0].name, largest, rows[len(rows) // 2].name, rows[-1].name]
    return list(dict.fromkeys(picks))[:n]


def _write_report(result: SparsifyResult, dense: nn.Module, final_ckpt: Path, base: dict[str, Any]) -> None:
    from .io import write_json, write_text
    from .models import load_model
    from .report import plot_layer_sparsity, plot_weight_histograms

    save_dir = result.save_dir
    rows = result.layer_rows
    write_json(save_dir / "report.json", result.to_dict())
    write_text(save_dir / "layers.csv", "name,params,zeros,sparsity\n"
               + "".join(f"{r.name},{r.params},{r.zeros},{r.sparsity:.6f}\n" for r in rows))
    plot_layer_sparsity([(r.name, r.sparsity) for r in rows], save_dir / "sparsity.png", overall=result.sparsity)
    after = dict(load_model(final_ckpt).model.named_parameters())
    before = dict(dense.named_parameters())
    hists = {n: (before[f"{n}.weight"].detach().flatten().numpy(), after[f"{n}.weight"].detach().flatten().numpy())
             for n in _histogram_layers(rows) if f"{n}.weight" in before and f"{n}.weight" in after}
    plot_weight_histograms(hists, save_dir / "weight_hist.png")

    steps = []
    for r in result.steps:
        steps.append((r["step"], r["amount"], r["sparsity"], r.get("map50_95_sparse"), r.get("map50_95"),
                      "rejected" if r.get("rejected") else ("kept" if r["step"] == result.kept_step else "")))
    md = [
        "# yolo-prune sparsify report", "",
        f"amount={result.amount}, scope={result.scope}, method={result.method}, layers={result.layers}; "
        f"checkpoint `{result.checkpoint}`", "",
        markdown_table(result.comparison(), header=("", "before", "after", "ratio")), "",
        f"Global sparsity of the {result.selected_params:,} selected conv weights: **{result.sparsity:.4f}**; "
        f"non-zero parameters of the whole model: {result.nonzero_after:,} of {result.params:,} "
        f"(before: {result.nonzero_before:,}).", "",
        *(["BatchNorm running statistics were corrected for the zeros on calibration images from the train split "
            "(`compensate`; no weight changed).", ""] if result.steps and result.steps[0].get("bn_corrected") else []),
        "Checkpoint sizes: the model written as yolo-prune writes checkpoints (fp16, no optimizer), raw and "
        "gzip -9. torch stores tensors uncompressed, so only the compressed size shrinks.", "",
        f"**Speed.** {SPEED_NOTE}", "",
    ]
    if len(steps) > 1:
        md += ["## Steps", "", markdown_table(steps, header=("step", "amount", "sparsity", "mAP50-95 sparsified",
                                                             "mAP50-95 (after fine-tune)", "")), ""]
    md += ["## Per-layer sparsity", "", "![per-layer sparsity](sparsity.png)", "",
           "![weights before/after](weight_hist.png)", "",
           markdown_table([(r.name, r.params, r.zeros, r.sparsity) for r in rows],
                          header=("layer", "weights", "zeros", "sparsity")), ""]
    write_text(save_dir / "report.md", "\n".join(md))


def sparsify_from_cfg(cfg: dict[str, Any], extra: dict[str, Any]) -> SparsifyResult:
    """Run :func:`sparsify` from a merged CLI configuration (see :mod:`yolo_prune.config`)."""
    backends = tuple(b.strip() for b in str(cfg.get("backends") or "").split(",") if b.strip() and b.strip() != "None")
    return sparsify(cfg["model"], amount=cfg["amount"], scope=cfg["scope"], method=cfg["method"], layers=cfg["layers"],
                    data=cfg["data"], compensate=cfg["compensate"] not in ("none", False),
                    calib_images=cfg["calib_images"], steps=cfg["steps"], step_epochs=cfg["step_epochs"],
                    max_map_drop=cfg["max_map_drop"], imgsz=cfg["imgsz"], batch=cfg["batch"], workers=cfg["workers"],
                    device=cfg["device"], seed=cfg["seed"], bench_runs=cfg["bench_runs"],
                    bench_warmup=cfg["bench_warmup"], backends=backends, bench=bool(backends), project=cfg["project"],
                    name=cfg["name"], exist_ok=cfg["exist_ok"], resume=cfg["resume"], verbose=cfg["verbose"],
                    train_args=extra)
