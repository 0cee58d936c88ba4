"""Fine-tuning of a pruned detector through the ultralytics trainer, keeping the pruned architecture.

``YOLO(pruned.pt).train()`` would rebuild the *unpruned* network from the checkpoint's yaml and drop every
weight whose shape changed; :class:`FinetuneTrainer` trains the checkpoint's own module instead (see
:class:`~yolo_prune.train.keep_arch.KeepArchitectureMixin`). Everything else - EMA, AMP, warmup, LR schedule,
``resume``, ``weights/best.pt`` and ``weights/last.pt`` (fp16, as ultralytics writes them), DDP - is
ultralytics' own code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG

from .distill import DistillMixin, DistillOptions
from .keep_arch import KeepArchitectureMixin
from .keep_zeros import KeepZerosMixin
from .results import TrainResult
from .run import run_training

__all__ = ["FinetuneTrainer", "finetune"]


class FinetuneTrainer(KeepZerosMixin, DistillMixin, KeepArchitectureMixin, DetectionTrainer):
    """ultralytics ``DetectionTrainer`` that trains the (pruned) checkpoint in ``args.model`` as it is.

    Use like any ultralytics trainer: ``FinetuneTrainer(overrides={"model": "pruned.pt", "data": ...}).train()``.
    ``args.model`` must be a path (DDP workers and ``resume`` reload the architecture from it). With
    ``teacher=<checkpoint>`` it distils from that model (see :mod:`yolo_prune.train.distill`). The weights a
    ``yolo-prune sparsify`` checkpoint set to zero stay zero (:class:`~yolo_prune.train.keep_zeros.KeepZerosMixin`).
    """

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict[str, Any] | None = None, _callbacks: Any = None):
        super().__init__(cfg, overrides, _callbacks)


def finetune(
    model: Any,
    data: Any,
    *,
    epochs: int = 10,
    imgsz: int = 640,
    batch: int = 16,
    device: str | int | None = None,
    project: str | Path | None = None,
    name: str | None = None,
    exist_ok: bool = False,
    seed: int = 0,
    resume: bool | str | Path = False,
    verbose: bool = False,
    distillation: DistillOptions | None = None,
    **train_args: Any,
) -> TrainResult:
    """Fine-tune a (pruned) detector on ``data``, keeping every layer's channel count.

    Args:
        model: a ``.pt`` checkpoint path, or an in-memory ultralytics ``YOLO`` / ``DetectionModel``
            (saved first as ``weights/input.pt`` in the run folder; nothing is written beside user files).
        data: a YOLO- or COCO-format dataset yaml; with ``resume``, None takes the one recorded in ``last.pt``.
        epochs, imgsz, batch, device, seed: as in ultralytics (``device=None``: a GPU if any, else CPU;
            ``"0,1"`` trains with ultralytics DDP).
        project, name, exist_ok: the run folder is ``<project>/<name>``, default ``runs/finetune/finetune`` (name defaults to
            ``finetune``, incremented unless ``exist_ok``).
        resume: continue an interrupted run, in the folder where its ``last.pt`` is now: ``True`` (the run
            folder of ``project``/``name``, or ``model=.../last.pt``) or a path to ``last.pt`` / a run folder.
            Checkpoint settings win.
        verbose: show ultralytics' logs and progress bars; otherwise one INFO line per epoch on the
            ``yolo_prune`` logger (shown by the CLI, silent for library users who do not configure it).
        distillation: a :class:`~yolo_prune.train.distill.DistillOptions`; or pass its fields as keywords:
            teacher: checkpoint to distil from (usually the dense model the student was pruned from); None: plain
            fine-tuning. See :mod:`yolo_prune.train.distill`.
            distill: ``output`` (class scores and DFL box distributions of the head), ``feature`` (ultralytics'
            projector-based feature distillation, weight ``dis``) or ``both``.
            distill_cls, distill_box: weights of the class-score and box-distribution terms; distill_temp: their
            temperature.
            labels: False trains on images alone against the teacher's outputs (no ground-truth loss).
            unlabeled: with ``labels=False``, the training images (a folder, an image-list file or a list of them)
            instead of the data's train split; validation still uses the labeled val split.
        **train_args: any other ultralytics train key (lr0, optimizer, workers, amp, close_mosaic, ...).

    Returns:
        :class:`~yolo_prune.train.TrainResult` with ``best``/``last`` checkpoints and the final mAP of ``best.pt``.
    """
    extra = DistillOptions.take(train_args, distillation).trainer_options()
    _, result = run_training(FinetuneTrainer, "finetune", model, data, epochs=epochs, imgsz=imgsz, batch=batch,
                             device=device, project=project, name=name, exist_ok=exist_ok, seed=seed, resume=resume,
                             verbose=verbose, extra=extra, train_args=train_args)
    return result
