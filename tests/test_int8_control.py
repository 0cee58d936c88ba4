"""Accuracy-controlled INT8 (``int8=True max_map_drop=``): NNCF keeps layers in FP32 when the metric asks for it.

A random-init pruned model scores mAP 0 in FP32 and INT8 alike, so NNCF would have nothing to restore; the forced
test replaces the COCO metric (``metric=``, a test-only parameter) by the output error on the same val images,
scaled so that the FP32 export scores 1 and the plain PTQ export 0, with ``max_map_drop=0.9``: NNCF must put back
quantizer groups until the error is below 90% of PTQ's. The model is a small pruned detector (4 convs and a
2-scale Detect: 18 quantized ops) so that NNCF's ranking (a model compile per group) stays within seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from yolo_prune.cli import main
from yolo_prune.deploy import export_model
from yolo_prune.evaluate import ValSample, evaluate
from yolo_prune.quantize import calibration_images, quantize_openvino

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytestmark = pytest.mark.usefixtures("data_cache")

IMGSZ = 64
TINY = {"nc": 3, "scales": {"n": [0.33, 0.25, 1024]},
        "backbone": [[-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 1, "Conv", [256, 3, 2]],
                     [-1, 1, "Conv", [256, 3, 2]]],
        "head": [[[2, 3], 1, "Detect", ["nc"]]]}


def _tiny_pruned(images: np.ndarray) -> torch.nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    from yolo_prune.stages.prune import prune

    torch.manual_seed(0)
    model = DetectionModel(TINY, nc=3, verbose=False)
    return _bn_from_images(prune(model, method="l1", ratio=0.3, imgsz=IMGSZ, save=False).model.model, images)


def _bn_from_images(model: torch.nn.Module, images: np.ndarray) -> torch.nn.Module:
    """BatchNorm statistics measured on ``images``, so every layer passes its input on."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images))
    return model.eval()


def _openvino_run(folder, config: dict | None = None):
    """A function giving the outputs of the export ``folder`` on an input, in f32 unless ``config`` says otherwise."""
    import openvino as ov

    compiled = ov.compile_model(next(folder.glob("*.xml")), "CPU", config or {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda x: compiled(x)[compiled.output(0)]


def _openvino_outputs(folder, x: np.ndarray) -> np.ndarray:
    return _openvino_run(folder)(x)


def _fake_quantized(folder) -> set[str]:
    """Names of the ops of the saved IR fed directly by a FakeQuantize."""
    import openvino as ov

    model = ov.Core().read_model(next(folder.glob("*.xml")))
    return {op.get_friendly_name() for op in model.get_ordered_ops()
            if any(v.get_node().get_type_name() == "FakeQuantize" for v in op.input_values())}


def test_accuracy_control_keeps_a_layer_in_fp32_when_forced_to(synthetic, tmp_path):
    from yolo_prune.quantize_control import REPORT, quantize_openvino_controlled

    data = synthetic / "coco.yaml"
    images = calibration_images(data, n=8, imgsz=IMGSZ, seed=0)
    model = _tiny_pruned(images)
    fp32 = export_model(model, format="openvino", imgsz=IMGSZ, save_dir=tmp_path / "fp32")
    ptq = quantize_openvino(fp32, tmp_path / "ptq", images, head=len(model.model) - 1)  # what int8=True writes
    sample = ValSample(data, imgsz=IMGSZ, n=4)
    run_fp32, run_ptq = _openvino_run(fp32), _openvino_run(ptq)
    reference = {it["im_file"][0]: run_fp32(ValSample.inputs(it)) for it in sample.items}

    def error(outputs, items) -> float:
        return float(np.mean([np.abs(o - reference[it["im_file"][0]]).mean() for o, it in zip(outputs, items)]))

    ptq_error = error([run_ptq(ValSample.inputs(it)) for it in sample.items], sample.items)
    assert ptq_error > 0

    def scaled(outputs, items) -> float:  # FP32 1, PTQ 0 (the same calibration as the export's)
        return 1 - error(outputs, items) / ptq_error

    out, report = quantize_openvino_controlled(fp32, tmp_path / "ac_int8_openvino_model", images, data=data,
                                               head=len(model.model) - 1, max_map_drop=0.9, val_images=4,
                                               metric=scaled)
    assert report.fp32_map == 1 and report.ptq_map == pytest.approx(0, abs=1e-6)
    assert report.reached and report.final_map >= 0.1 and report.kept_fp32
    kept = {op["op"] for op in report.kept_fp32}
    quantized = _fake_quantized(out)
    assert quantized and not kept & quantized  # some ops still INT8, none of those kept
    assert kept <= _fake_quantized(ptq)  # all quantized by PTQ
    assert all(op["layer"].startswith("model.") for op in report.kept_fp32)
    saved = json.loads((out / REPORT).read_text())
    assert saved["kept_fp32"] == report.kept_fp32 and saved["val_images"] == 4
    x = ValSample.inputs(sample.items[0])
    got = _openvino_outputs(out, x)
    assert got.shape == reference[sample.items[0]["im_file"][0]].shape and np.isfinite(got).all()
    result = evaluate(out, data)
    assert result.n_images == 8 and result.imgsz == IMGSZ and 0 <= result.map50_95 <= 1


def test_val_sample_scores_like_val(synthetic, tmp_path):
    """The accuracy control's metric is ``val``'s: same images, preprocessing, NMS and COCO score."""
    data = synthetic / "coco.yaml"
    model = _tiny_pruned(calibration_images(data, n=8, imgsz=IMGSZ, seed=0))
    folder = export_model(model, format="openvino", imgsz=IMGSZ, save_dir=tmp_path)
    sample = ValSample(data, imgsz=IMGSZ, n=100)
    run = _openvino_run(folder)
    outputs = [run(ValSample.inputs(it)) for it in sample.items]
    assert len(sample.items) == 8
    assert sample.score(outputs, sample.items) == pytest.approx(evaluate(folder, data).map50_95, abs=1e-6)


@pytest.mark.fixtures
def test_val_sample_scores_a_real_detector_like_val(shared_fixtures, tmp_path):
    """The COCO yolov8n on coco8 at 160: a non-zero mAP, the same from raw outputs as from ``val`` (run as
    ultralytics' AutoBackend compiles the export: the plugin's default precision, bf16 where the CPU has it)."""
    data = shared_fixtures / "coco8" / "coco8.yaml"
    folder = export_model(shared_fixtures / "weights" / "yolov8n_coco_int8rebuild.pt", format="openvino", imgsz=160,
                          save_dir=tmp_path)
    sample = ValSample(data, imgsz=160, n=1000)
    run = _openvino_run(folder, {"PERFORMANCE_HINT": "LATENCY"})
    outputs = [run(ValSample.inputs(it)) for it in sample.items]
    want = evaluate(folder, data).map50_95
    assert want > 0.05 and sample.score(outputs, sample.items) == pytest.approx(want, abs=1e-6)
    half = sample.items[::2]  # any subset of the items, as NNCF asks for
    assert 0 < sample.score(outputs[::2], half) <= 1


@pytest.mark.parametrize("args, match", [
    (["format=openvino", "max_map_drop=0.01"], "max_map_drop= in mode export needs int8=True"),
    (["format=openvino", "int8=True", "max_map_drop=-0.1"], "max_map_drop"),
    (["format=onnx", "int8=True", "max_map_drop=0.01"], "needs format=openvino"),
])
def test_bad_accuracy_control_requests_are_one_line_errors(args, match, synthetic, tmp_path, capsys):
    assert main(["export", "model=yolov8n.yaml", f"data={synthetic / 'yolo.yaml'}", f"project={tmp_path}",
                 *args]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err
