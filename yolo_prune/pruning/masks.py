"""Unstructured weight masks: single conv weights set to zero with ``torch.nn.utils.prune``, and what goes with them.

* **masks** (:func:`apply_masks`): ``l1`` (smallest |w|) and ``random`` through ``torch.nn.utils.prune``'s
  ``l1_unstructured`` / ``random_unstructured`` per layer (``scope=layer``) or ``global_unstructured`` across
  layers (``scope=global``); ``percentile`` is :class:`PercentileUnstructured`, a ``BasePruningMethod`` that cuts
  every weight whose |w| lies below a percentile of |w| (per layer, or one threshold across layers, as in the
  classic magnitude-threshold recipe). Weights that are already exactly 0 count as pruned, so ``amount`` is the
  fraction of the selected weights that are 0 afterwards (exactly, for ``l1`` and ``random``);
* **permanence** (:func:`make_permanent`): ``prune.remove`` folds every mask into a plain ``weight`` tensor, so the
  checkpoint loads with ``YOLO(path)`` and exports as any ultralytics model;
* **the mark** (:data:`SPARSITY_ATTR`): a sparsified model carries the names of its sparsified parameters, which
  travel inside every checkpoint (the EMA ultralytics saves is a deep copy of the model); :func:`zero_masks` and
  :func:`apply_zero_masks` turn them back into masks (the trainer side is
  :class:`yolo_prune.train.keep_zeros.KeepZerosMixin`);
* **BatchNorm correction** (:func:`correct_batchnorm`): re-fit the running statistics for what the zeros changed;
* **sizes** (:func:`checkpoint_sizes`): raw and gzip bytes of a checkpoint, where the zeros become a saving.

The ``yolo-prune sparsify`` stage built on these is :func:`yolo_prune.sparsify.sparsify`. This module is part of the
pruning layer: it imports nothing of training, stages or the pipeline.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.utils.prune as tprune
from torch import nn

from ..errors import UsageError
from ..models import save_checkpoint
from .calibration import run_with_hooks
from .graph import protected_layers
from ..options import choices

__all__ = [
    "LAYER_SETS",
    "METHODS",
    "SCOPES",
    "SPARSITY_ATTR",
    "LayerSparsity",
    "PercentileUnstructured",
    "apply_masks",
    "apply_zero_masks",
    "batchnorm_input_stats",
    "checkpoint_sizes",
    "correct_batchnorm",
    "count_nonzero",
    "global_sparsity",
    "layer_sparsity",
    "make_permanent",
    "percentile_threshold",
    "percentile_unstructured",
    "prunable_convs",
    "sparsify_module",
    "zero_masks",
]

SCOPES = choices("scope")
METHODS = choices("method", "sparsify")
LAYER_SETS = choices("layers")
#: Attribute of a sparsified ``DetectionModel``: ``{"params": [parameter names], "amount", "scope", "method",
#: "layers"}``. Pickled with the model, so it is in every checkpoint written afterwards (including ultralytics').
SPARSITY_ATTR = "yolo_prune_sparsity"


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
def check_mask_options(amount: Any, scope: str, method: str, layers: str) -> float:
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
    amount = check_mask_options(amount, scope, method, layers)
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


# --------------------------------------------------------------------------------------------- masks from the mark
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


# --------------------------------------------------------------------------------------------- sizes
def checkpoint_sizes(path: str | Path, level: int = 9) -> tuple[int, int]:
    """(raw bytes, gzip bytes at ``level``) of a checkpoint file. torch stores tensors uncompressed, so gzip is
    where unstructured zeros become a real saving."""
    data = Path(path).read_bytes()
    return len(data), len(gzip.compress(data, compresslevel=level, mtime=0))


def model_sizes(module: nn.Module, folder: Path) -> tuple[int, int]:
    """Sizes of ``module`` written as :func:`yolo_prune.models.save_checkpoint` writes it (fp16, no optimizer)."""
    tmp = save_checkpoint(module, folder / ".size_probe.pt")
    try:
        return checkpoint_sizes(tmp)
    finally:
        tmp.unlink(missing_ok=True)
