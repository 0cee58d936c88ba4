"""Training that keeps a sparsified checkpoint's zeros: the trainer side of :mod:`yolo_prune.pruning.masks`.

A model sparsified by ``yolo-prune sparsify`` carries the names of its sparsified parameters in the attribute
:data:`~yolo_prune.pruning.masks.SPARSITY_ATTR`, which travels inside every checkpoint (the EMA ultralytics saves
is a deep copy of the model). :class:`KeepZerosMixin` derives the masks from the zero pattern of those parameters
when ultralytics builds the model from the checkpoint on disk - also in a DDP worker and on ``resume`` - and
re-applies them to the model and the EMA after every optimizer step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..pruning.masks import SPARSITY_ATTR, apply_zero_masks, zero_masks

__all__ = ["KeepZerosMixin"]


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
