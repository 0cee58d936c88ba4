"""Quantization-aware fine-tuning: ultralytics' loop trains NNCF's fake-quantized (pruned) model.

:class:`QATMixin` wraps the model for QAT in the trainer's model setup (:func:`yolo_prune.qat.prepare_qat`, ranges
calibrated on the first images of the train split, no augmentation), before ultralytics builds the optimizer and the
EMA, so the loop, the EMA (a deep copy), warmup and the LR schedule train it as usual; AMP stays off on CPU as always.
Channel counts are those of the checkpoint (:class:`~yolo_prune.train.keep_arch.KeepArchitectureMixin`). The mixin is
in :class:`~yolo_prune.train.finetune.FinetuneTrainer` (active only on a QAT checkpoint) and in
:class:`~yolo_prune.train.finetune.QATTrainer` (which quantizes a plain model).

NNCF's quantizers cannot be pickled, so ``last.pt`` / ``best.pt`` hold the float EMA with the quantizers'
configuration and ranges as data (:func:`yolo_prune.qat.plain_copy`). Loading such a checkpoint to train it again -
``resume=True`` (``yolo-prune finetune model=.../qat/weights/last.pt resume=True``) or DDP workers, which rebuild
the model from ``args.model`` - re-inserts them
(:func:`yolo_prune.qat.restore_qat`) instead of calibrating anew. ultralytics' final validation reloads ``best.pt``
with BatchNorm folded into the convs, which the weight quantizers' ranges do not fit, so the final metrics are those
``best.pt`` recorded when its epoch was validated (the fake-quantized, unfolded EMA).
"""

from __future__ import annotations

import logging

import torch
from ultralytics.utils import LOGGER, RANK
from ultralytics.utils.patches import torch_load
from ultralytics.utils.torch_utils import strip_optimizer

from ..qat import is_qat, plain_copy, prepare_qat, restore_qat

__all__ = ["QATMixin"]

CALIB_IMAGES = 32  # images of the train split that calibrate the quantizers' initial ranges


class QATMixin:
    """Trainer mixin for quantization-aware training (put it first in the bases).

    With :attr:`qat` True (:class:`~yolo_prune.train.finetune.QATTrainer`) the model is fake-quantized in the model
    setup; a model that already carries quantizers (a QAT checkpoint: ``resume=True``, a DDP worker, or fine-tuning a
    QAT ``best.pt`` again) keeps training with them in any trainer that has the mixin. Otherwise nothing changes.
    """

    #: Insert fake-quantizers into a model that has none.
    qat: bool = False

    def set_model_attributes(self) -> None:
        """ultralytics' model attributes, then the QAT wrap (restored from the checkpoint, or calibrated)."""
        super().set_model_attributes()
        model = self.model
        if getattr(self, "_qat_ready", False) or not (self.qat or is_qat(model)):
            return
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

    @property
    def training_qat(self) -> bool:
        return bool(getattr(self, "_qat_ready", False))

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
        """ultralytics' checkpoints; in QAT they hold the float EMA with the quantizers as data (NNCF's quantizers
        cannot be pickled)."""
        if not self.training_qat:
            return super().save_model()
        ema = self.ema.ema
        self.ema.ema = plain_copy(ema)
        try:
            return super().save_model()
        finally:
            self.ema.ema = ema

    def final_eval(self) -> None:
        """In QAT: strip the optimizer from the checkpoints; the metrics are ``best.pt``'s own (module docstring)."""
        if not self.training_qat:
            return super().final_eval()
        if RANK not in {-1, 0} or not self.best.exists():
            return None
        ckpt = strip_optimizer(self.last) if self.last.exists() else {}
        strip_optimizer(self.best, updates={"train_results": ckpt.get("train_results")})
        metrics = dict(torch_load(self.best, map_location="cpu", weights_only=False).get("train_metrics") or {})
        metrics.pop("fitness", None)
        if metrics:
            self.metrics = metrics
        return None
