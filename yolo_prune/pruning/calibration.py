"""Running calibration images through a model with forward hooks; the images themselves come from
:func:`yolo_prune.data.calibration.load_calibration_images` (re-exported here)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..data.calibration import load_calibration_images
from ..logs import Progress

__all__ = ["load_calibration_images", "run_with_hooks"]


@torch.no_grad()
def run_with_hooks(model: torch.nn.Module, images: torch.Tensor, modules: Sequence[torch.nn.Module],
                   hook: Callable, *, batch: int = 8, progress: Progress | None = None) -> None:
    """Run ``images`` through ``model`` (eval mode, in batches) with ``hook`` as forward hook on ``modules``.

    The hooks are removed and the model's train/eval mode restored afterwards, whatever happens. ``progress``
    counts the images done.
    """
    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, len(images), batch):
            model(images[i : i + batch].to(device))
            if progress is not None:
                progress.update(len(images[i : i + batch]))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
