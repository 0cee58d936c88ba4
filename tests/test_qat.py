"""Quantization-aware training (``export int8=True qat_epochs=N``): a really pruned random-init yolov8n trains one
epoch fake-quantized by NNCF on the generated data (imgsz 64) and keeps every pruned shape; its INT8 exports carry
FakeQuantize (OpenVINO) / QuantizeLinear-DequantizeLinear (ONNX) nodes, keep Detect's decode in float, run in
openvino and onnxruntime with the detector's output width, and are read by ``val``; the quantizers survive the
checkpoint round trip; bad requests are one-line errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from yolo_prune.cli import main

from .helpers import FAST, NC, make_pruned_model, shapes

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytestmark = pytest.mark.usefixtures("data_cache")

IMGSZ = 64
TRAIN = {k: v for k, v in FAST.items() if k not in {"imgsz", "batch", "workers", "device"}}  # nbs, warmup_epochs


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A really pruned yolov8n checkpoint (free form, yolo-prune's block classes)."""
    path = tmp_path_factory.mktemp("qat_in") / "pruned.pt"
    torch.save({"model": make_pruned_model(), "train_args": {}}, path)
    return path


@pytest.fixture(scope="module")
def trained(pruned, synthetic, tmp_path_factory):
    """One QAT epoch and the OpenVINO INT8 export (``yolo-prune export``), then the ONNX export of the same best.pt."""
    from yolo_prune.stages.qat import export_trained

    project = tmp_path_factory.mktemp("qat_out")
    before = pruned.read_bytes()
    assert main(["export", f"model={pruned}", "format=openvino", "int8=True", "qat_epochs=1",
                 f"data={synthetic / 'yolo.yaml'}", f"imgsz={IMGSZ}", "batch=4", "workers=0", "device=cpu",
                 f"project={project}", *(f"{k}={v}" for k, v in TRAIN.items())]) == 0
    out = project / "export"
    ov_dir = out / "pruned_int8_openvino_model"
    best = out / "qat" / "weights" / "best.pt"
    onnx_file = export_trained(best, "onnx", out, imgsz=IMGSZ, stem="pruned")
    return {"openvino": ov_dir, "onnx": onnx_file, "best": best, "input_unchanged": pruned.read_bytes() == before}


def _conv_widths(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_pruned_checkpoint_survives_one_qat_epoch_with_its_shapes(pruned, trained):
    from yolo_prune.forms import as_detection_model
    from yolo_prune.qat import is_qat

    assert trained["input_unchanged"] and trained["best"].is_file()
    before, after = as_detection_model(pruned), as_detection_model(trained["best"])
    assert is_qat(after) and not is_qat(before)
    assert _conv_widths(after) == _conv_widths(before)  # every conv keeps its pruned in/out channels
    assert shapes(after) == shapes(before)
    from ultralytics.nn.tasks import DetectionModel

    dense = _conv_widths(DetectionModel("yolov8n.yaml", nc=NC, verbose=False))
    assert sum(w[1] for w in _conv_widths(after).values()) < 0.85 * sum(w[1] for w in dense.values())  # really pruned


def test_checkpoint_restores_the_trained_quantizers(trained):
    from yolo_prune.forms import as_detection_model
    from yolo_prune.qat import QATDetectionModel, is_qat, plain_copy, restore_qat

    model = restore_qat(as_detection_model(trained["best"])).eval()
    assert isinstance(model, QATDetectionModel) and is_qat(model)
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    again = restore_qat(plain_copy(model)).eval()
    with torch.no_grad():
        y, y2 = model(x)[0], again(x)[0]
    assert y.shape == (2, 4 + NC, 84) and torch.equal(y, y2)


def test_int8_exports_have_quantize_nodes_a_float_decode_and_compute_the_trained_model(trained):
    import onnx
    import onnxruntime as ort
    import openvino as ov

    from yolo_prune.forms import as_detection_model
    from yolo_prune.qat import restore_qat

    x = np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    assert trained["openvino"].name == "pruned_int8_openvino_model" and trained["onnx"].name == "pruned_int8.onnx"
    ov_model = ov.Core().read_model(next(trained["openvino"].glob("*.xml")))
    assert [op.get_type_name() for op in ov_model.get_ordered_ops()].count("FakeQuantize") > 50
    got_ov = ov.Core().compile_model(ov_model, "CPU")(x)[0]
    graph = onnx.load(str(trained["onnx"])).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 50 and "DequantizeLinear" in ops
    produced_by = {o: n for n in graph.node for o in n.output}
    final = produced_by[graph.output[0].name]  # Detect's final concat: float inputs, not dequantized ones
    assert final.op_type == "Concat" and all(produced_by[i].op_type != "DequantizeLinear" for i in final.input)
    got_ort = ort.InferenceSession(str(trained["onnx"]), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    model = restore_qat(as_detection_model(trained["best"])).eval()
    with torch.no_grad():
        want = model(torch.from_numpy(x))[0].numpy()  # what training saw: the fake-quantized torch model
    for got in (got_ov, got_ort):
        assert got.shape == want.shape == (1, 4 + NC, 84) and np.isfinite(got).all()
        # measured: boxes 1e-3 (openvino) / 2e-5 (onnxruntime) relative; scores 1.5% / 0.04% of the largest
        assert np.linalg.norm(got[:, :4] - want[:, :4]) / np.linalg.norm(want[:, :4]) < 0.01
        assert np.abs(got[:, 4:] - want[:, 4:]).max() < 0.1 * np.abs(want[:, 4:]).max()
    meta = {p.key: p.value for p in onnx.load(str(trained["onnx"])).metadata_props}
    assert "'quantize': 8" in meta["args"] and meta["imgsz"] == f"[{IMGSZ}, {IMGSZ}]"


def test_val_reads_the_qat_export(trained, synthetic):
    from yolo_prune.evaluate import evaluate

    result = evaluate(trained["openvino"], synthetic / "coco.yaml", imgsz=IMGSZ, batch=4)
    assert result.imgsz == IMGSZ and result.n_images == 8 and 0 <= result.map50_95 <= 1


@pytest.mark.parametrize("args, match", [
    (["format=onnx", "qat_epochs=1"], "qat_epochs=1 needs int8=True"),
    (["format=onnx", "int8=True", "qat_epochs=-1"], "qat_epochs=-1 is out of range"),
    (["format=onnx", "int8=True", "qat_epochs=1"], "int8=True needs data="),
    (["format=torchscript", "int8=True", "qat_epochs=1", "data=x.yaml"], "no INT8 path for format=torchscript"),
    (["format=openvino", "int8=True", "qat_epochs=1", "max_map_drop=0.01"], "give qat_epochs or max_map_drop"),
])
def test_bad_qat_requests_are_one_line_errors(args, match, tmp_path, capsys):
    assert main(["export", "model=yolov8n.yaml", f"project={tmp_path}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "export").exists()  # refused before any run folder


def test_interrupted_qat_run_resumes_with_its_quantizers(pruned, synthetic, tmp_path):
    from yolo_prune.forms import as_detection_model
    from yolo_prune.qat import is_qat
    from yolo_prune.train.finetune import QATTrainer, finetune

    save_dir = tmp_path / "qat"
    trainer = QATTrainer(overrides=dict(model=str(pruned), data=str(synthetic / "yolo.yaml"), epochs=2, imgsz=IMGSZ,
                                        batch=4, workers=0, device="cpu", plots=False, save_dir=str(save_dir), **TRAIN))

    def stop(_):
        raise KeyboardInterrupt("stopped after the first checkpoint")

    trainer.add_callback("on_model_save", stop)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    last = save_dir / "weights" / "last.pt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0 and is_qat(saved["ema"])  # the float EMA with the quantizers as data
    result = finetune(str(last), None, resume=True, workers=0, device="cpu")  # `yolo-prune finetune ... resume=True`
    rows = (save_dir / "results.csv").read_text().strip().splitlines()[1:]
    assert result.epochs == 2 and [r.split(",")[0].strip() for r in rows] == ["1", "2"]
    assert is_qat(as_detection_model(result.best)) and shapes(as_detection_model(result.best)) == shapes(
        as_detection_model(pruned))


def test_yolo11_attention_exports_what_it_trains(tmp_path):
    """Traced for export, C2PSA's size arithmetic becomes tensor operations; the fake-quantizers must still sit where
    they sat in training (a quantizer on ``N = H * W`` fails the trace), and the export compute the torch model."""
    import onnxruntime as ort

    from yolo_prune.qat import export_qat, prepare_qat

    from .helpers import random_detection_model

    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    model = prepare_qat(random_detection_model("yolo11n.yaml"), list(x)).eval()
    out = export_qat(model, "onnx", tmp_path / "m_int8.onnx", imgsz=IMGSZ)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x[:1].numpy()})[0]
    model.model[-1].export, model.model[-1].format = True, "onnx"
    with torch.no_grad():
        want = model(x[:1]).numpy()
    assert got.shape == want.shape == (1, 4 + NC, 84)
    assert np.linalg.norm(got[:, :4] - want[:, :4]) / np.linalg.norm(want[:, :4]) < 0.01
