"""Fine-tuning of a pruned detector (or segmentation, pose, oriented-box model) through the ultralytics trainer, keeping the pruned architecture.

``YOLO(pruned.pt).train()`` would rebuild the *unpruned* network from the checkpoint's yaml and drop every
weight whose shape changed; :class:`FinetuneTrainer` trains the checkpoint's own module instead (see
:class:`~yolo_prune.train.keep_arch.KeepArchitectureMixin`). Everything else - EMA, AMP, warmup, LR schedule,
``resume``, ``weights/best.pt`` and ``weights/last.pt`` (fp16, as ultralytics writes them), DDP - is
ultralytics' own code.
"""

from __future__ import annotations

from typing import Any

from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.obb import OBBTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils import DEFAULT_CFG

from ..options import DistillOptions, Options, RunOptions, TrainOptions, settings_and_rest
from .distill import DistillMixin, distill_options
from .keep_arch import KeepArchitectureMixin
from .keep_zeros import KeepZerosMixin
from .qat import QATMixin
from .results import TrainResult
from .run import run_training

__all__ = ["FINETUNE_TRAINERS", "FinetuneOBBTrainer", "FinetunePoseTrainer", "FinetuneSegmentTrainer", "FinetuneTrainer",
           "QATTrainer", "finetune", "qat_finetune"]


class FinetuneTrainer(QATMixin, KeepZerosMixin, DistillMixin, KeepArchitectureMixin, DetectionTrainer):
    """ultralytics ``DetectionTrainer`` that trains the (pruned) checkpoint in ``args.model`` as it is.

    Use like any ultralytics trainer: ``FinetuneTrainer(overrides={"model": "pruned.pt", "data": ...}).train()``.
    ``args.model`` must be a path (DDP workers and ``resume`` reload the architecture from it). With
    ``teacher=<checkpoint>`` it distils from that model (see :mod:`yolo_prune.train.distill`). The weights a
    ``yolo-prune sparsify`` checkpoint set to zero stay zero (:class:`~yolo_prune.train.keep_zeros.KeepZerosMixin`).
    A quantization-aware trained checkpoint keeps training with its fake-quantizers (:mod:`yolo_prune.train.qat`).
    """

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict[str, Any] | None = None, _callbacks: Any = None):
        super().__init__(cfg, overrides, _callbacks)


# The other tasks: the same mixin stack over ultralytics' task trainer, which comes after the mixins and before
# DetectionTrainer in the MRO (its task validator, loss names, plots, dataset checks such as pose's kpt_shape).
# Module-level classes: ultralytics' DDP worker script imports the trainer class by module path.
class FinetuneSegmentTrainer(FinetuneTrainer, SegmentationTrainer):
    """:class:`FinetuneTrainer` for segmentation models (ultralytics ``SegmentationTrainer``)."""


class FinetunePoseTrainer(FinetuneTrainer, PoseTrainer):
    """:class:`FinetuneTrainer` for pose models (ultralytics ``PoseTrainer``)."""


class FinetuneOBBTrainer(FinetuneTrainer, OBBTrainer):
    """:class:`FinetuneTrainer` for oriented-box models (ultralytics ``OBBTrainer``)."""


#: The fine-tuning trainer of each task (the task is read from the checkpoint, see :func:`run_training`).
FINETUNE_TRAINERS: dict[str, type] = {"detect": FinetuneTrainer, "segment": FinetuneSegmentTrainer,
                                      "pose": FinetunePoseTrainer, "obb": FinetuneOBBTrainer}

GROUPS = (TrainOptions, RunOptions, DistillOptions)


def finetune(model: Any, data: Any, *options: Options, **overrides: Any) -> TrainResult:
    """Fine-tune a (pruned) detector on ``data``, keeping every layer's channel count.

    Args:
        model: a ``.pt`` checkpoint path, or an in-memory ultralytics ``YOLO`` / ``DetectionModel``
            (saved first as ``weights/input.pt`` in the run folder; nothing is written beside user files).
        data: a YOLO- or COCO-format dataset yaml; with ``resume``, None takes the one recorded in ``last.pt``.
        options: :class:`~yolo_prune.options.TrainOptions` (epochs, imgsz, batch, workers, device, seed),
            :class:`~yolo_prune.options.RunOptions` (project, name, exist_ok, resume, verbose) and
            :class:`~yolo_prune.options.DistillOptions` (teacher, distill, distill_cls, distill_box, distill_temp,
            labels, unlabeled), all documented in ``yolo-prune cfg``.
        overrides: any of their keys by name (``epochs=30, teacher="dense.pt"``); every other key is an
            ultralytics train key (lr0, optimizer, amp, close_mosaic, ...) and passes through.

    The run folder is ``<project>/<name>``, default ``runs/finetune/finetune`` (incremented unless ``exist_ok``).
    ``resume`` continues an interrupted run where its ``last.pt`` is now: ``True`` (the run folder of
    ``project``/``name``, or ``model=.../last.pt``) or a path to ``last.pt`` / a run folder; checkpoint settings
    win. ``teacher`` distils from that checkpoint (``auto``/``none``: plain fine-tuning; see
    :mod:`yolo_prune.train.distill`); ``labels=False`` trains on images alone against the teacher's outputs.

    Returns:
        :class:`~yolo_prune.train.TrainResult` with ``best``/``last`` checkpoints and the final mAP of ``best.pt``.
    """
    s, train_args = settings_and_rest(GROUPS, options, overrides, where="finetune")
    extra = distill_options(**s.distill.to_dict())
    _, result = run_training(FINETUNE_TRAINERS, "finetune", model, data, s.train, s.run, extra=extra,
                             train_args=train_args)
    return result


class QATTrainer(FinetuneTrainer):
    """:class:`FinetuneTrainer` with quantization-aware training: NNCF fake-quantizers are inserted into the model
    (:class:`~yolo_prune.train.qat.QATMixin`)."""

    qat = True


def qat_finetune(model: Any, data: Any, train: TrainOptions, run: RunOptions,
                 train_args: dict[str, Any] | None = None) -> TrainResult:
    """Quantization-aware fine-tuning of ``model`` (a checkpoint path or in-memory model) on ``data`` in the run folder
    of ``run`` (``runs/qat/qat`` by default; ``run.resume`` continues one); returns the :class:`TrainResult`
    (``best`` holds the quantizers' state)."""
    _, result = run_training(QATTrainer, "qat", model, data, train, run, train_args=train_args)
    return result
