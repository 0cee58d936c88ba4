"""Export through the ultralytics exporter into a run folder; ONNX output equals torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from yolo_prune.errors import UsageError
from yolo_prune.deploy import check_format, export_model, export_onnx
from yolo_prune.stats import inference_copy

IMGSZ = 160


@pytest.fixture(scope="module")
def nano():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolov8n.yaml", verbose=False)


def _onnx_output(path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _torch_output(model, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return inference_copy(model)(x)[0].numpy()


def test_onnx_export_matches_torch(nano, tmp_path):
    nano.train()
    requires_grad = [p.requires_grad for p in nano.parameters()]
    out = export_model(nano, format="onnx", imgsz=IMGSZ, save_dir=tmp_path / "run")
    assert out == tmp_path / "run" / "model.onnx"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.onnx"]  # no temp leftovers
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))
    got, want = _onnx_output(out, x), _torch_output(nano, x)
    assert got.shape == want.shape == (1, 84, (IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2 + (IMGSZ // 32) ** 2)
    assert np.abs(got - want).max() < 1e-3
    # the model given is not fused, frozen or switched to eval
    assert nano.training
    assert [p.requires_grad for p in nano.parameters()] == requires_grad
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in nano.modules())


def test_export_from_checkpoint_path_keeps_name_and_source_folder(nano, tmp_path):
    src = tmp_path / "weights"
    src.mkdir()
    torch.save({"model": nano}, src / "pruned.pt")
    out = export_onnx(str(src / "pruned.pt"), tmp_path / "run", imgsz=IMGSZ, batch=2)
    assert out == tmp_path / "run" / "pruned.onnx"
    assert sorted(p.name for p in src.iterdir()) == ["pruned.pt"]  # nothing written beside the source
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    assert np.abs(_onnx_output(out, x) - _torch_output(nano, x)).max() < 1e-3


def test_export_yolo_object(tmp_path):
    from ultralytics import YOLO

    out = export_model(YOLO("yolov8n.yaml"), format="torchscript", imgsz=IMGSZ, save_dir=tmp_path)
    assert out == tmp_path / "model.torchscript" and out.stat().st_size > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"format": "onnxx"}, "did you mean 'onnx'"),
        ({"format": "banana"}, "unknown export format 'banana'"),
        ({"format": "onnx", "no_such_arg": 1}, "unknown export argument"),
        ({"format": "torchscript", "opset": 12}, "opset"),
    ],
)
def test_user_mistakes_raise_one_line_usage_error(nano, tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match) as info:
        export_model(nano, imgsz=IMGSZ, save_dir=tmp_path, **kwargs)
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


def test_check_format_is_case_insensitive():
    assert check_format("ONNX") == "onnx"
