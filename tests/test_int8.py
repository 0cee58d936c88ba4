"""INT8 export of pruned models (OpenVINO via NNCF, ONNX via onnxruntime QDQ), validated like a .pt.

Random-init pruned yolov8n / yolo11n / yolo26n (BatchNorm statistics measured on the generated images) show that the INT8
exports are INT8, keep Detect's decode in float, load and run in openvino and onnxruntime, and that ``val`` reads
them. Their outputs barely depend on the image (INT8 noise is as large as the image-to-image spread), so accuracy is
checked on the real COCO yolov8n and yolo11n fixtures, lightly pruned with compensation and BN recalibration so that
they still detect (coco128 @160 mAP50-95 0.157 / 0.126; pruned harder without them both score 0.000, and the INT8
score error of such a dead model measures the rounding of near-zero probabilities, not accuracy): the class-score
error of the INT8 model over 8 held images, relative to how much the FP32 scores vary between those images, must stay
below TOL; quantizing the decode tail with the rest (the scores then share one int8 scale with box pixels) is shown to
fail it.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from yolo_prune.cli import main
from yolo_prune.deploy import export_model
from yolo_prune.errors import UsageError
from yolo_prune.evaluate import evaluate
from yolo_prune.quantize import calibration_images, quantize_onnx

from .helpers import NC, bn_from_images, randomize_bn

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytestmark = pytest.mark.usefixtures("data_cache")

IMGSZ = 128
CALIB = 8
TOL = 0.6  # measured 0.27-0.37 for both families and runtimes; a tail-quantized export 0.93-1.00


def _pruned(yaml: str) -> torch.nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    from yolo_prune.stages.prune import prune

    torch.manual_seed(0)
    model = randomize_bn(DetectionModel(yaml, nc=NC, verbose=False))
    return prune(model, method="l1", ratio=0.3, imgsz=64, save=False).model.model


@pytest.fixture(scope="module")
def images(synthetic) -> np.ndarray:
    """The calibration images the exports use (same data, count, size and seed)."""
    return calibration_images(synthetic / "coco.yaml", n=CALIB, imgsz=IMGSZ, seed=0)


@pytest.fixture(scope="module", params=["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"])
def exports(request, synthetic, images, tmp_path_factory):
    """FP32 ONNX and INT8 ONNX and OpenVINO exports of one pruned random-init family."""
    model = bn_from_images(_pruned(request.param), images)
    out = tmp_path_factory.mktemp("int8")
    found = {"family": request.param, "onnx": export_model(model, format="onnx", imgsz=IMGSZ, save_dir=out)}
    for fmt in ("onnx", "openvino"):
        found[f"{fmt}_int8"] = export_model(model, format=fmt, imgsz=IMGSZ, save_dir=out, int8=True,
                                            data=synthetic / "coco.yaml", calib_images=CALIB, seed=0)
    return found


def _run_onnx(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _run_openvino(folder, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    core = ov.Core()
    xml = next(folder.glob("*.xml"))
    compiled = core.compile_model(core.read_model(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[compiled.output(0)]


def _score_error(run, int8, fp32, images: np.ndarray) -> float:
    """RMS class-score error of ``int8`` over the images, relative to the RMS spread of ``fp32``'s scores between
    the images (0: exact; 1: as far off as another image would be)."""
    ref = np.concatenate([run(fp32, im[None]) for im in images])[:, 4:]
    got = np.concatenate([run(int8, im[None]) for im in images])[:, 4:]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean(0, keepdims=True)))


def test_int8_exports_are_int8_with_a_float_decode_and_run(exports, images):
    import onnx
    import openvino as ov

    assert exports["onnx_int8"].name == "model_int8.onnx"
    assert exports["openvino_int8"].name == "model_int8_openvino_model"
    graph = onnx.load(str(exports["onnx_int8"])).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 50 and "DequantizeLinear" in ops
    produced_by = {o: n for n in graph.node for o in n.output}
    final = produced_by[graph.output[0].name]  # Detect's final concat: float inputs, not dequantized ones
    assert final.op_type == "Concat" and all(produced_by[i].op_type != "DequantizeLinear" for i in final.input)
    ov_model = ov.Core().read_model(next(exports["openvino_int8"].glob("*.xml")))
    fq = [op.get_friendly_name() for op in ov_model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert len(fq) > 50
    want = _run_onnx(exports["onnx"], images[:1])
    for got in (_run_onnx(exports["onnx_int8"], images[:1]), _run_openvino(exports["openvino_int8"], images[:1])):
        assert got.shape == want.shape and np.isfinite(got).all()
        box_error = np.linalg.norm(got[:, :4] - want[:, :4]) / np.linalg.norm(want[:, :4])
        # boxes (pixels) near the FP32 ones; a garbage export is off by ~1. YOLO26 has no DFL: its branch regresses
        # the box distances directly, in INT8 (measured 0.12 on one runtime), where the others' DFL softmax is float
        assert box_error < (0.25 if exports["family"].startswith("yolo26") else 0.1)


@pytest.mark.fixtures
@pytest.mark.parametrize("family", ["yolov8n", "yolo11n"])
def test_int8_scores_stay_close_to_fp32_and_a_broken_export_fails(family, shared_fixtures, tmp_path):
    from yolo_prune.stages.prune import prune

    data = shared_fixtures / "coco128" / "coco128.yaml"
    model = prune(shared_fixtures / "weights" / f"{family}_coco_int8rebuild.pt", method="l1", ratio=0.1, imgsz=160,
                  data=data, calib_images=32, save=False).model.model
    fp32 = export_model(model, format="onnx", imgsz=160, save_dir=tmp_path)
    calib = calibration_images(data, n=16, imgsz=160, seed=0)
    held = calibration_images(data, n=8, imgsz=160, seed=1)  # other images of the split
    for fmt, run in (("onnx", _run_onnx), ("openvino", _run_openvino)):
        int8 = export_model(model, format=fmt, imgsz=160, save_dir=tmp_path, int8=True, data=data, calib_images=16)
        fp = fp32 if fmt == "onnx" else export_model(model, format=fmt, imgsz=160, save_dir=tmp_path)
        assert _score_error(run, int8, fp, held) < TOL, fmt  # measured v8n 0.30 / 0.31, 11n 0.27 / 0.37
    tail = quantize_onnx(fp32, tmp_path / "tail.onnx", calib, head=len(model.model) - 1, exclude=[])
    assert _score_error(_run_onnx, tail, fp32, held) > TOL  # measured v8n 1.00, 11n 0.93


def test_val_reads_the_exports(exports, synthetic):
    """The same COCO evaluator as a .pt, at the static export's own size (imgsz=640 asked)."""
    for key in ("onnx_int8", "openvino_int8"):
        result = evaluate(exports[key], synthetic / "coco.yaml", imgsz=640)
        assert result.imgsz == IMGSZ and result.n_images == 8 and result.n_predictions > 0
        assert 0 <= result.map50_95 <= result.map50 <= 1 and result.backend


def test_cli_export_and_val_int8(synthetic, tmp_path, capsys):
    model = _pruned("yolov8n.yaml")
    ckpt = tmp_path / "pruned.pt"
    torch.save({"model": model}, ckpt)
    assert main(["export", f"model={ckpt}", "format=onnx", "int8=True", f"data={synthetic / 'yolo.yaml'}",
                 f"imgsz={IMGSZ}", "calib_images=4", f"project={tmp_path}", "name=export"]) == 0
    exported = tmp_path / "export" / "pruned_int8.onnx"
    assert exported.is_file()
    assert main(["val", f"model={exported}", f"data={synthetic / 'coco.yaml'}", f"project={tmp_path}",
                 "name=val"]) == 0
    assert (tmp_path / "val" / "metrics.json").is_file() and "map50_95" in capsys.readouterr().out


@pytest.mark.parametrize("args, match", [
    (["format=openvino", "int8=True"], "int8=True needs data="),
    (["format=torchscript", "int8=True", "data=x.yaml"], "no INT8 path for format=torchscript"),
])
def test_bad_int8_requests_are_one_line_errors(args, match, tmp_path, capsys):
    assert main(["export", "model=yolov8n.yaml", f"project={tmp_path}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("missing, fix", [("nncf", "pip install 'yolo-prune[openvino]'"),
                                          ("openvino", "pip install 'yolo-prune[openvino]'")])
def test_missing_openvino_or_nncf_names_the_fix(missing, fix, synthetic, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    with pytest.raises(UsageError, match=missing) as info:
        export_model("yolov8n.yaml", format="openvino", int8=True, data=synthetic / "yolo.yaml", save_dir=tmp_path)
    assert fix in str(info.value) and "\n" not in str(info.value)
