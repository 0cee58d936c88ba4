"""The pipeline ends deployable: int8=True adds a quantize stage (INT8 export for `runtime`, COCO mAP, size and
latency against the dense FP32 export), recorded for resume and reported in the before/after table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from yolo_prune import cli
from yolo_prune.errors import UsageError
from yolo_prune.job import pipeline

from .test_pipeline import dense_ckpt  # noqa: F401  (the module fixture)

TINY8 = dict(imgsz=64, batch=4, workers=0, sparse_epochs=0, finetune_epochs=0, steps=1, bench_runs=3, bench_warmup=1,
             method="bn", allocation="global",
             backends="", calib_images=4, train_args={"mosaic": 0.0, "warmup_epochs": 0})
HAS_OPENVINO = all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))


@pytest.fixture(scope="module")
def run8(tmp_path_factory, synthetic, dense_ckpt):  # noqa: F811
    project = tmp_path_factory.mktemp("runs8")
    runtime = "openvino" if HAS_OPENVINO else "onnxruntime"
    result = pipeline(dense_ckpt, synthetic / "coco.yaml", target_macs=0.5, project=project, name="p", int8=True,
                      runtime=runtime, **TINY8)
    return result, runtime


def test_int8_pipeline_writes_an_int8_export_and_its_rows(run8):
    result, runtime = run8
    d = result.save_dir
    report = json.loads((d / "report.json").read_text())
    q8 = report["int8"]
    assert q8 == report["stages"]["quantize"] and q8["runtime"] == runtime
    export = Path(q8["export"])
    assert export.exists() and "_int8" in export.name and export.is_relative_to(d / "quantize")
    assert Path(q8["dense_export"]).exists()  # the dense model's FP32 export on the same runtime
    rows = {r["metric"]: r for r in report["table"]}
    m = rows[f"INT8 {runtime} mAP50-95"]
    assert m["after"] == q8["map50_95"] and m["before"] == rows["mAP50-95"]["before"]
    assert 0 <= rows[f"INT8 {runtime} mAP50"]["after"] <= 1
    size = rows[f"INT8 {runtime} size (MB)"]
    assert size["after"] < size["before"] and size["ratio"] < 0.5  # pruned and INT8: well under the dense FP32
    lat = rows[f"INT8 {runtime} latency (ms)"]
    assert lat["before"] > 0 and lat["after"] > 0 and lat["ratio"] == pytest.approx(q8["latency_ratio"])
    assert f"| INT8 {runtime} latency (ms) |" in (d / "report.md").read_text()
    assert f"INT8 {runtime} mAP50-95" in str(result)
    args = json.loads((d / "pipeline.json").read_text())["args"]
    assert args["int8"] is True and args["runtime"] == runtime  # recorded: resume continues with them


def test_int8_pipeline_resume_skips_the_done_quantize_stage(run8, monkeypatch):
    result, _ = run8
    from yolo_prune import job

    def fail(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(job, "quantize_stage", fail)
    monkeypatch.setattr(job, "evaluate", fail)
    again = pipeline(None, None, save_dir=result.save_dir, resume=True, **{k: v for k, v in TINY8.items()
                                                                            if k in ("workers", "backends")})
    assert again.rows_ == result.rows_


def test_runtime_torch_with_int8_is_refused_in_one_line(tmp_path, synthetic, capsys):
    with pytest.raises(UsageError, match="int8=True quantizes for runtime=openvino or runtime=onnxruntime"):
        pipeline("yolov8n.yaml", synthetic / "yolo.yaml", project=tmp_path, name="t", int8=True, runtime="torch",
                 **TINY8)
    code = cli.main(["pipeline", "model=yolov8n.yaml", f"data={synthetic / 'yolo.yaml'}", "int8=True",
                     "runtime=torch", f"project={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "runtime=torch" in err[0]


def test_pipeline_latency_target_on_int8_kernels(tmp_path, synthetic, dense_ckpt, monkeypatch):  # noqa: F811
    """target_latency with int8=True: one INT8 table of the input model (3 convs here: a whole one takes minutes),
    every prune step plans over it, and the report gives predicted vs measured latency of the INT8 exports."""
    from yolo_prune.latency import build

    real = build.conv_specs
    monkeypatch.setattr(build, "conv_specs", lambda *a, **k: real(*a, **k)[:3])
    monkeypatch.setenv("YOLO_PRUNE_CACHE", str(tmp_path / "cache"))
    result = pipeline(dense_ckpt, synthetic / "coco.yaml", project=tmp_path, name="lat", int8=True,
                      runtime="onnxruntime", threads=1, target_latency=1.0, **TINY8)
    report = json.loads((result.save_dir / "report.json").read_text())
    lat = report["stages"]["prune.step1"]["latency"]
    assert lat["int8"] and lat["runtime"] == "onnxruntime" and lat["target_fraction"] == 1.0
    assert lat["predicted_ms"] > 0 and lat["measured_ms"] > 0  # predicted (INT8 table) vs measured (INT8 exports)
    assert list((tmp_path / "cache" / "latency").glob("onnxruntime-int8-*.json"))
    rows = {r["metric"]: r for r in report["table"]}
    assert rows["latency onnxruntime INT8 predicted (ms)"]["after"] == lat["predicted_ms"]
    assert rows["latency onnxruntime INT8 measured (ms)"]["after"] == lat["measured_ms"]
    assert report["args"]["target_latency"] == 1.0 and report["args"]["target_macs"] is None
    with pytest.raises(UsageError, match="sr_mode=greg plans toward target_macs"):
        pipeline(dense_ckpt, synthetic / "coco.yaml", project=tmp_path, name="greg", target_latency=0.5,
                 **{**TINY8, "sparse_epochs": 1})
