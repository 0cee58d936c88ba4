"""One progress line per training epoch, through the ``yolo_prune`` logger.

With ``verbose=False`` the ultralytics trainer's own output (banner, per-batch bars, per-epoch tables)
is silenced, and a long training would otherwise print nothing for minutes. :class:`EpochProgress`
registers ultralytics callbacks (``on_train_start``, ``on_fit_epoch_end``) on a trainer or a ``YOLO``
object and logs, at INFO level on the ``yolo_prune`` logger::

    finetune: 15 epochs, 128 train / 32 val images, imgsz=160, run folder /abs/runs/finetune/finetune
    finetune: epoch 3/15  box 1.234  cls 2.345  dfl 1.111  mAP50-95 0.412  mAP50 0.688  0:42 elapsed, ETA 2:48
    finetune: best.pt mAP50-95 0.455  mAP50 0.712  (15 epochs in 3:30)

The CLI attaches a stderr handler to that logger, so these lines show there; library users see nothing
unless they configure the logger. The callbacks run where the trainer runs: under ultralytics DDP the
training happens in fresh worker processes, which print ultralytics' own output instead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..logs import LOGGER, format_seconds

__all__ = ["EpochProgress", "format_seconds"]


class EpochProgress:
    """ultralytics callbacks that log the start, one line per finished epoch and the final validation.

    ``EpochProgress("sparse").attach(trainer)`` (or ``.attach(YOLO(...))`` before ``train``); ``label``
    starts every line.
    """

    def __init__(self, label: str, logger: logging.Logger = LOGGER):
        self.label = label
        self.logger = logger
        self.t0 = time.time()
        self.first_epoch = 0

    def attach(self, target: Any) -> Any:
        """Register the callbacks on an ultralytics trainer or ``YOLO`` object (both have ``add_callback``)."""
        target.add_callback("on_train_start", self.on_train_start)
        target.add_callback("on_fit_epoch_end", self.on_fit_epoch_end)
        return target

    def on_train_start(self, trainer: Any) -> None:
        self.t0 = time.time()
        self.first_epoch = int(trainer.start_epoch)
        n_train = len(getattr(trainer.train_loader, "dataset", ()) or ())
        n_val = len(getattr(getattr(trainer, "test_loader", None), "dataset", ()) or ())
        start = f"resuming at epoch {self.first_epoch + 1}/{trainer.epochs}" if self.first_epoch else \
            f"{trainer.epochs} epochs"
        self.logger.info("%s: %s, %d train / %d val images, imgsz=%s, run folder %s", self.label, start, n_train,
                         n_val, trainer.args.imgsz, trainer.save_dir)

    def on_fit_epoch_end(self, trainer: Any) -> None:
        done, total = int(trainer.epoch) + 1, int(trainer.epochs)
        elapsed = time.time() - self.t0
        if done > total:  # final_eval: ultralytics validated best.pt and reports it as epoch epochs+1
            self.logger.info("%s: best.pt %s (%d epochs in %s)", self.label, _maps(trainer.metrics),
                             total - self.first_epoch, format_seconds(elapsed))
            return
        losses = "  ".join(f"{k.removesuffix('_loss')} {float(v):.4g}" for k, v in (trainer.tloss or {}).items())
        validated = bool(trainer.args.val) or done >= total
        maps = f"  {_maps(trainer.metrics)}" if validated and trainer.metrics else ""
        eta = elapsed / max(done - self.first_epoch, 1) * (total - done)
        self.logger.info("%s: epoch %d/%d  %s%s  %s elapsed, ETA %s", self.label, done, total, losses, maps,
                         format_seconds(elapsed), format_seconds(eta))


#: The second metric of a task's validator beside the boxes': masks (M), keypoints (P).
_TASK_METRICS = (("M", "mask"), ("P", "pose"))


def _maps(metrics: dict[str, Any]) -> str:
    get = metrics.get
    out = f"mAP50-95 {float(get('metrics/mAP50-95(B)', 0.0)):.3f}  mAP50 {float(get('metrics/mAP50(B)', 0.0)):.3f}"
    for suffix, name in _TASK_METRICS:
        if f"metrics/mAP50-95({suffix})" in metrics:
            out += f"  {name} mAP50-95 {float(get(f'metrics/mAP50-95({suffix})')):.3f}"
    return out
