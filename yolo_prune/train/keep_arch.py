"""Train the checkpoint's own (pruned) module with ultralytics, never a yaml rebuild.

Why this exists (the traps of training a *pruned* model with ultralytics):

* ``DetectionTrainer.get_model`` rebuilds the network from ``model.yaml`` and then copies only the weights
  whose shapes match. For a pruned checkpoint the yaml describes the *unpruned* widths, so a plain
  ``YOLO(pruned.pt).train()`` silently trains a randomly initialised unpruned model.
  :class:`KeepArchitectureMixin` returns the checkpoint's own module instead.
* ultralytics DDP re-creates the trainer in a fresh process from ``vars(trainer.args)`` (see
  ``ultralytics/utils/dist.py``): whatever was passed in memory is lost, and the launcher deletes the
  run folder first. The model therefore always travels as a checkpoint *path* in ``args.model``,
  and trainer-specific options travel inside ``args`` (see :mod:`yolo_prune.train.sparse`).
* ultralytics writes ``last.pt`` / ``best.pt`` in place; a kill during the write leaves a truncated
  checkpoint that cannot be resumed. The mixin writes them atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import LOGGER, RANK, IterableSimpleNamespace

from ..errors import DatasetError, UsageError
from ..io import write_text
from ..models import reset_class_head

__all__ = ["KeepArchitectureMixin"]


class KeepArchitectureMixin:
    """Mixin for ultralytics trainers: train the checkpoint's own module, never a yaml rebuild.

    Put it *before* the ultralytics trainer in the bases: ``class T(KeepArchitectureMixin, DetectionTrainer)``.

    * :meth:`get_model` returns ``weights`` itself (float32, every parameter trainable) when
      ``BaseTrainer.setup_model`` hands it a loaded checkpoint module. ``setup_model`` loads that
      module from ``self.args.model`` - a path - so DDP ranks and ``resume=True`` (where
      ``args.model`` is ``last.pt``) rebuild the pruned architecture from disk.
    * :meth:`save_model` writes ``last.pt`` / ``best.pt`` atomically.
    * :meth:`train` keeps an input checkpoint that lives inside the run folder alive across the
      ultralytics DDP launcher, which deletes the run folder before it starts the workers.
    * Keys listed in :attr:`extra_arg_keys` (a subclass's own options, stored in ``self.args`` so that
      they reach DDP workers and resumed runs) are hidden from the validator, whose config check
      rejects keys ultralytics does not know.
    """

    #: Non-ultralytics keys a subclass keeps in ``self.args``.
    extra_arg_keys: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = str(self.args.model or "")
        if model.lower().endswith(".pt") and not self.resume and self.args.pretrained is not True:
            raise UsageError(
                f"pretrained={self.args.pretrained!r} is not supported when training a checkpoint: the checkpoint "
                "itself is the model (pruned architectures cannot be rebuilt from their yaml)"
            )

    @classmethod
    def all_extra_arg_keys(cls) -> set[str]:
        """:attr:`extra_arg_keys` of this class and of every base (e.g. a distillation mixin's and the trainer's own)."""
        return {k for c in cls.__mro__ for k in vars(c).get("extra_arg_keys", ())}

    # The model -------------------------------------------------------------------------------------
    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        """Return ``weights`` itself (the loaded checkpoint module) instead of a model rebuilt from ``cfg``.

        Without ``weights`` (a ``.yaml`` model, i.e. random init), or for a ``.yaml`` model with ``pretrained=<.pt>``,
        this is the ultralytics behaviour.
        If the dataset has a different class count than the checkpoint, the ultralytics rebuild (new
        class head, all other weights copied) is used when it reproduces every other shape, i.e.
        for an unpruned model; a pruned model keeps its architecture and only Detect's final class convs
        are replaced for the new class count (:func:`yolo_prune.models.reset_class_head`).
        """
        if not isinstance(weights, nn.Module) or not str(self.args.model or "").lower().endswith(".pt"):
            # a model yaml, random init or ``pretrained=<.pt>`` (weights of matching shapes loaded into the yaml's
            # model, e.g. a detector's backbone into a segmentation model): ultralytics' own build
            return super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        model = weights.float()
        _check_keypoints(model, self.data)
        nc, model_nc = int(self.data["nc"]), _model_nc(model)
        if model_nc is not None and model_nc != nc:
            if _rebuild_keeps_shapes(model, model_nc):
                LOGGER.info(f"model has nc={model_nc}, data nc={nc}: rebuilding the class head (model is unpruned)")
                return super().get_model(cfg=cfg, weights=weights, verbose=verbose)

            kept = reset_class_head(model, nc, names=self.data.get("names"))
            LOGGER.info(f"model has nc={model_nc}, data nc={nc}: new class output convs for the pruned head "
                        f"({kept} class(es) kept by name), every other weight kept")
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.requires_grad_(True)
        if hasattr(model, "criterion"):
            model.criterion = None  # rebuilt lazily with this run's hyperparameters
        model.train()
        set_names = getattr(self, "set_model_names_for_load", None)  # ultralytics >= 8.4
        return set_names(model) if set_names is not None else model

    def get_validator(self) -> Any:
        """ultralytics' validator, built from ``self.args`` without :attr:`extra_arg_keys`."""
        full, hidden = self.args, self.all_extra_arg_keys()
        self.args = IterableSimpleNamespace(**{k: v for k, v in vars(full).items() if k not in hidden})
        try:
            return super().get_validator()
        finally:
            self.args = full

    def get_dataset(self) -> dict:
        """ultralytics' dataset check, with its errors turned into :class:`DatasetError`."""
        try:
            return super().get_dataset()
        except RuntimeError as e:
            raise DatasetError(str(e).replace("❌ ", "")) from None

    # Checkpoints ----------------------------------------------------------------------------------
    def save_model(self) -> bool:
        """ultralytics' ``save_model``, but ``last.pt`` and ``best.pt`` are replaced atomically."""
        last, best = Path(self.last), Path(self.best)
        tmp_last, tmp_best = last.with_name(f".{last.name}.tmp"), best.with_name(f".{best.name}.tmp")
        for t in (tmp_last, tmp_best):
            t.unlink(missing_ok=True)
        self.last, self.best = tmp_last, tmp_best
        try:
            saved = super().save_model()
            if tmp_best.exists():
                os.replace(tmp_best, best)
            if tmp_last.exists():
                os.replace(tmp_last, last)
        finally:
            self.last, self.best = last, best
            for t in (tmp_last, tmp_best):
                t.unlink(missing_ok=True)
        return saved

    def resume_training(self, ckpt: dict | None) -> None:
        """ultralytics' resume, then drop ``results.csv`` rows of epochs the checkpoint does not contain
        (a run killed between writing the epoch's metrics and its checkpoint would log that epoch twice)."""
        super().resume_training(ckpt)
        if ckpt is not None and self.resume and RANK in {-1, 0}:
            _trim_results_csv(Path(self.csv), self.start_epoch)

    # DDP -------------------------------------------------------------------------------------------
    def train(self) -> None:
        """Train. Under ultralytics DDP an input checkpoint stored in the run folder is moved out of the
        way while the launcher wipes the folder, and put back afterwards."""
        src = Path(str(self.args.model or ""))
        save_dir = Path(self.save_dir).resolve()
        if not (self.ddp and not self.resume and src.suffix == ".pt" and src.is_file()):
            return super().train()
        src = src.resolve()
        if save_dir not in src.parents:
            return super().train()
        tmp = save_dir.parent / f".{save_dir.name}.{src.name}"
        shutil.copy2(src, tmp)
        self.args.model = self.model = str(tmp)
        try:
            return super().train()
        finally:
            src.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, src)
            self.args.model = self.model = str(src)


def _trim_results_csv(path: Path, last_epoch: int) -> None:
    """Keep the header and the rows of epochs ``<= last_epoch`` (1-based, as ultralytics writes them)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = lines[:1]
    for line in lines[1:]:
        try:
            epoch = float(line.split(",", 1)[0])
        except ValueError:
            epoch = None
        if epoch is not None and epoch <= last_epoch:
            keep.append(line)
    if len(keep) != len(lines):
        write_text(path, "\n".join(keep) + "\n")


def _check_keypoints(model: nn.Module, data: dict) -> None:
    """A pose model trains on data with its own keypoints: :class:`UsageError` naming both shapes otherwise (its
    pruned keypoint head cannot be rebuilt for other keypoints)."""
    model_kpt = getattr(model.model[-1], "kpt_shape", None) if isinstance(getattr(model, "model", None),
                                                                          nn.Sequential) else None
    data_kpt = data.get("kpt_shape")
    if model_kpt is not None and data_kpt is not None and list(model_kpt) != list(data_kpt):
        raise UsageError(f"the model predicts keypoints of shape {list(model_kpt)} but the data has kpt_shape "
                         f"{list(data_kpt)}: train a pose model on data with its own keypoints")


def _model_nc(model: nn.Module) -> int | None:
    """Class count of a detection model: its head's ``nc`` (``DetectionModel`` has no ``nc`` until trained)."""
    head = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else None
    nc = getattr(head, "nc", None) or getattr(model, "nc", None)
    return None if nc is None else int(nc)


def _rebuild_keeps_shapes(model: nn.Module, nc: int) -> bool:
    """True if the model class of ``model`` (``DetectionModel``, ``SegmentationModel``...) rebuilt from its yaml has
    exactly the parameter names and shapes of ``model``."""
    cls = type(model) if isinstance(model, DetectionModel) else DetectionModel
    try:
        rebuilt = cls(model.yaml, nc=nc, verbose=False)
    except Exception:
        return False
    a = {k: v.shape for k, v in model.state_dict().items()}
    b = {k: v.shape for k, v in rebuilt.state_dict().items()}
    return a == b
