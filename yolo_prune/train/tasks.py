"""The trainer of a model's task: detection, segmentation, pose and oriented boxes (OBB).

Every task trains through the same mixin stack (keep the architecture, keep zeros, distil; the sparsity penalty
for ``sparse``) over ultralytics' trainer of that task; the task is read from the model (its head), so no option
names it. ``trainer_for("segment", "finetune")`` is
:class:`~yolo_prune.train.finetune.FinetuneSegmentTrainer`; the API functions pick the same way.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from ..forms import PRUNABLE_TASKS, as_detection_model, model_task
from .finetune import FINETUNE_TRAINERS
from .sparse import SPARSE_TRAINERS

__all__ = ["TRAINERS", "trainer_for"]

#: The trainer classes by kind of training and task.
TRAINERS: dict[str, dict[str, type]] = {"finetune": FINETUNE_TRAINERS, "sparse": SPARSE_TRAINERS}


def trainer_for(task: Any, kind: str = "finetune") -> type:
    """The trainer class of ``kind`` (``finetune`` or ``sparse``) for ``task``: a task name (``detect``,
    ``segment``, ``pose``, ``obb``) or a model (checkpoint path, yaml, ``YOLO``, ``DetectionModel``) whose head
    tells it."""
    if kind not in TRAINERS:
        raise UsageError(f"unknown kind of training {kind!r}; choose one of {', '.join(TRAINERS)}")
    if not (isinstance(task, str) and task in PRUNABLE_TASKS):
        task = model_task(as_detection_model(task, tasks=PRUNABLE_TASKS))
    return TRAINERS[kind][task]
