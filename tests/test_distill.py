"""Distillation from a teacher (yolo_prune.train.distill): the output terms, the criterion wrapper, the trainer's
options across DDP/resume, label-free training, and - above all - no teacher in any saved checkpoint.

The teacher is the dense random-init yolov8n (randomised BN) the test student was pruned from.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from yolo_prune.errors import DatasetError, ModelLoadError, UsageError
from yolo_prune.options import DistillOptions
from yolo_prune.train import FinetuneTrainer, SparseTrainer, finetune, sparse_train
from yolo_prune.train.distill import (
    LOSS_NAME,
    TEACHER_KEY,
    DistillLoss,
    box_kd,
    class_kd,
    distill_options,
    load_teacher,
    output_kd,
)

from .helpers import FAST, NC, ROOT, make_pruned_model, randomize_bn, read_csv, run_ddp_file, save_like_ultralytics
from .helpers import shapes
from .helpers import subprocess_env as _env

pytestmark = pytest.mark.usefixtures("data_cache")


# ----------------------------------------------------------------------------------------------- fixtures
def _dense(nc: int = NC, seed: int = 0) -> nn.Module:
    """The dense model make_pruned_model() prunes (same seed, same randomised BN)."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    return randomize_bn(DetectionModel("yolov8n.yaml", nc=nc, verbose=False), seed=seed)


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory) -> Path:
    return save_like_ultralytics(_dense(), tmp_path_factory.mktemp("teacher") / "dense.pt")


@pytest.fixture(scope="module")
def pruned_pt(tmp_path_factory) -> Path:
    return save_like_ultralytics(make_pruned_model(), tmp_path_factory.mktemp("student") / "pruned.pt")


def _batch(n: int = 2, imgsz: int = 64, seed: int = 0) -> dict:
    """A preprocessed-looking training batch with two boxes (uint8 images, like the dataloader gives)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "img": (torch.rand(n, 3, imgsz, imgsz, generator=g) * 255).to(torch.uint8),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [2.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]]),
    }


def _detection_models(obj, seen=None) -> list[nn.Module]:
    """Every DetectionModel (or ultralytics DistillationModel) reachable from a loaded checkpoint object."""
    from ultralytics.nn.tasks import BaseModel

    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (torch.Tensor, str, bytes, int, float, bool, type(None))):
        return []
    seen.add(id(obj))
    found = []
    if isinstance(obj, nn.Module):
        if isinstance(obj, BaseModel) or type(obj).__name__ == "DistillationModel":
            found.append(obj)
        for m in obj.children():
            found += _detection_models(m, seen)
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        items = obj
    else:
        items = vars(obj).values() if hasattr(obj, "__dict__") else []
    for v in items:
        found += _detection_models(v, seen)
    return found


def assert_no_teacher(path: Path, pruned_pt: Path) -> dict:
    """The checkpoint holds exactly one model - the pruned student - and reloads with the pruned shapes."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    models = _detection_models(ckpt)
    assert len(models) == 1, [type(m).__name__ for m in models]
    assert type(models[0]).__name__ == "DetectionModel"
    names = [n for n, _ in models[0].named_modules()]
    assert not any("teacher" in n or "projector" in n for n in names)
    assert shapes(models[0]) == shapes(pruned_pt)
    from ultralytics import YOLO

    assert shapes(YOLO(str(path)).model) == shapes(pruned_pt)
    return ckpt


# ----------------------------------------------------------------------------------------------- the terms
def test_output_terms_vanish_for_equal_outputs_and_pull_the_student_to_the_teacher():
    g = torch.Generator().manual_seed(0)
    t_cls, t_box = torch.randn(2, NC, 50, generator=g) * 3, torch.randn(2, 64, 50, generator=g)
    assert class_kd(t_cls.clone(), t_cls) == 0
    assert box_kd(t_box.clone(), t_box, t_cls, 16) == 0
    for temp in (1.0, 2.0):
        c, b = output_kd({"scores": t_cls, "boxes": t_box}, ({}, {"scores": t_cls, "boxes": t_box}), 16, temp)
        assert float(c) == 0 and float(b) == 0
    s_cls = torch.zeros_like(t_cls, requires_grad=True)
    s_box = torch.zeros_like(t_box, requires_grad=True)
    opt = torch.optim.Adam([s_cls, s_box], lr=0.1)
    losses = []
    for _ in range(100):
        c, b = output_kd({"scores": s_cls, "boxes": s_box}, {"scores": t_cls, "boxes": t_box}, 16)
        opt.zero_grad()
        (c + b).backward()
        opt.step()
        losses.append(float((c + b).detach()))
    assert losses[0] > 0 and losses[-1] < 0.05 * losses[0]
    assert (torch.sigmoid(s_cls) - torch.sigmoid(t_cls)).abs().mean() < (0.5 - torch.sigmoid(t_cls)).abs().mean()
    with pytest.raises(UsageError, match="do not align"):
        output_kd({"scores": t_cls[..., :40], "boxes": t_box[..., :40]}, {"scores": t_cls, "boxes": t_box}, 16)


def test_distill_loss_wraps_the_student_criterion(pruned_pt, teacher_pt):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import load_checkpoint

    student, _ = load_checkpoint(pruned_pt)
    student.args = get_cfg()
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    teacher = load_teacher(teacher_pt)
    batch = _batch()
    batch["img"] = batch["img"].float() / 255
    preds = student(batch["img"])
    base = student.init_criterion()
    plain, plain_items = base(preds, batch)
    with torch.no_grad():
        raw = teacher(batch["img"])[1]
    wrapped = DistillLoss(base, reg_max=16, cls_weight=2.0, box_weight=0.5)
    loss, items = wrapped(preds, {**batch, TEACHER_KEY: raw})
    assert list(items) == [*plain_items, LOSS_NAME] and loss.shape == (4,)
    assert torch.allclose(loss[:3], plain)
    c, b = output_kd(preds, raw, 16)
    assert torch.isclose(items[LOSS_NAME], 2.0 * c + 0.5 * b) and float(items[LOSS_NAME]) > 0
    assert torch.isclose(loss[3], items[LOSS_NAME] * 2)  # times the batch size, like ultralytics' terms
    loss.sum().backward()  # the KD term reaches the student's weights
    assert student.model[-1].cv3[0][-1].weight.grad.abs().sum() > 0
    # validation batches carry no teacher outputs: plain criterion
    val_loss, val_items = wrapped(preds, batch)
    assert list(val_items) == list(plain_items) and torch.allclose(val_loss, plain)
    # label-free: the ground-truth terms are zero, the KD term stays
    free, free_items = DistillLoss(base, reg_max=16, labels=False)(preds, {**batch, TEACHER_KEY: raw})
    assert float(free[:3].abs().sum()) == 0 and float(free[3]) > 0
    assert set(free_items) == set(items)
    assert copy.deepcopy(wrapped).cls_weight == 2.0  # no teacher inside: copies freely with the model


def test_distill_loss_under_autocast(pruned_pt, teacher_pt):
    """Under AMP (here CPU bfloat16 autocast, as ultralytics wraps forward and loss) the term is computed in float32
    from half-precision outputs and stays close to the float32 value."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import load_checkpoint

    student, _ = load_checkpoint(pruned_pt)
    student.args = get_cfg()
    student.train()
    teacher = load_teacher(teacher_pt)
    batch = _batch()
    batch["img"] = batch["img"].float() / 255
    values = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled), torch.no_grad():
            raw = teacher(batch["img"])[1]
            preds = student(batch["img"])
            loss, items = DistillLoss(student.init_criterion(), reg_max=16)(preds, {**batch, TEACHER_KEY: raw})
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
        values.append(float(items[LOSS_NAME]))
    assert values[1] == pytest.approx(values[0], rel=0.1)


def test_distillation_term_is_zero_when_student_equals_teacher(teacher_pt, data, tmp_path):
    """The trainer's whole path (preprocess_batch -> teacher outputs -> wrapped criterion) on a student that is the
    teacher itself, both in eval mode (BN running statistics): the term is zero."""
    trainer = FinetuneTrainer(overrides={"model": str(teacher_pt), "data": data, "teacher": str(teacher_pt),
                                         "save_dir": str(tmp_path / "t"), "plots": False, **FAST})
    trainer.setup_model()
    trainer.model = trainer.model.to(trainer.device)
    trainer.set_model_attributes()
    batch = trainer.preprocess_batch(_batch())
    assert isinstance(trainer.model.criterion, DistillLoss) and batch[TEACHER_KEY]["scores"].shape[1] == NC
    trainer.model.eval()
    with torch.no_grad():
        _, items = trainer.model.loss(batch, trainer.model(batch["img"]))
    assert float(items[LOSS_NAME]) < 1e-5  # fused teacher vs unfused student: float rounding only
    # and a different student is not zero
    trainer.model.model[-1].cv3[0][-1].bias.data += 1.0
    with torch.no_grad():
        _, items = trainer.model.loss(batch, trainer.model(batch["img"]))
    assert float(items[LOSS_NAME]) > 0.01


# ----------------------------------------------------------------------------------------------- options
def test_trainer_keeps_distill_options_in_args_and_away_from_the_validator(pruned_pt, teacher_pt, data, tmp_path):
    trainer = SparseTrainer(overrides={"model": str(pruned_pt), "data": data, "save_dir": str(tmp_path / "s"),
                                       "plots": False, "sr": 0.02, "teacher": str(teacher_pt), "distill_cls": 2,
                                       "distill_temp": 2.0, **FAST})
    a = trainer.args
    assert a.teacher == str(teacher_pt.absolute()) and a.distill == "output" and a.distill_cls == 2.0
    assert a.distill_temp == 2.0 and a.labels is True and a.sr == 0.02 and a.distill_model is None
    text = (tmp_path / "s" / "args.yaml").read_text()
    assert f"teacher: {teacher_pt.absolute()}" in text and "distill_cls: 2.0" in text
    assert {"teacher", "labels", "sr"} <= SparseTrainer.all_extra_arg_keys()
    trainer.setup_model()
    trainer.test_loader = None
    validator = trainer.get_validator()  # ultralytics' config check would reject our keys
    assert not hasattr(validator.args, "teacher") and not hasattr(validator.args, "sr")
    assert trainer.teacher is not None and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert not any(m is trainer.teacher for m in trainer.model.modules())  # not a sub-module of the student
    feat = FinetuneTrainer(overrides={"model": str(pruned_pt), "data": data, "save_dir": str(tmp_path / "f"),
                                      "plots": False, "teacher": str(teacher_pt), "distill": "feature", **FAST})
    assert feat.args.distill_model == str(teacher_pt.absolute())  # ultralytics' DistillationModel takes it over


def test_the_default_linear_fade_scales_the_distillation_terms_down_over_the_epochs(pruned_pt, teacher_pt, data, tmp_path):
    trainer = FinetuneTrainer(overrides={"model": str(pruned_pt), "data": data, "save_dir": str(tmp_path / "f"),
                                         "plots": False, "teacher": str(teacher_pt), **{**FAST, "epochs": 4}})
    assert trainer.args.distill_fade == "linear" and "distill_fade: linear" in (tmp_path / "f" / "args.yaml").read_text()
    scales = []
    for epoch in range(4):
        trainer.epoch = epoch
        scales.append(trainer.distill_scale)
    assert scales == [1.0, 0.75, 0.5, 0.25]
    assert DistillOptions().distill_fade == "linear"  # the default
    plain = FinetuneTrainer(overrides={"model": str(pruned_pt), "data": data, "save_dir": str(tmp_path / "p"),
                                       "plots": False, "teacher": str(teacher_pt), "distill_fade": "none",
                                       **{**FAST, "epochs": 4}})
    plain.epoch = 3
    assert plain.args.distill_fade == "none" and plain.distill_scale == 1.0
    # the scale multiplies the KD term of the criterion
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import load_checkpoint

    student, _ = load_checkpoint(pruned_pt)
    student.args = get_cfg()
    batch = _batch()
    batch["img"] = batch["img"].float() / 255
    preds = student(batch["img"])
    with torch.no_grad():
        raw = load_teacher(teacher_pt)(batch["img"])[1]
    wrapped = DistillLoss(student.init_criterion(), reg_max=16)
    full = wrapped(preds, {**batch, TEACHER_KEY: raw})[1][LOSS_NAME]
    wrapped.scale = 0.25
    assert float(full) > 0 and torch.isclose(wrapped(preds, {**batch, TEACHER_KEY: raw})[1][LOSS_NAME], 0.25 * full)


def test_bad_distill_options_fail_before_anything_is_written(pruned_pt, teacher_pt, data, tmp_path):
    with pytest.raises(UsageError, match="unknown distill 'logits'"):
        finetune(pruned_pt, data, teacher=teacher_pt, distill="logits", project=tmp_path, **FAST)
    with pytest.raises(UsageError, match="labels=False"):
        finetune(pruned_pt, data, labels=False, project=tmp_path, **FAST)
    with pytest.raises(UsageError, match="labels=False"):
        sparse_train(pruned_pt, data, teacher=teacher_pt, unlabeled=str(tmp_path), project=tmp_path, **FAST)
    with pytest.raises(UsageError, match="distill_temp"):
        finetune(pruned_pt, data, teacher=teacher_pt, distill_temp=0, project=tmp_path, **FAST)
    with pytest.raises(UsageError, match="distill_cls"):
        finetune(pruned_pt, data, teacher=teacher_pt, distill_cls=-1, project=tmp_path, **FAST)
    with pytest.raises(UsageError, match="distill_fade"):
        finetune(pruned_pt, data, teacher=teacher_pt, distill_fade="cosine", project=tmp_path, **FAST)
    with pytest.raises(ModelLoadError, match="teacher"):
        finetune(pruned_pt, data, teacher=tmp_path / "missing.pt", project=tmp_path, **FAST)
    with pytest.raises(UsageError, match="must be a path"):
        finetune(pruned_pt, data, teacher=_dense(), project=tmp_path, **FAST)
    assert not any(tmp_path.iterdir())
    other = save_like_ultralytics(_dense(nc=5), tmp_path / "nc5" / "t.pt")
    with pytest.raises(UsageError, match="5 classes"):
        finetune(pruned_pt, data, teacher=other, project=tmp_path / "runs", epochs=1, **FAST)
    # plain finetune: no teacher unless given (the default teacher=auto means the input model only in a pipeline)
    assert DistillOptions().teacher == "auto" and distill_options(**DistillOptions().to_dict()) == {}


def test_distill_options_object_or_keywords(pruned_pt, teacher_pt, data, tmp_path):
    """A ``DistillOptions`` object and the loose keywords are the same options (a keyword overrides the object's
    field); both are checked by the schema before anything is written."""
    opts = DistillOptions(teacher=teacher_pt, distill="feature")
    assert opts.teacher == str(teacher_pt) and opts.replace(distill_cls=2.0).distill_cls == 2.0
    with pytest.raises(UsageError, match="unknown distill 'logits'"):
        DistillOptions(teacher=teacher_pt, distill="logits")
    with pytest.raises(UsageError, match="out of range"):
        sparse_train(pruned_pt, data, opts, distill_cls=-2.0, project=tmp_path, **FAST)
    with pytest.raises(UsageError, match="takes option objects"):
        finetune(pruned_pt, data, {"teacher": teacher_pt}, project=tmp_path, **FAST)
    assert not any(tmp_path.iterdir())


def test_cli_config_keys():
    from yolo_prune import cli
    from yolo_prune.config import build, parse_argv

    cfg, extra = build("finetune", {})
    assert cfg["teacher"] == "auto" and cfg["distill"] == "output" and cfg["labels"] is True and not extra
    assert cli.mode_keys(cfg)["teacher"] == "auto"
    _, over = parse_argv(["pipeline", "teacher=none", "labels=false", "distill=feature"])
    cfg, _ = build("pipeline", over)
    assert cfg["teacher"] == "none" and cfg["labels"] is False and cfg["distill"] == "feature"  # read as text
    for bad in ({"distill": "x"}, {"distill_temp": 0}, {"distill_box": -1}, {"labels": "maybe"}, {"teacher": 3}):
        with pytest.raises(UsageError):
            build("finetune", bad)
    text = (ROOT / "cfg" / "default.yaml").read_text()
    for key in ("teacher", "distill", "distill_cls", "distill_box", "distill_temp", "labels", "unlabeled"):
        assert f"\n{key}: " in text and "# (" in text.split(f"\n{key}: ")[1].splitlines()[0]


def test_pipeline_teacher_defaults_to_its_input(teacher_pt, tmp_path, caplog):
    from yolo_prune.stages.teacher import pipeline_teacher as _pipeline_teacher

    assert _pipeline_teacher("auto", teacher_pt, NC, tmp_path) == str(teacher_pt.absolute())
    assert _pipeline_teacher("auto", str(teacher_pt), 7, tmp_path) is None  # other classes: no teacher
    assert _pipeline_teacher(None, teacher_pt, NC, tmp_path) is None
    assert _pipeline_teacher("none", teacher_pt, NC, tmp_path) is None
    assert _pipeline_teacher("auto", "yolov8n.yaml", NC, tmp_path) is None  # random init teaches nothing
    assert _pipeline_teacher("other.pt", teacher_pt, NC, tmp_path) == str(Path("other.pt").absolute())
    saved = _pipeline_teacher("auto", _dense(), NC, tmp_path)  # in memory: saved into the run folder
    assert saved == str(tmp_path / "teacher.pt") and shapes(saved) == shapes(teacher_pt)


def test_unlabeled_images_are_linked_into_the_cache(synthetic, tmp_path):
    from yolo_prune.data.spec import image_folder

    user = tmp_path / "unlabeled"
    user.mkdir()
    for p in sorted((synthetic / "images" / "train").iterdir())[:5]:
        (user / p.name).write_bytes(p.read_bytes())
    (user / "notes.txt").write_text("not an image")
    before = sorted(p.name for p in user.iterdir())
    folder = image_folder(user)
    assert sorted(p.name for p in folder.iterdir()) == sorted(n for n in before if not n.endswith(".txt"))
    labels = sorted((folder.parent / "labels").iterdir())
    assert len(labels) == 5 and all(p.stat().st_size == 0 for p in labels)
    assert sorted(p.name for p in user.iterdir()) == before  # nothing written beside the user's images
    assert image_folder(str(user)) == folder  # cached
    with pytest.raises(DatasetError):
        image_folder(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no images"):
        image_folder(tmp_path / "unlabeled" / "notes.txt")


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.parametrize("mode,distill", [("finetune", "output"), ("finetune", "feature"), ("sparse", "output")])
def test_distilled_student_checkpoints_hold_no_teacher(mode, distill, pruned_pt, teacher_pt, data, tmp_path):
    fn = finetune if mode == "finetune" else sparse_train
    res = fn(pruned_pt, data, teacher=teacher_pt, distill=distill, epochs=2, project=tmp_path, name="run", **FAST)
    assert res.teacher == str(teacher_pt.absolute()) and res.distill == distill and "teacher" in str(res)
    rows = read_csv(res.save_dir / "results.csv")
    column = "train/kd_loss" if distill == "output" else "train/dis_loss"
    assert all(float(r[column]) > 0 for r in rows)
    assert not any(k.startswith("val/") and k.endswith(("kd_loss", "dis_loss")) for k in rows[0])
    for path in (res.last, res.best):
        ckpt = assert_no_teacher(path, pruned_pt)
        assert "teacher" not in (ckpt.get("train_args") or {})  # ultralytics keeps only its own keys when it finalises


@pytest.mark.slow
def test_resume_keeps_the_teacher(pruned_pt, teacher_pt, data, tmp_path):
    """Stop after the first saved epoch, check the unfinished last.pt, then resume without naming the teacher."""

    class Stop(Exception):
        pass

    def stop(trainer):
        raise Stop

    save_dir = tmp_path / "run"
    trainer = FinetuneTrainer(overrides={"model": str(pruned_pt), "data": data, "teacher": str(teacher_pt),
                                         "epochs": 3, "save_dir": str(save_dir), "plots": False, **FAST})
    trainer.add_callback("on_model_save", stop)
    with pytest.raises(Stop):
        trainer.train()
    last = save_dir / "weights" / "last.pt"
    ckpt = assert_no_teacher(last, pruned_pt)
    assert ckpt["epoch"] == 0 and ckpt["optimizer"] is not None
    assert ckpt["train_args"]["teacher"] == str(teacher_pt.absolute())  # the path travels, not the model
    assert ckpt["ema"].criterion is None
    res = finetune(pruned_pt, data, project=tmp_path, name="run", resume=True, **FAST)
    assert res.teacher == str(teacher_pt.absolute())
    rows = read_csv(save_dir / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(float(r["train/kd_loss"]) > 0 for r in rows)
    assert_no_teacher(res.last, pruned_pt)


@pytest.mark.slow
def test_label_free_training(pruned_pt, teacher_pt, data, synthetic, tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    for p in sorted((synthetic / "images" / "train").iterdir()):
        (user / p.name).write_bytes(p.read_bytes())
    before = sorted(p.name for p in user.iterdir())
    import logging

    from ultralytics.utils import LOGGER

    class Record(logging.Handler):
        messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    handler = Record()
    LOGGER.addHandler(handler)
    try:
        res = finetune(pruned_pt, data, teacher=teacher_pt, labels=False, unlabeled=user, epochs=2, project=tmp_path,
                       name="free", **FAST)
    finally:
        LOGGER.removeHandler(handler)
    assert not any("Labels are missing" in m for m in handler.messages)  # expected without labels, not a warning
    rows = read_csv(res.save_dir / "results.csv")
    for r in rows:
        assert float(r["train/box_loss"]) == float(r["train/cls_loss"]) == float(r["train/dfl_loss"]) == 0
        assert float(r["train/kd_loss"]) > 0
        assert float(r["val/box_loss"]) > 0  # validation keeps the labeled val split
    assert sorted(p.name for p in user.iterdir()) == before
    assert_no_teacher(res.best, pruned_pt)
    from ultralytics.nn.tasks import load_checkpoint

    trained, start = load_checkpoint(res.last)[0].state_dict(), load_checkpoint(pruned_pt)[0].state_dict()
    assert any(not torch.allclose(trained[k].float(), start[k].float(), atol=1e-3) for k in start)  # it trained


@pytest.mark.slow
def test_ddp_worker_script_rebuilds_the_teacher(pruned_pt, teacher_pt, data, tmp_path):
    """ultralytics' generated DDP script (one CPU process) rebuilds the trainer from vars(args) alone: the teacher
    path crosses, the worker distils, the checkpoints hold no teacher."""
    save_dir = tmp_path / "ddp"
    trainer = FinetuneTrainer(overrides={"model": str(pruned_pt), "data": data, "save_dir": str(save_dir),
                                         "plots": False, "epochs": 1, "teacher": str(teacher_pt),
                                         "distill_box": 0.5, **FAST})
    run_ddp_file(trainer, tmp_path)
    rows = read_csv(save_dir / "results.csv")
    assert float(rows[0]["train/kd_loss"]) > 0
    assert "distill_box: 0.5" in (save_dir / "args.yaml").read_text()
    assert_no_teacher(save_dir / "weights" / "last.pt", pruned_pt)


DDP_WORKER = r'''
import os, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import load_checkpoint
from yolo_prune.train.distill import TEACHER_KEY, DistillLoss, head_outputs, load_teacher

student_ckpt, teacher_ckpt, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model, _ = load_checkpoint(student_ckpt)
model.train()
for name, p in model.named_parameters():
    p.requires_grad_(".dfl" not in name)
model.args = get_cfg()
model.criterion = DistillLoss(model.init_criterion(), reg_max=16)
teacher = load_teacher(teacher_ckpt)  # every rank loads the teacher from its path; it is not part of the DDP module
ddp = DDP(model, find_unused_parameters=True, broadcast_buffers=False)
opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
g = torch.Generator().manual_seed(100 + rank)
kd = []
for step in range(2):
    img = torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        raw = {k: v for k, v in head_outputs(teacher(img)).items() if k != "feats"}
    batch = {"img": img, "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [1.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.4, 0.4, 0.2, 0.2]]), TEACHER_KEY: raw}
    loss, items = ddp(batch)
    (loss.sum() * world).backward()
    opt.step()
    opt.zero_grad()
    kd.append(float(items["kd_loss"]))
torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "kd": kd},
           os.path.join(out_dir, f"rank{rank}.pt"))
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_ranks_distil_to_identical_weights(pruned_pt, teacher_pt, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(pruned_pt), str(teacher_pt), str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert r0["kd"] != r1["kd"] and all(k > 0 for k in r0["kd"] + r1["kd"])  # different data, a real KD term
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), f"{k} differs between ranks"
