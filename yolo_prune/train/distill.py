"""Knowledge distillation from a teacher (usually the dense model) while fine-tuning or sparsity-training.

Two kinds, chosen with ``distill``:

* ``output`` (default, ours): the student's raw head outputs follow the teacher's on the same batch images.
  The student and the teacher share the anchor grid (same strides, same image size), so outputs align anchor
  by anchor, whatever the student's pruned widths are.

  - class scores: the binary KL divergence between the teacher's and the student's sigmoid scores, per anchor
    and class (temperature ``distill_temp``), summed over every anchor - background included, where it teaches
    the student *not* to fire - and divided by the teacher's soft foreground count (the sum over anchors of its
    highest class probability), the way ultralytics divides its class loss by the assigned target scores;
  - box distributions (DFL): per anchor and box side, the KL divergence between the teacher's and the student's
    softmax over the ``reg_max`` distance bins (localization distillation), weighted by the teacher's highest
    class probability at that anchor (a box matters where there is an object), same normaliser.

  The term ``distill_cls * class KD + distill_box * box KD`` joins ultralytics' loss as a fourth component
  (``kd_loss``: its own column in ``results.csv`` and the progress bar), scaled by the batch size like
  the others. It is exactly zero when the student's outputs equal the teacher's.
* ``feature``: ultralytics' own :class:`ultralytics.nn.distill_model.DistillationModel` (the ``distill_model``
  train key, set to ``teacher``): 1x1-conv projectors map the student's neck features (the Detect inputs, at
  the student's widths) to the teacher's widths, score-weighted L2, weight ``dis`` (ultralytics key, default 6).
  ultralytics wraps the model itself, strips the teacher from the EMA and unwraps the student when it finalises
  ``last.pt``/``best.pt``; a checkpoint of an *unfinished* run holds the wrapper with the projectors (never the
  teacher). ``both`` combines the two.

Segmentation, pose and OBB models (and a teacher of any of those tasks, or a detector, with the same classes and
strides) distil the same way: their heads are Detect plus a branch, so the ``boxes`` / ``scores`` of the raw outputs
are distilled and the student's task loss (masks, keypoints, angle; ``v8SegmentationLoss``, ``PoseLoss26``...)
passes through :class:`DistillLoss` unchanged, ``kd_loss`` appended after its terms.

``labels=False`` trains without ground truth: the detection loss terms are zero and only the teacher teaches.
The training images are the data's train split (its labels ignored) or ``unlabeled=`` (a folder of images, an
image-list file, or a list of them; linked into yolo-prune's cache, never written to). Validation still uses
the labeled val split.

How the teacher stays out of checkpoints and survives DDP and ``resume``: the trainer holds it as
``self.teacher`` - not a sub-module of the trained model, so it is in neither the EMA, the optimizer, the DDP
module nor any saved file. The teacher travels as a *path* in ``args.teacher`` (like ``sr`` in
:mod:`yolo_prune.train.sparse`: popped from the overrides before ultralytics checks them, put back into
``self.args`` right after; ``vars(args)`` crosses to DDP workers and is stored in every checkpoint as
``train_args``), and every process loads it from there. The teacher runs in :meth:`DistillMixin.preprocess_batch`
(eval mode, no gradients, under the trainer's autocast); its raw head outputs ride in the batch to the student's
criterion, which :class:`DistillLoss` wraps. The wrapper holds no teacher either, and is dropped from saved
models with the rest of the criterion.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.utils import DEFAULT_CFG, LOGGER
from ultralytics.utils.torch_utils import unwrap_model

from ..errors import ModelLoadError, UsageError
from ..forms import PRUNABLE_TASKS, as_detection_model
from ..data.spec import image_folder
from ..options import DistillOptions, choices

__all__ = [
    "DISTILL_DEFAULTS",
    "DISTILL_MODES",
    "DistillLoss",
    "DistillMixin",
    "box_kd",
    "class_kd",
    "load_teacher",
    "output_kd",
]


# --------------------------------------------------------------------------------------------- the options
#: Trainer options of distillation (not ultralytics keys), with their defaults: the keys of
#: :class:`yolo_prune.options.DistillOptions` (a trainer without a ``teacher`` does not distil).
FADES = choices("distill_fade")
DISTILL_DEFAULTS: dict[str, Any] = {**DistillOptions().to_dict(), "teacher": None}
DISTILL_MODES = choices("distill")
#: Batch key carrying the teacher's raw head outputs to the criterion.
TEACHER_KEY = "distill_teacher"
#: Name of the distillation loss component (``train/kd_loss`` in results.csv).
LOSS_NAME = "kd_loss"
#: Loss components that only exist while training (validation has no teacher): kept out of the ``val/`` columns.
_TRAIN_ONLY = (LOSS_NAME, "dis_loss")


# --------------------------------------------------------------------------------------------- the losses
def class_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Class-score distillation of raw logits ``(B, nc, A)``: binary KL per anchor and class, summed, divided by the
    teacher's soft foreground count ``sum_anchors max_c sigmoid(teacher)`` (at least 1), times ``temperature**2``."""
    t, s = teacher.detach().float() / temperature, student.float() / temperature
    p = torch.sigmoid(t)
    # KL(Bernoulli(p_t) || Bernoulli(p_s)) with log-sigmoids: exactly 0 where s == t, no log(0)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    fg = torch.sigmoid(teacher.detach().float()).amax(1).sum().clamp(min=1.0)
    return kl.sum() / fg * temperature**2


def box_kd(student: torch.Tensor, teacher: torch.Tensor, teacher_scores: torch.Tensor, reg_max: int,
           temperature: float = 1.0) -> torch.Tensor:
    """DFL distribution distillation of raw box outputs ``(B, 4*reg_max, A)``: per anchor and side the KL divergence
    of the softmax over the ``reg_max`` bins, summed over sides, weighted per anchor by the teacher's highest class
    probability (``teacher_scores`` are its logits ``(B, nc, A)``), divided by the sum of the weights (at least 1),
    times ``temperature**2``."""
    b, _, a = student.shape
    t = teacher.detach().float().view(b, 4, reg_max, a) / temperature
    s = student.float().view(b, 4, reg_max, a) / temperature
    log_pt, log_ps = F.log_softmax(t, 2), F.log_softmax(s, 2)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(2).sum(1)  # (B, A)
    w = torch.sigmoid(teacher_scores.detach().float()).amax(1)  # (B, A)
    return (kl * w).sum() / w.sum().clamp(min=1.0) * temperature**2


def _branches(raw: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """The prediction dicts of a raw head output: one, or one2many and one2one of an end-to-end head."""
    if "one2many" in raw:
        return [raw[k] for k in ("one2many", "one2one") if isinstance(raw.get(k), dict) and "scores" in raw[k]]
    return [raw]


def head_outputs(preds: Any) -> dict[str, Any]:
    """The raw training outputs (``boxes``, ``scores``, ...) of a Detect head, in train mode or as ``(y, raw)`` in eval."""
    return preds[1] if isinstance(preds, (tuple, list)) else preds


def output_kd(student: Any, teacher: Any, reg_max: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(class KD, box KD)`` between two Detect outputs (train-mode dicts or eval ``(y, raw)`` tuples), averaged over
    the branches both have. Shapes must match anchor by anchor (same strides, same image size, same ``nc``)."""
    s_br, t_br = _branches(head_outputs(student)), _branches(head_outputs(teacher))
    cls_terms, box_terms = [], []
    for s, t in zip(s_br, t_br):
        if s["scores"].shape != t["scores"].shape or s["boxes"].shape != t["boxes"].shape:
            raise UsageError(
                f"teacher and student outputs do not align: scores {tuple(t['scores'].shape)} vs "
                f"{tuple(s['scores'].shape)}, boxes {tuple(t['boxes'].shape)} vs {tuple(s['boxes'].shape)}"
            )
        cls_terms.append(class_kd(s["scores"], t["scores"], temperature))
        box_terms.append(box_kd(s["boxes"], t["boxes"], t["scores"], reg_max, temperature) if reg_max > 1
                         else s["boxes"].float().sub(t["boxes"].detach().float()).abs().mean())
    return torch.stack(cls_terms).mean(), torch.stack(box_terms).mean()


class DistillLoss:
    """The student's criterion plus output distillation (and without the ground-truth terms if ``labels=False``).

    Wraps ultralytics' criterion of the student (``v8DetectionLoss`` or ``E2ELoss``). Called as the criterion:
    ``(preds, batch) -> (loss vector * batch size, {name: detached item})``. The teacher's raw outputs come in
    ``batch["distill_teacher"]`` (put there by :meth:`DistillMixin.preprocess_batch`); a batch without them (the
    validator's) gets the plain criterion. Holds no teacher: it may be deep-copied with the model freely.
    """

    def __init__(self, base: Any, *, reg_max: int, cls_weight: float = 1.0, box_weight: float = 1.0,
                 temperature: float = 1.0, labels: bool = True):
        self.base = base
        self.reg_max = int(reg_max)
        self.cls_weight, self.box_weight, self.temperature = float(cls_weight), float(box_weight), float(temperature)
        self.labels = bool(labels)
        self.scale = 1.0  # the fade's factor on both distillation terms, set each batch by the trainer

    def __getattr__(self, name: str) -> Any:  # hyp, stride, update()... of the wrapped criterion
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def update(self) -> None:
        if hasattr(self.base, "update"):
            self.base.update()

    def __call__(self, preds: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher = batch.get(TEACHER_KEY)
        if teacher is None:  # validation: no teacher outputs, plain detection loss
            return self.base(preds, batch)
        bs = batch["img"].shape[0]
        if self.labels:
            loss, items = self.base(preds, batch)
        else:
            names = getattr(self.base, "loss_names", None)
            if names is None:
                _, items = self.base(preds, batch)
                names = tuple(items)
            loss = torch.zeros(len(names), device=batch["img"].device)
            items = {k: torch.zeros((), device=batch["img"].device) for k in names}
        kd = torch.zeros((), device=loss.device)
        if teacher and (self.cls_weight or self.box_weight):
            c, b = output_kd(preds, teacher, self.reg_max, self.temperature)
            kd = self.scale * (self.cls_weight * c + self.box_weight * b)
        items = {**items, LOSS_NAME: kd.detach()}
        return torch.cat([loss.reshape(-1), (kd * bs).reshape(1).to(loss.dtype)]), items


# --------------------------------------------------------------------------------------------- the teacher
def load_teacher(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Load a teacher checkpoint: fp32, eval mode, Conv+BN fused (it only runs inference), no gradients."""
    if Path(str(path)).suffix.lower() in (".yaml", ".yml"):
        raise ModelLoadError(f"teacher {path} is a model yaml: the teacher must be a trained .pt checkpoint")
    model = as_detection_model(Path(str(path)), what="teacher", tasks=PRUNABLE_TASKS)
    model = model.float().fuse(verbose=False).eval().to(device)
    for q in model.parameters():
        q.requires_grad_(False)
    model.criterion = None
    return model


def check_pair(student: nn.Module, teacher: nn.Module, what: str = "teacher") -> None:
    """Refuse a teacher whose outputs cannot align with the student's: other class count, ``reg_max`` or strides."""
    s, t = student.model[-1], teacher.model[-1]
    if int(getattr(s, "nc", -1)) != int(getattr(t, "nc", -2)):
        raise UsageError(f"the {what} has {t.nc} classes but the student has {s.nc}: output distillation needs "
                         "the same classes (distill=feature does not)")
    if int(getattr(s, "reg_max", 0)) != int(getattr(t, "reg_max", 0)):
        raise UsageError(f"the {what} has reg_max={t.reg_max} but the student has {s.reg_max}")
    if not torch.equal(torch.as_tensor(s.stride).float().cpu(), torch.as_tensor(t.stride).float().cpu()):
        raise UsageError(f"the {what}'s strides {t.stride.tolist()} differ from the student's {s.stride.tolist()}")


def check_options(values: dict[str, Any]) -> dict[str, Any]:
    """Normalise and check distillation options (in place): :class:`UsageError` on a bad value."""
    teacher = values.get("teacher")
    if teacher in (False, "", "none", "None", "null", "false", "False"):
        teacher = None
    if teacher is not None and not isinstance(teacher, (str, Path)):
        raise UsageError(f"teacher must be a checkpoint path, got {type(teacher).__name__}")
    values["teacher"] = None if teacher is None else str(Path(str(teacher)).expanduser().absolute())
    if values.get("distill") not in DISTILL_MODES:
        raise UsageError(f"distill must be one of {', '.join(DISTILL_MODES)}, got {values.get('distill')!r}")
    for key, strict in (("distill_cls", False), ("distill_box", False), ("distill_temp", True)):
        v = values.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (strict and v == 0):
            raise UsageError(f"{key} must be a number {'>' if strict else '>='} 0, got {v!r}")
        values[key] = float(v)
    if values.get("distill_fade", DISTILL_DEFAULTS["distill_fade"]) not in FADES:
        raise UsageError(f"distill_fade must be one of {', '.join(FADES)}, got {values.get('distill_fade')!r}")
    if not isinstance(values.get("labels"), bool):
        raise UsageError(f"labels must be True or False, got {values.get('labels')!r}")
    if not values["labels"] and values["teacher"] is None:
        raise UsageError("labels=False trains against a teacher's outputs: give teacher=<checkpoint>")
    unlabeled = values.get("unlabeled")
    if unlabeled in ("", "none", "None", False):
        unlabeled = None
    if unlabeled is not None:
        if values["labels"]:
            raise UsageError("unlabeled= images are for training without labels: add labels=False")
        items = list(unlabeled) if isinstance(unlabeled, (list, tuple)) else [unlabeled]
        unlabeled = [str(Path(str(u)).expanduser().absolute()) for u in items]
        unlabeled = unlabeled[0] if len(unlabeled) == 1 else unlabeled
    values["unlabeled"] = unlabeled
    return values


class _DropMessages(logging.Filter):
    """Logging filter dropping records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# --------------------------------------------------------------------------------------------- the trainer side
class DistillMixin:
    """Trainer mixin adding distillation from ``args.teacher``; put it first in the bases:
    ``class T(DistillMixin, KeepArchitectureMixin, DetectionTrainer)``.

    Options (not ultralytics keys, see :data:`DISTILL_DEFAULTS`): ``teacher`` (checkpoint path; None: off),
    ``distill`` (output | feature | both), ``distill_cls``, ``distill_box``, ``distill_temp``, ``distill_fade``, ``labels``,
    ``unlabeled``. They are popped from the overrides before ultralytics checks them and put back into
    ``self.args`` (so DDP workers and resumed runs get them; a resumed run keeps its checkpoint's values).
    """

    extra_arg_keys: tuple[str, ...] = tuple(DISTILL_DEFAULTS)

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict[str, Any] | None = None, _callbacks: Any = None):
        overrides = dict(overrides or {})
        self._distill_overrides = {k: overrides.pop(k) for k in DISTILL_DEFAULTS if k in overrides}
        self.teacher: nn.Module | None = None
        super().__init__(cfg, overrides, _callbacks)

    def check_resume(self, overrides: dict[str, Any]) -> None:
        """ultralytics' resume check, then the distillation options into ``self.args`` (checkpoint values win)."""
        super().check_resume(overrides)
        given = getattr(self, "_distill_overrides", {})
        stored = vars(self.args)
        values = {}
        for key, default in DISTILL_DEFAULTS.items():
            if self.resume and key in stored:
                if key in given and given[key] != stored[key]:
                    LOGGER.warning(f"resume keeps {key}={stored[key]!r} of the checkpoint, ignoring {key}={given[key]!r}")
                values[key] = stored[key]
            else:
                values[key] = given.get(key, stored.get(key, default))
        for key, value in check_options(values).items():
            setattr(self.args, key, value)
        if self.args.teacher is not None and self.args.distill in ("feature", "both"):
            self.args.distill_model = self.args.teacher  # ultralytics' DistillationModel does the feature part

    # What is active --------------------------------------------------------------------------------
    @property
    def distill_outputs(self) -> bool:
        """True when the student's outputs are distilled from the teacher's (``distill`` output or both)."""
        a = self.args
        return a.teacher is not None and a.distill in ("output", "both") and bool(a.distill_cls or a.distill_box)

    @property
    def distill_criterion(self) -> bool:
        """True when the student's criterion is wrapped: output distillation, or no labels."""
        return self.args.teacher is not None and (self.distill_outputs or not self.args.labels)

    @property
    def distill_scale(self) -> float:
        """The factor on the distillation terms this epoch: 1, or with ``distill_fade=linear`` 1 - epoch/epochs."""
        if getattr(self.args, "distill_fade", DISTILL_DEFAULTS["distill_fade"]) != "linear":
            return 1.0
        return 1.0 - int(getattr(self, "epoch", 0)) / max(int(self.epochs), 1)

    # Setup -----------------------------------------------------------------------------------------
    def get_dataset(self) -> dict:
        """The dataset; with ``unlabeled=`` its train split is replaced by those images (linked into the cache)."""
        data = super().get_dataset()
        if getattr(self.args, "unlabeled", None):
            data["train"] = str(image_folder(self.args.unlabeled))
        return data

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None) -> Any:
        """ultralytics' dataset; without labels its warning that the train labels are empty is expected, not shown."""
        if mode != "train" or getattr(self.args, "labels", True):
            return super().build_dataset(img_path, mode, batch)
        quiet = _DropMessages("Labels are missing or empty")
        LOGGER.addFilter(quiet)
        try:
            return super().build_dataset(img_path, mode, batch)
        finally:
            LOGGER.removeFilter(quiet)

    def setup_model(self) -> Any:
        """The student (ultralytics' setup), then the teacher from ``args.teacher`` when outputs are distilled."""
        ckpt = super().setup_model()
        if self.distill_outputs:
            self.teacher = load_teacher(self.args.teacher, self.device)
            student = unwrap_model(self.model)
            check_pair(getattr(student, "student_model", student), self.teacher)
            LOGGER.info(f"distillation: teacher {self.args.teacher} (distill={self.args.distill}, "
                        f"cls={self.args.distill_cls:g}, box={self.args.distill_box:g}, T={self.args.distill_temp:g}, "
                        f"fade={self.args.distill_fade}, "
                        f"labels={self.args.labels})")
        return ckpt

    def _student(self) -> nn.Module:
        m = unwrap_model(self.model)
        return getattr(m, "student_model", m)  # inside ultralytics' DistillationModel (distill=feature/both)

    def _install_criterion(self) -> None:
        student = self._student()
        criterion = getattr(student, "criterion", None)
        if isinstance(criterion, DistillLoss):
            return
        base = criterion if criterion is not None else student.init_criterion()
        student.criterion = DistillLoss(
            base, reg_max=int(getattr(student.model[-1], "reg_max", 16)), cls_weight=self.args.distill_cls,
            box_weight=self.args.distill_box, temperature=self.args.distill_temp, labels=self.args.labels,
        )

    # Every batch -----------------------------------------------------------------------------------
    def preprocess_batch(self, batch: dict) -> dict:
        """ultralytics' preprocessing, then the teacher's raw head outputs on the same images (no gradients)."""
        batch = super().preprocess_batch(batch)
        if self.distill_criterion:
            self._install_criterion()  # after the EMA copy was made: the EMA keeps the plain criterion
            self._student().criterion.scale = self.distill_scale
            raw: dict[str, Any] = {}
            if self.teacher is not None:
                with torch.no_grad():
                    raw = head_outputs(self.teacher(batch["img"]))
                raw = {k: v for k, v in raw.items() if k != "feats"}  # boxes/scores (or the e2e branches)
                for k, v in list(raw.items()):
                    if isinstance(v, dict):
                        raw[k] = {kk: vv for kk, vv in v.items() if kk != "feats"}
            batch[TEACHER_KEY] = raw
        return batch

    def label_loss_items(self, loss_items: Any = None, prefix: str = "train") -> Any:
        """ultralytics' loss labels, without the ``val/`` columns of training-only terms (the validator has no
        teacher, they would always read 0)."""
        out = super().label_loss_items(loss_items, prefix)
        if prefix != "val":
            return out
        drop = tuple(f"{prefix}/{k}" for k in _TRAIN_ONLY)
        if isinstance(out, dict):
            return {k: v for k, v in out.items() if k not in drop}
        return [k for k in out if k not in drop]


def distill_options(
    teacher: Any = None,
    distill: str = "output",
    distill_cls: float = 1.0,
    distill_box: float = 1.0,
    distill_temp: float = 1.0,
    distill_fade: str = "linear",
    labels: bool = True,
    unlabeled: Any = None,
) -> dict[str, Any]:
    """Checked trainer options for the API functions; ``{}`` when no teacher (nothing to add to the run's args).

    ``teacher`` is a checkpoint path (``"auto"``, ``None``, ``False`` or ``"none"``: no teacher; only the pipeline
    knows a dense model to use for ``"auto"``). It is loaded once here so that a bad file fails before any run
    folder is written.
    """
    if isinstance(teacher, str) and teacher.strip().lower() == "auto":
        teacher = None
    if teacher is not None and teacher is not False and not isinstance(teacher, (str, Path)):
        raise UsageError("teacher must be a checkpoint path (save an in-memory model first, e.g. with "
                         "yolo_prune.models.save_checkpoint or model.save())")
    values = check_options({"teacher": teacher, "distill": distill, "distill_cls": distill_cls,
                            "distill_box": distill_box, "distill_temp": distill_temp, "distill_fade": distill_fade,
                            "labels": labels, "unlabeled": unlabeled})
    if values["teacher"] is None:
        return {}
    load_teacher(values["teacher"])  # a missing or broken file fails here, before a run folder exists
    return values
