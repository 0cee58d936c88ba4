"""What the training API functions return: :class:`TrainResult` (fine-tuning) and :class:`SparseResult`.

Both are dataclasses; ``dataclasses.asdict(result)`` is what the pipeline records in its state file.
Fields declared with :func:`optional` are left out of the printed table while they are None (a run without
a teacher does not list ``teacher``); every other field is always shown.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..results import Result

__all__ = ["SparseResult", "TrainResult", "optional"]

_HIDE_NONE = "hide_if_none"


def optional() -> Any:
    """A field defaulting to None that the printed table omits while it is None."""
    return dataclasses.field(default=None, metadata={_HIDE_NONE: True})


@dataclasses.dataclass
class TrainResult(Result):
    """Outcome of :func:`~yolo_prune.train.finetune` (and the common part of :class:`SparseResult`).

    ``map50_95`` / ``map50`` are the trainer's final validation (of ``best.pt``), box mAP; a segmentation or pose
    model adds its mask / keypoint mAP50-95. ``teacher`` / ``distill`` are
    the checkpoint distilled from and the kind of distillation, None without a teacher.
    """

    mode: str
    save_dir: Path
    best: Path | None
    last: Path | None
    epochs: int
    map50_95: float | None = None
    map50: float | None = None
    teacher: str | None = optional()
    distill: str | None = optional()
    mask_map50_95: float | None = optional()  # a segmentation model's (ultralytics' mask mAP of best.pt)
    pose_map50_95: float | None = optional()  # a pose model's (ultralytics' keypoint mAP of best.pt)

    def rows(self) -> list[tuple[str, Any]]:
        out = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.metadata.get(_HIDE_NONE):
                continue
            out.append((f.name, str(v) if isinstance(v, Path) else v))
        return out


@dataclasses.dataclass
class SparseResult(TrainResult):
    """Outcome of :func:`~yolo_prune.train.sparse_train`: a :class:`TrainResult` plus the sparsity facts.

    ``sr``, ``sr_schedule``, ``sr_mode`` and ``gamma_threshold`` are the run's own settings (a resumed run keeps
    its checkpoint's). Mean |gamma| over every BatchNorm channel and the fraction of channels with
    |gamma| < ``gamma_threshold``, before and after training; after training also the fraction of gammas exactly
    0 and the fraction of conv MACs that pruning at ``gamma_threshold`` removes for free.
    """

    sr: float | None = optional()
    sr_schedule: str | None = optional()
    gamma_threshold: float | None = optional()
    gamma_mean_before: float | None = optional()
    gamma_near_zero_before: float | None = optional()
    gamma_mean_after: float | None = optional()
    gamma_near_zero_after: float | None = optional()
    sr_mode: str | None = optional()
    gamma_zero_after: float | None = optional()  # fraction of gammas exactly 0
    free_macs_after: float | None = optional()  # fraction of conv MACs pruning at gamma_threshold removes for free
