"""Model cost: MACs, parameters and checkpoint size of yolov8n / yolov8s (random init)."""

from __future__ import annotations

import json

import pytest
import torch

from yolo_prune.errors import ModelLoadError
from yolo_prune.forms import as_detection_model
from yolo_prune.results import Result
from yolo_prune.stats import (
    ModelStats,
    checkpoint_size_mb,
    count_macs,
    count_params,
    inference_copy,
    model_stats,
)


@pytest.fixture(scope="module")
def nano():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolov8n.yaml", verbose=False)


@pytest.fixture(scope="module")
def small():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolov8s.yaml", verbose=False)


def _snapshot(model: torch.nn.Module) -> tuple:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    buffers = sorted(name for name, _ in model.named_buffers())
    dtypes = {p.dtype for p in model.parameters()}
    return state, n_bn, buffers, dtypes, model.training


def _assert_same(before: tuple, model: torch.nn.Module) -> None:
    after = _snapshot(model)
    assert after[1:] == before[1:]
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_yolov8n_macs_match_ultralytics_gflops(nano):
    macs = count_macs(nano, imgsz=640)
    # ultralytics reports 8.7 GFLOPs for the fused yolov8n at 640, i.e. 4.37 GMACs
    assert macs / 1e9 == pytest.approx(4.37, rel=0.02)


def test_macs_smaller_model_and_scale_with_area(nano, small):
    n640, s640 = count_macs(nano, imgsz=640), count_macs(small, imgsz=640)
    assert 0 < n640 < s640
    assert s640 / 1e9 == pytest.approx(14.3, rel=0.02)  # ultralytics: 28.6 GFLOPs
    assert count_macs(nano, imgsz=320) * 4 == n640  # every counted op scales with the feature-map area


def test_macs_same_for_fused_and_unfused(nano):
    fused = inference_copy(nano)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert count_macs(fused, imgsz=320) == count_macs(nano, imgsz=320)


def test_measurements_leave_model_untouched(nano):
    nano.train()
    before = _snapshot(nano)
    count_macs(nano, imgsz=160)
    checkpoint_size_mb(nano)
    model_stats(nano, imgsz=160)
    _assert_same(before, nano)
    assert not any(hasattr(m, "total_ops") for m in nano.modules())  # no thop buffers left behind


def test_count_params(nano, small):
    assert count_params(nano) == sum(p.numel() for p in nano.parameters()) == 3_157_200
    assert count_params(nano) < count_params(small)


def test_checkpoint_size_is_fp16(nano, small):
    size_n, size_s = checkpoint_size_mb(nano), checkpoint_size_mb(small)
    fp16_bytes = count_params(nano) * 2 / 1e6
    assert fp16_bytes < size_n < fp16_bytes * 1.3  # weights at 2 bytes each plus pickle overhead
    assert size_n < size_s
    assert next(nano.parameters()).dtype == torch.float32


def test_yolo_object_and_yaml_path_accepted(nano):
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml")
    assert as_detection_model(yolo) is yolo.model
    assert count_params(yolo) == count_params("yolov8n.yaml") == count_params(nano)
    assert count_macs(yolo, imgsz=160) == count_macs(nano, imgsz=160)


def test_checkpoint_path_accepted(nano, tmp_path):
    path = tmp_path / "pruned.pt"
    torch.save({"model": nano}, path)
    assert count_params(path) == count_params(nano)


def test_bad_model_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        count_params(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError):
        count_params(tmp_path / "junk.pt")
    with pytest.raises(ModelLoadError):
        count_params(42)


def test_model_stats_result(nano):
    stats = model_stats(nano, imgsz=320)
    assert isinstance(stats, ModelStats) and isinstance(stats, Result)
    assert stats.params == count_params(nano)
    assert stats.macs == count_macs(nano, imgsz=320)
    assert stats.gmacs == pytest.approx(stats.macs / 1e9)
    assert stats.size_mb > 0 and stats.imgsz == 320
    d = json.loads(json.dumps(stats.to_dict()))
    assert set(d) == {"params", "macs", "gmacs", "size_mb", "imgsz"}
    assert "gmacs" in str(stats)
