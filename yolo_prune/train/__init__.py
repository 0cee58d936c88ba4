"""Sparsity training on BN gammas and fine-tuning of pruned models through the ultralytics trainer.

* :func:`sparse_train` / :class:`SparseTrainer`: Network Slimming L1 penalty on every BatchNorm gamma,
  AMP-safe, with per-epoch gamma statistics in ``results.csv`` and gamma histograms.
* :func:`finetune` / :class:`FinetuneTrainer`: train a pruned checkpoint without the yaml rebuild that
  would silently restore the unpruned architecture.
* both distil from a ``teacher=`` checkpoint on request (:mod:`yolo_prune.train.distill`, options grouped in
  :class:`DistillOptions`): output distillation of class scores and DFL box distributions, ultralytics' feature
  distillation, label-free mode;
* :func:`qat_finetune` / :class:`QATTrainer`: fine-tuning with NNCF fake-quantizers (:mod:`yolo_prune.train.qat`);
* both keep the checkpoint's architecture (:mod:`yolo_prune.train.keep_arch`) and a sparsified checkpoint's zeros
  (:mod:`yolo_prune.train.keep_zeros`); one run goes through :func:`yolo_prune.train.run.run_training` and returns
  a :class:`TrainResult` (:class:`SparseResult` for sparsity training, :mod:`yolo_prune.train.results`).

Segmentation, pose and OBB models train through the same mixins over ultralytics' task trainers
(``FinetuneSegmentTrainer``, ``SparsePoseTrainer``, ...; :func:`trainer_for` picks by the model's task).
Every trainer is importable by module path (``yolo_prune.train.sparse.SparseTrainer``,
``yolo_prune.train.finetune.FinetuneTrainer``), as ultralytics' DDP worker script needs.
"""

from ..options import DistillOptions
from .finetune import (FinetuneOBBTrainer, FinetunePoseTrainer, FinetuneSegmentTrainer, FinetuneTrainer, QATTrainer,
                       finetune, qat_finetune)
from .keep_arch import KeepArchitectureMixin
from .keep_zeros import KeepZerosMixin
from .results import SparseResult, TrainResult
from .tasks import trainer_for
from .sparse import (
    SparseOBBTrainer,
    SparsePoseTrainer,
    SparseSegmentTrainer,
    SparseTrainer,
    add_l1_subgradient,
    bn_layers,
    gamma_stats,
    l1_step,
    save_gamma_histogram,
    sparse_train,
    sr_at,
)

__all__ = [
    "DistillOptions",
    "FinetuneOBBTrainer",
    "FinetunePoseTrainer",
    "FinetuneSegmentTrainer",
    "FinetuneTrainer",
    "KeepArchitectureMixin",
    "KeepZerosMixin",
    "QATTrainer",
    "SparseResult",
    "SparseOBBTrainer",
    "SparsePoseTrainer",
    "SparseSegmentTrainer",
    "SparseTrainer",
    "TrainResult",
    "add_l1_subgradient",
    "bn_layers",
    "finetune",
    "gamma_stats",
    "l1_step",
    "qat_finetune",
    "save_gamma_histogram",
    "sparse_train",
    "sr_at",
    "trainer_for",
]
