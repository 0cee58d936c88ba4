"""Segmentation, pose and OBB models through the training, export and benchmark steps (issue 22, second slice).

Random-init yolo11n-seg / -pose / -obb pruned to half the MACs, trained 1-2 epochs at imgsz 64 on a few generated
images with the task's labels (the generated dataset of each task, ``synthetic_task``). What is checked: each task gets ultralytics' trainer of its
task under yolo-prune's mixins (picked from the checkpoint, no option); a fine-tune keeps every pruned shape and the
task outputs' widths (mask coefficients and prototypes, keypoints, angle); distillation from a teacher adds its
term to the task loss; an interrupted task fine-tune resumes with the same shapes; sparsity training runs on a
segmentation model; a fine-tuned segmentation model exports to ONNX with the torch outputs and is benchmarked;
``int8=True`` refuses task models in one line.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.obb import OBBTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer

from yolo_prune.bench import measure_latency, onnx_session
from yolo_prune.deploy import export_model
from yolo_prune.errors import UsageError
from yolo_prune.models import save_checkpoint
from yolo_prune.stages.prune import prune
from yolo_prune.stats import inference_copy
from yolo_prune.train import (FinetuneSegmentTrainer, FinetuneTrainer, KeepArchitectureMixin, SparseSegmentTrainer,
                              SparseTrainer, finetune, sparse_train, trainer_for)
from yolo_prune.train.distill import DistillMixin

from .helpers import FAST, HEAD_OUTPUTS, random_detection_model, read_csv, shapes

CFGS = {"segment": "yolo11n-seg.yaml", "pose": "yolo11n-pose.yaml", "obb": "yolo11n-obb.yaml"}
ULTRALYTICS = {"detect": DetectionTrainer, "segment": SegmentationTrainer, "pose": PoseTrainer, "obb": OBBTrainer}


def head_widths(model_or_path) -> dict[str, int]:
    """Output width of the head's last conv of every branch (box, class, the task's) and of the prototypes."""
    if isinstance(model_or_path, (str, Path)):
        from ultralytics.nn.tasks import load_checkpoint

        model_or_path = load_checkpoint(model_or_path)[0]
    head = model_or_path.model[-1]
    widths = {}
    for name in HEAD_OUTPUTS:
        for k, branch in enumerate(getattr(head, name, None) or []):
            last = branch[-1] if isinstance(branch, nn.Sequential) else branch
            if type(last) is nn.Conv2d:
                widths[f"{name}.{k}"] = last.out_channels
    if getattr(head, "proto", None) is not None:
        widths["proto"] = head.proto.cv3.conv.out_channels
    return widths


def pose_model(cfg: str) -> nn.Module:
    """The random-init pose model of ``cfg`` with the generated data's keypoints (5 x 3)."""
    from ultralytics.nn.tasks import PoseModel

    torch.manual_seed(0)
    return PoseModel(cfg, nc=3, data_kpt_shape=(5, 3), verbose=False).eval()


@pytest.fixture(scope="module")
def task_data(synthetic_task) -> dict[str, Path]:
    return {task: synthetic_task(task) / "yolo.yaml" for task in CFGS}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> dict[str, Path]:
    """``{task: pruned.pt}`` at half the MACs, and the dense segmentation model as ``segment_dense``."""
    root = tmp_path_factory.mktemp("pruned")
    out = {}
    for task, cfg in CFGS.items():
        dense = random_detection_model(cfg) if task != "pose" else pose_model(cfg)
        if task == "segment":
            out["segment_dense"] = save_checkpoint(dense, root / "segment_dense.pt")
        res = prune(dense, method="l1", target_macs=0.5, imgsz=64, save=False)
        out[task] = save_checkpoint(res.model.model, root / f"{task}.pt")
    return out


def test_trainer_for_picks_the_task_trainer_under_the_mixins(pruned):
    for kind, base in (("finetune", FinetuneTrainer), ("sparse", SparseTrainer)):
        for task, ul in ULTRALYTICS.items():
            cls = trainer_for(task, kind)
            assert issubclass(cls, base) and issubclass(cls, ul)
            mro = cls.__mro__
            assert mro.index(DistillMixin) < mro.index(KeepArchitectureMixin) < mro.index(ul)  # mixins first
            assert getattr(importlib.import_module(cls.__module__), cls.__name__) is cls  # as the DDP worker imports
    assert trainer_for(str(pruned["segment"]), "finetune") is FinetuneSegmentTrainer  # from the checkpoint's head
    assert trainer_for(str(pruned["segment"]), "sparse") is SparseSegmentTrainer
    with pytest.raises(UsageError, match="unknown kind"):
        trainer_for("segment", "prune")


def test_task_yaml_with_pretrained_detector_builds_the_task_model(task_data, tmp_path):
    """``model=yolo11n-seg.yaml pretrained=detector.pt``: ultralytics' build (the seg model, the detector's matching
    weights loaded), not the detector itself trained as if it were the checkpoint."""
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    detector = random_detection_model("yolo11n.yaml")
    trainer = FinetuneSegmentTrainer(overrides={"model": "yolo11n-seg.yaml", "data": str(task_data["segment"]),
                                                "pretrained": str(tmp_path / "det.pt"), "save_dir": str(tmp_path / "r"),
                                                **FAST})
    model = trainer.get_model(cfg="yolo11n-seg.yaml", weights=detector, verbose=False)
    assert isinstance(model, SegmentationModel) and type(detector) is DetectionModel
    assert torch.equal(model.model[0].conv.weight, detector.model[0].conv.weight)  # the backbone came across


@pytest.mark.parametrize("task", ["pose", "obb"])
def test_finetune_keeps_the_pruned_shapes_and_task_outputs(task, pruned, task_data, tmp_path):
    res = finetune(str(pruned[task]), str(task_data[task]), epochs=1, project=tmp_path, name="ft", **FAST)
    assert shapes(res.last) == shapes(pruned[task]) == shapes(res.best)
    widths = head_widths(pruned[task])
    assert widths == head_widths(res.last) and any(k.startswith("cv4.") for k in widths)  # keypoints / angle
    rows = read_csv(res.save_dir / "results.csv")
    assert len(rows) == 1 and float(rows[0]["metrics/mAP50-95(B)"]) >= 0
    key = "metrics/mAP50-95(P)" if task == "pose" else "train/box_loss"
    assert key in rows[0]  # ultralytics' task validator and loss ran
    assert res.map50_95 is not None and (res.pose_map50_95 is not None) == (task == "pose")


def test_pose_model_with_other_keypoints_is_refused_in_one_line(task_data, tmp_path):
    path = save_checkpoint(random_detection_model(CFGS["pose"]), tmp_path / "kpt17.pt")  # 17 keypoints, data 5
    with pytest.raises(UsageError, match=r"keypoints of shape \[17, 3\] but the data has kpt_shape \[5, 3\]") as e:
        finetune(str(path), str(task_data["pose"]), epochs=1, project=tmp_path, name="ft", **FAST)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def seg_run(pruned, task_data, tmp_path_factory) -> Path:
    """A distilled segmentation fine-tune of 2 epochs interrupted after epoch 1, then resumed: its run folder."""
    root = tmp_path_factory.mktemp("seg_run")

    def stop(trainer):
        raise KeyboardInterrupt("stop after the first saved epoch")

    trainer = FinetuneSegmentTrainer(overrides={
        "model": str(pruned["segment"]), "data": str(task_data["segment"]), "epochs": 2, "save_dir": str(root / "run"),
        "plots": False, "teacher": str(pruned["segment_dense"]), **FAST})
    trainer.add_callback("on_model_save", stop)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    ckpt = torch.load(root / "run" / "weights" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["optimizer"] is not None  # an unfinished run
    res = finetune(str(root / "run" / "weights" / "last.pt"), None, resume=True, **FAST)
    assert res.save_dir == (root / "run").resolve() and res.epochs == 2 and res.teacher == str(pruned["segment_dense"])
    return res.save_dir


def test_distilled_seg_finetune_resumes_with_its_shapes(seg_run, pruned):
    weights = seg_run / "weights"
    assert shapes(weights / "last.pt") == shapes(pruned["segment"]) == shapes(weights / "best.pt")
    widths = head_widths(pruned["segment"])
    assert widths == head_widths(weights / "best.pt") and widths["proto"] == 32 and widths["cv4.0"] == 32
    rows = read_csv(seg_run / "results.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # continued after the saved epoch
    assert all(float(r["train/kd_loss"]) > 0 and float(r["train/seg_loss"]) > 0 for r in rows)  # KD beside the task
    assert "metrics/mAP50-95(M)" in rows[0] and "val/kd_loss" not in rows[0]


def test_sparse_training_of_a_seg_model(pruned, task_data, tmp_path):
    res = sparse_train(str(pruned["segment"]), str(task_data["segment"]), epochs=1, sr=0.05, project=tmp_path,
                       name="sp", **FAST)
    assert shapes(res.last) == shapes(pruned["segment"])
    assert head_widths(res.last) == head_widths(pruned["segment"])
    assert res.gamma_mean_after < res.gamma_mean_before and res.gamma_zero_after > 0
    assert res.mask_map50_95 is not None and "mask_map50_95" in str(res)  # the task's mAP beside the boxes'
    assert "sparsity/free_macs" in read_csv(res.save_dir / "results.csv")[0]


def test_seg_export_matches_torch_and_benches(seg_run, tmp_path):
    best = seg_run / "weights" / "best.pt"
    onnx = export_model(str(best), format="onnx", imgsz=64, save_dir=tmp_path)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (y, proto), _ = inference_copy(str(best))(x)
    session = onnx_session(onnx)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert [o.shape for o in out] == [tuple(y.shape), tuple(proto.shape)] and y.shape[1] == 4 + 3 + 32
    np.testing.assert_allclose(out[0], y.numpy(), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(out[1], proto.numpy(), atol=1e-3, rtol=1e-3)
    lat = measure_latency({"seg": str(best)}, imgsz=64, runs=2, warmup=1, progress=False)
    assert lat.get("seg", "torch").median_ms > 0 and lat.get("seg", "onnx").median_ms > 0
    with pytest.raises(UsageError, match="int8=True exports detection models only; this is a segment model"):
        export_model(str(best), format="onnx", imgsz=64, save_dir=tmp_path / "q", int8=True, data="unused.yaml")


def test_pipeline_on_generated_seg_data_reports_box_and_mask_map(pruned, synthetic_task, tmp_path):
    """Done when: a pipeline on generated seg data reports box and mask mAP before and after (report.json)."""
    from yolo_prune.job import pipeline

    res = pipeline(str(pruned["segment_dense"]), synthetic_task("segment") / "coco.yaml", target_macs=0.7,
                   method="l1", allocation="global", steps=1, compensate="none", recalibrate=False, imgsz=64,
                   batch=4, workers=0, sparse_epochs=0, finetune_epochs=1, bench_runs=2, bench_warmup=1,
                   backends=("torch",), project=tmp_path, name="p", train_args={"mosaic": 0.0, "warmup_epochs": 0})
    report = json.loads((res.save_dir / "report.json").read_text())
    rows = {r["metric"]: r for r in report["table"]}
    for key in ("mAP50-95", "mAP50", "mask mAP50-95", "mask mAP50", "mask mAP50-95 right after pruning"):
        assert rows[key]["before"] is not None and rows[key]["after"] is not None, key
    assert "| mask mAP50-95 |" in (res.save_dir / "report.md").read_text()
    assert "train/seg_loss" in (res.save_dir / "finetune" / "final" / "results.csv").read_text().splitlines()[0]
    assert shapes(res.final) == shapes(report["stages"]["prune"]["pruned_checkpoint"])
