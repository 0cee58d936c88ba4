"""Segmentation, pose and OBB models through the last stages that took detection models only (issue 22, last slice):
latency targets (the latency table of a task model), ``prune(validate=True)`` and ``yolo-prune sensitivity``.

Random-init yolo11n-seg / -pose / -obb at imgsz 64 on the generated data of their task (``synthetic_task``). What is
checked: the latency table holds the task branches' convs (cv4, Proto), a latency target is reached by the table's
prediction and by the measured pruned model, and the task outputs keep their widths (mask coefficients and
prototypes, keypoints, angle); validation reports box and task metrics before and after; sensitivity measures every
group of a task model, head branches included.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from yolo_prune.latency import build_table
from yolo_prune.pruning.sensitivity import detection_distance
from yolo_prune.stages.prune import prune
from yolo_prune.stages.sensitivity import sensitivity

from .helpers import random_detection_model, read_csv

CFGS = {"segment": "yolo11n-seg.yaml", "pose": "yolo11n-pose.yaml", "obb": "yolo11n-obb.yaml"}
FAST = dict(points=2, runs=1, warmup=0, dense_runs=2, calibrate=0)
IMGSZ = 64


def task_width(model: torch.nn.Module) -> int:
    """The head's task output width: mask coefficients, keypoint values or angles per anchor."""
    head = model.model[-1]
    return int(getattr(head, "nm", None) or getattr(head, "nk", None) or getattr(head, "ne"))


def head_output_widths(model: torch.nn.Module) -> list[int]:
    """Out channels of each task branch's last conv (and Proto's prototypes)."""
    head = model.model[-1]
    widths = [branch[-1].out_channels for branch in head.cv4]
    if getattr(head, "proto", None) is not None:
        widths.append(head.proto.cv3.conv.out_channels)
    return widths


def output_shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
    """Shapes of every tensor the model outputs (decoded predictions, prototypes, raw maps; not the neck's feats)."""

    def tensors(out):
        if isinstance(out, torch.Tensor):
            return [out]
        if isinstance(out, dict):
            out = [v for k, v in out.items() if k != "feats"]
        return [t for o in out for t in tensors(o)] if isinstance(out, (list, tuple)) else []

    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return [tuple(t.shape) for t in tensors(model.eval()(x))]


@pytest.mark.parametrize("task", ["segment", "pose"])
def test_latency_target_prunes_task_models(task, tmp_path):
    """The table of a task model measures its head's task branches (cv4 on every scale; Proto's convs and its
    upsampling) beside the detection convs; a latency target is predicted and measured below the dense model,
    the task outputs keep their widths."""
    dense = random_detection_model(CFGS[task], 3)
    table = build_table(copy.deepcopy(dense), imgsz=IMGSZ, runtime="torch", threads=1, cache=False, **FAST)
    assert any(".cv4." in name for name in table.convs)
    if task == "segment":
        assert {"model.23.proto.cv1.conv", "model.23.proto.upsample", "model.23.proto.cv2.conv"} <= set(table.convs)
    res = prune(copy.deepcopy(dense), target_latency=0.8, runtime="torch", threads=1, imgsz=IMGSZ,
                latency_table=table, project=tmp_path, name="p")
    lat = res.latency
    assert lat["target_fraction"] == 0.8 and lat["predicted_ratio"] <= 0.83
    assert lat["measured_ms"] > 0 and res.macs_ratio < 0.9
    pruned = res.model.model
    assert head_output_widths(pruned) == head_output_widths(dense)
    assert all(w == task_width(dense) for w in head_output_widths(pruned)[:3])
    assert output_shapes(pruned) == output_shapes(dense)


def test_prune_validate_reports_box_and_task_metrics(synthetic_task, tmp_path):
    """``validate=True`` on a segmentation model: box and mask mAP before and after, in the result, report.json
    and report.md."""
    data = synthetic_task("segment") / "yolo.yaml"
    res = prune(random_detection_model(CFGS["segment"], 3), data=str(data), validate=True, target_macs=0.6,
                method="l1", calib_images=0, imgsz=IMGSZ, batch=4, project=tmp_path, name="v")
    assert res.task_metric == "mask" and res.map50_95_before is not None and res.map50_95_after is not None
    for v in (res.task_map50_95_before, res.task_map50_95_after, res.task_map50_before, res.task_map50_after):
        assert isinstance(v, float) and 0.0 <= v <= 1.0
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["task_metric"] == "mask" and report["task_map50_95_after"] == res.task_map50_95_after
    md = (tmp_path / "v" / "report.md").read_text()
    assert "mask mAP50-95" in md and "mAP50-95" in md
    assert res.macs_ratio < 0.7


def test_sensitivity_measures_task_models(synthetic_task, tmp_path):
    """``sensitivity`` on a segmentation model: every group is measured, the head's mask branches (cv4) and
    Proto included, and their removal counts in the proxy (mask coefficients and prototypes are scored beside
    boxes and classes); the csv lists them."""
    data = synthetic_task("segment") / "yolo.yaml"
    res = sensitivity(random_detection_model(CFGS["segment"], 3), str(data), imgsz=IMGSZ, calib_images=4,
                      ratios=(0.5,), project=tmp_path, name="s")
    losses = {g.name: g.losses[0] for g in res.groups}
    assert all(v >= 0 and math.isfinite(v) for v in losses.values())
    task_groups = [n for n in losses if ".cv4." in n or ".proto." in n]
    assert task_groups and all(losses[n] > 0 for n in task_groups)
    assert {row["group"] for row in read_csv(res.csv)} == set(losses)


def test_distance_scores_task_channels_and_prototypes():
    """The proxy: box and class channels as before; mask coefficients / keypoints / angles and prototypes add
    their relative error."""
    g = torch.Generator().manual_seed(0)
    ref = torch.cat([torch.rand(2, 4, 50, generator=g) * 64, torch.rand(2, 3, 50, generator=g),
                     torch.randn(2, 5, 50, generator=g)], 1)
    moved = ref.clone()
    moved[:, 7:] += 1.0
    assert detection_distance([ref], [ref.clone()], extras=5) == 0.0
    assert detection_distance([ref], [moved], extras=5) > 0.5
    assert detection_distance([ref[:, :7]], [moved[:, :7]]) == 0.0
    proto = torch.randn(2, 5, 8, 8, generator=g)
    assert detection_distance([[ref, proto]], [[ref, proto * 0.5]], extras=5) == pytest.approx(0.5)
