"""Former home of the training helpers, split by responsibility (issue 20); only old import paths live here.

* :class:`~yolo_prune.train.keep_arch.KeepArchitectureMixin`: :mod:`yolo_prune.train.keep_arch`;
* :class:`~yolo_prune.train.results.TrainResult`, :class:`~yolo_prune.train.results.SparseResult`:
  :mod:`yolo_prune.train.results`;
* :func:`~yolo_prune.train.run.run_training`, :func:`~yolo_prune.train.run.resolve_data_yaml`,
  :func:`~yolo_prune.train.run.sigterm_as_interrupt`: :mod:`yolo_prune.train.run`;
* ``save_input_checkpoint`` -> :func:`yolo_prune.models.save_input_checkpoint`;
* ``unwrap_detection_model`` -> :func:`yolo_prune.forms.as_detection_model`;
* ``quiet_logs`` -> :func:`yolo_prune.logs.quiet_ultralytics`.

Kept only until ``yolo_prune.pipeline`` imports those three from their new homes; nothing in ``train/`` uses it.
"""

from __future__ import annotations

from ..forms import as_detection_model as unwrap_detection_model
from ..logs import quiet_ultralytics as quiet_logs
from ..models import save_input_checkpoint

__all__ = ["quiet_logs", "save_input_checkpoint", "unwrap_detection_model"]
