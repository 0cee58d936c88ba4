"""The teacher of a staged run's training stages (``teacher=auto``: the run's own input model)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..forms import PRUNABLE_TASKS, as_detection_model
from ..models import load_model, save_input_checkpoint

LOGGER = logging.getLogger("yolo_prune")


def pipeline_teacher(teacher: Any, model: Any, nc: int, save_dir: Path) -> str | None:
    """The teacher checkpoint of every training stage: ``"auto"`` is the input model (saved as ``teacher.pt`` in the
    run folder when it is in memory), skipped with a warning when its class count differs from the data's."""
    if teacher is None or teacher is False or str(teacher).strip().lower() in ("", "none", "null", "false"):
        return None
    if str(teacher).strip().lower() != "auto":
        return str(Path(str(teacher)).expanduser().absolute())
    if isinstance(model, (str, Path)):
        if Path(model).suffix.lower() != ".pt":
            return None  # a yaml: random init, nothing to learn from
        path = Path(model).expanduser().absolute()
        head_nc = int(load_model(path, tasks=PRUNABLE_TASKS).model.model[-1].nc)
    else:
        net = as_detection_model(model, tasks=PRUNABLE_TASKS)
        head_nc = int(net.model[-1].nc)
        path = save_dir / "teacher.pt"
        if not path.is_file():
            save_input_checkpoint(net, path)
    if head_nc != nc:
        LOGGER.warning("teacher=auto: the input model has %d classes but the data has %d; training without a "
                       "teacher", head_nc, nc)
        return None
    return str(path)
