"""Quantization-aware fine-tuning: ultralytics' loop trains NNCF's fake-quantized (pruned) model.

:class:`QATMixin` wraps the model for QAT in the trainer's model setup (:func:`yolo_prune.qat.prepare_qat`, ranges
calibrated on the first images of the train split, no augmentation), before ultralytics builds the optimizer and the
EMA, so the loop, the EMA (a deep copy), warmup and the LR schedule train it as usual; AMP stays off on CPU as always.
Channel counts are those of the checkpoint (:class:`~yolo_prune.train.keep_arch.KeepArchitectureMixin`).

NNCF's quantizers cannot be pickled, so ``last.pt`` / ``best.pt`` hold the float EMA with the quantizers'
configuration and ranges as data (:func:`yolo_prune.qat.plain_copy`). Loading such a checkpoint to train it again -
``resume=True`` or DDP workers, which rebuild the model from ``args.model`` - re-inserts them
(:func:`yolo_prune.qat.restore_qat`) instead of calibrating anew. ultralytics' final validation reloads ``best.pt``
with BatchNorm folded into the convs, which the weight quantizers' ranges do not fit, so the final metrics are those
``best.pt`` recorded when its epoch was validated (the fake-quantized, unfolded EMA).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from ultralytics.utils import LOGGER, RANK
from ultralytics.utils.patches import torch_load
from ultralytics.utils.torch_utils import strip_optimizer

from ..options import RunOptions, TrainOptions
from ..qat import is_qat, plain_copy, prepare_qat, restore_qat
from .finetune import FinetuneTrainer
from .results import TrainResult
from .run import run_training

__all__ = ["QATMixin", "QATTrainer", "qat_finetune"]

CALIB_IMAGES = 32  # images of the train split that calibrate the quantizers' initial ranges


class QATMixin:
    """Trainer mixin: train the model fake-quantized by NNCF (put it first in the bases)."""

    def set_model_attributes(self) -> None:
        """ultralytics' model attributes, then the QAT wrap (restored from the checkpoint, or calibrated)."""
        super().set_model_attributes()
        if getattr(self, "_qat_ready", False):
            return
        model = self.model
        if is_qat(model):
            self.model = restore_qat(model)
            LOGGER.info("quantization-aware training: quantizers restored from the checkpoint")
        else:
            self.model = prepare_qat(model, self._calibration_images(), verbose=LOGGER.isEnabledFor(logging.INFO))
            LOGGER.info("quantization-aware training: NNCF fake-quantizers inserted (Detect's decode stays float)")
        self.model.args, self.model.nc, self.model.names = model.args, model.nc, model.names
        for p in self.model.parameters():
            if p.dtype.is_floating_point:
                p.requires_grad_(True)
        self._qat_ready = True

    def _calibration_images(self) -> list[torch.Tensor]:
        """The first :data:`CALIB_IMAGES` images of the train split as the validator sees them (letterboxed, [0, 1];
        one ``(3, H, W)`` tensor each: rectangular batches differ in size)."""
        batch = max(1, min(int(self.batch_size), CALIB_IMAGES)) if int(self.batch_size) >= 1 else 16
        loader = self.get_dataloader(self.data["train"], batch_size=batch, rank=-1, mode="val")
        images: list[torch.Tensor] = []
        for b in loader:
            images.extend(self.preprocess_batch(b)["img"].float().cpu())
            if len(images) >= CALIB_IMAGES:
                break
        return images[:CALIB_IMAGES]

    def save_model(self) -> bool:
        """ultralytics' checkpoints, holding the float EMA with the quantizers as data (they cannot be pickled)."""
        ema = self.ema.ema
        self.ema.ema = plain_copy(ema)
        try:
            return super().save_model()
        finally:
            self.ema.ema = ema

    def final_eval(self) -> None:
        """Strip the optimizer from the checkpoints; the metrics are ``best.pt``'s own (see the module docstring)."""
        if RANK not in {-1, 0} or not self.best.exists():
            return
        ckpt = strip_optimizer(self.last) if self.last.exists() else {}
        strip_optimizer(self.best, updates={"train_results": ckpt.get("train_results")})
        metrics = dict(torch_load(self.best, map_location="cpu", weights_only=False).get("train_metrics") or {})
        metrics.pop("fitness", None)
        if metrics:
            self.metrics = metrics


class QATTrainer(QATMixin, FinetuneTrainer):
    """:class:`~yolo_prune.train.finetune.FinetuneTrainer` with quantization-aware training."""


def qat_finetune(model: Any, data: Any, train: TrainOptions, run: RunOptions,
                 train_args: dict[str, Any] | None = None) -> TrainResult:
    """Quantization-aware fine-tuning of ``model`` (a checkpoint path or in-memory model) on ``data`` in the run folder
    of ``run`` (``runs/qat/qat`` by default); returns the :class:`TrainResult` (``best`` holds the quantizer state)."""
    _, result = run_training(QATTrainer, "qat", model, data, train, run, train_args=train_args)
    return result
