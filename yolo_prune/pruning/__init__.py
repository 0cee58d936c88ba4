"""Stage 3 of the pipeline: rank channels and remove them for real.

- :mod:`.graph`: what depends on what (torch-pruning's dependency graph over the prunable model form);
- :mod:`.importance`: what to cut (one score per channel: bn, l1, l2, activation, recon, random);
- :mod:`.schedule`: how much to cut where (global ranking, layer limits, round_to, MACs targets);
- :mod:`.engine`: one pruning pass over an ``nn.Module``.

The user-facing :func:`yolo_prune.prune` (load, prune, measure, save a checkpoint and a report) is the prune stage,
:mod:`yolo_prune.stages.prune`.
"""

from .engine import PruneOutcome, StepRecord, prune_model
from .graph import build_graph, prepare, protected_layers
from .importance import METHODS

__all__ = [
    "METHODS",
    "PruneOutcome",
    "StepRecord",
    "build_graph",
    "prepare",
    "protected_layers",
    "prune_model",
]
