"""What to cut: channel importance criteria, one score per channel of a group (higher = keep).

The criteria are torch-pruning ``Importance`` objects:

- ``auto``: ``recon`` with calibration images, ``bn`` without;
- ``bn``: |BN gamma| (Network Slimming), averaged over the BNs of a group, not normalised, so that a
  global threshold compares raw gammas across layers as in the paper;
- ``l1`` / ``l2``: filter norms of every conv in the group, normalised by the group mean (filter norms
  grow with fan-in, so raw values do not compare across layers);
- ``activation``: mean |activation| of the channel as it enters its consumer convs, measured on a batch
  of real images (``calibrate`` must run before ranking, and again after every pruning step);
- ``recon``: what removing the channel costs its consumers after the best least-squares compensation (the
  optimal-brain-surgeon error of each consumer conv, from the Gram matrix of its input patches on real images,
  output rows scaled by the consumer's BN); it ranks for the compensation that follows. Needs ``calibrate``.
- ``random``: uniform random scores from a seeded generator (the baseline).
"""

from __future__ import annotations


import torch
import torch_pruning as tp
from torch import nn

from ..errors import UsageError
from .calibration import run_with_hooks
from .compensate import bn_after
from .sensitivity import PROBE_IMAGES, ConvGrams
from ..options import choices

METHODS = choices("method")


def resolve_method(method: str, has_images: bool) -> str:
    """``auto``: ``recon`` when there are calibration images, ``bn`` otherwise; any other method as it is."""
    if method == "auto":
        return "recon" if has_images else "bn"
    return method


class SeededRandomImportance(tp.importance.Importance):
    """Random scores drawn from a private generator, so ranking is reproducible without global seeding."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)


class CalibratedActivationImportance(tp.importance.ActivationImportance):
    """torch-pruning's activation importance, averaged over every batch of a calibration set."""

    def __init__(self, images: torch.Tensor, *, batch: int = 8):
        super().__init__(p=1, normalizer="mean")
        self.images = images
        self.batch = batch

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        # torch-pruning's version sorts the group's index lists in place and sizes its result after the
        # first consumer, which is wrong when one channel feeds a consumer several times (SPPF's concat of
        # x and its max-pools). Here each root channel averages every input slot it feeds.
        n = len(group[0].root_idxs)
        total, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for item in group:
            layer, fn = item.dep.target.module, item.dep.handler
            if not (isinstance(layer, nn.Conv2d) and fn == tp.pruner.function.prune_conv_in_channels):
                continue
            if getattr(layer, "_importance", None) is None or any(r is None for r in item.root_idxs):
                continue
            roots = torch.tensor(list(item.root_idxs), dtype=torch.long)
            total.scatter_add_(0, roots, layer._importance[list(item.idxs)].double().cpu())
            count.scatter_add_(0, roots, torch.ones(len(roots), dtype=torch.float64))
        if not count.any():
            return None
        return self._normalize((total / count.clamp(min=1)).float(), self.normalizer)

    @torch.no_grad()
    def calibrate(self, model: nn.Module) -> None:
        """Run the calibration images through ``model``; store each conv's mean |input| per channel."""
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        sums: dict[nn.Conv2d, torch.Tensor] = {}
        counts: dict[nn.Conv2d, int] = {}

        def hook(conv: nn.Conv2d, inputs, output) -> None:
            x = inputs[0].detach().abs()
            sums[conv] = sums.get(conv, 0) + x.double().sum((0, 2, 3))
            counts[conv] = counts.get(conv, 0) + x.shape[0] * x.shape[2] * x.shape[3]

        run_with_hooks(model, self.images, convs, hook, batch=self.batch)
        for conv in convs:
            conv._importance = (sums[conv] / counts[conv]).float() if conv in sums else None

class ReconstructionImportance(tp.importance.Importance):
    """Cost of removing each channel alone, after the least-squares compensation of every consumer conv.

    For a consumer conv with input-patch Gram matrix ``G`` (plus the ridge and an intercept column) and
    ``P = G^-1``, removing the input columns ``R`` of a channel and refitting the others leaves the error
    ``tr(W_R (P_RR)^-1 W_R^T)`` (the optimal-brain-surgeon formula); ``W`` is the consumer's weight with each
    output row scaled by its BN (``gamma / sqrt(var)``), so the costs of different consumers add up in the units
    the next layer sees. A channel feeding several inputs of one consumer (SPPF) is removed from all jointly.
    The Gram matrices are measured on the first :data:`~.sensitivity.PROBE_IMAGES` images, as the sensitivity
    probes measure theirs: a probe of the same model reuses them (``grams``).
    """

    def __init__(self, images: torch.Tensor, *, ridge: float = 1e-2, seed: int = 0, progress: bool = False):
        self.images, self.ridge, self.seed, self.progress = images, ridge, seed, progress
        self.grams = None
        self.inverse: dict[nn.Conv2d, torch.Tensor] = {}
        self.bn_scale: dict[nn.Conv2d, torch.Tensor] = {}

    @torch.no_grad()
    def calibrate(self, model: nn.Module) -> None:

        self.grams = ConvGrams(model, self.images[:PROBE_IMAGES], seed=self.seed, progress=self.progress)
        self.inverse = {}
        self.bn_scale = {c: (bn.weight.detach().abs() / (bn.running_var + bn.eps).sqrt()).double().cpu()
                         for c, bn in bn_after(model).items()}

    def _inv(self, conv: nn.Conv2d) -> torch.Tensor | None:
        if conv not in self.inverse:
            g = self.grams.grams.get(conv) if self.grams is not None else None
            if g is None:
                return None
            lam = self.ridge * g.diagonal()[:-1].mean().clamp(min=1e-12)
            reg = torch.eye(len(g), dtype=g.dtype) * (lam + 1e-9)
            reg[-1, -1] = 1e-9
            self.inverse[conv] = torch.linalg.inv(g + reg)
        return self.inverse[conv]

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        n = len(group[0].root_idxs)
        total = torch.zeros(n, dtype=torch.float64)
        seen = False
        slots: dict[nn.Conv2d, dict[int, list[int]]] = {}
        for item in group:
            layer, fn = item.dep.target.module, item.dep.handler
            if not (isinstance(layer, nn.Conv2d) and fn == tp.pruner.function.prune_conv_in_channels
                    and layer.groups == 1):
                continue
            for idx, root in zip(item.idxs, item.root_idxs):
                if root is not None:
                    slots.setdefault(layer, {}).setdefault(int(root), []).append(int(idx))
        for conv, by_root in slots.items():
            p = self._inv(conv)
            if p is None:
                continue
            seen = True
            k = conv.kernel_size[0] * conv.kernel_size[1]
            w = conv.weight.detach().double().reshape(conv.out_channels, -1).cpu()
            scale = self.bn_scale.get(conv)
            if scale is not None:
                w = w * scale[:, None]
            for root, chans in by_root.items():
                cols = (torch.tensor(sorted(set(chans)))[:, None] * k + torch.arange(k)).flatten()
                block = p[cols][:, cols]
                wr = w[:, cols]
                try:
                    cost = torch.trace(wr @ torch.linalg.solve(block, wr.T))
                except RuntimeError:
                    cost = (wr**2).sum()
                total[root] += float(cost)
        return total.float() if seen else None


def make_importance(method: str, *, seed: int = 0, calib_images: torch.Tensor | None = None,
                    progress: bool = False) -> tp.importance.Importance:
    """The importance criterion for ``method`` (one of :data:`METHODS`); ``progress``: progress lines of its
    measurements on the calibration images."""
    method = resolve_method(method, calib_images is not None and len(calib_images) > 0)
    if method == "bn":
        return tp.importance.BNScaleImportance(normalizer=None)
    if method == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer="mean")
    if method == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean")
    if method == "random":
        return SeededRandomImportance(seed)
    if method == "recon":
        if calib_images is None or len(calib_images) == 0:
            raise UsageError("method=recon needs calibration images: pass data= with a train split")
        return ReconstructionImportance(calib_images, seed=seed, progress=progress)
    if method == "activation":
        if calib_images is None or len(calib_images) == 0:
            raise UsageError("method=activation needs calibration images: pass data= with a train split")
        return CalibratedActivationImportance(calib_images)
    raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
