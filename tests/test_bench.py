"""Latency benchmark: interleaved timing, result rows and ratios, torch/onnx runners agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from yolo_prune.bench import (
    LatencyResult,
    interleaved_times,
    measure_latency,
    onnx_runner,
    summarise,
    torch_runner,
)
from yolo_prune.errors import UsageError
from yolo_prune.results import Result

IMGSZ = 160


@pytest.fixture(scope="module")
def models():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return {
        "yolov8s": DetectionModel("yolov8s.yaml", verbose=False),
        "yolov8n": DetectionModel("yolov8n.yaml", verbose=False),
    }


def test_measure_latency_rows_and_ratios(models):
    threads = torch.get_num_threads()
    result = measure_latency(models, imgsz=IMGSZ, runs=3, warmup=1, threads=1, progress=False)
    assert torch.get_num_threads() == threads  # restored
    assert isinstance(result, LatencyResult) and isinstance(result, Result)
    assert result.reference == "yolov8s"
    assert {(r.model, r.backend) for r in result.entries} == {
        (m, b) for m in models for b in ("torch", "onnx")
    }
    for r in result.entries:
        ref = result.get("yolov8s", r.backend)
        assert 0 < r.median_ms <= r.p90_ms
        assert r.imgsz == IMGSZ
        assert r.ratio_vs_reference == pytest.approx(r.median_ms / ref.median_ms)
    assert all(result.get("yolov8s", b).ratio_vs_reference == 1.0 for b in ("torch", "onnx"))
    d = json.loads(json.dumps(result.to_dict()))
    assert len(d["entries"]) == 4 and d["imgsz"] == IMGSZ and d["threads"] == 1
    text = str(result)
    assert "ratio_vs_reference" in text and "yolov8n" in text and "onnx" in text
    assert result.markdown().startswith("| model |")


def test_single_backend_and_model_untouched(models):
    model = models["yolov8n"]
    model.train()
    result = measure_latency({"n": model}, imgsz=IMGSZ, backends="torch, ", runs=2, warmup=0, progress=False)
    assert [(r.model, r.backend, r.ratio_vs_reference) for r in result.entries] == [("n", "torch", 1.0)]
    assert model.training and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_torch_and_onnx_runners_compute_the_same(models, tmp_path):
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(3))
    want = torch_runner(models["yolov8n"], x)()[0].numpy()
    got = onnx_runner(models["yolov8n"], x.numpy(), tmp_path, threads=None)()[0]
    assert np.abs(got - want).max() < 1e-3


def test_rounds_are_interleaved_and_rotated():
    calls: list[str] = []
    runners = {(k, "torch"): (lambda k=k: calls.append(k)) for k in "abc"}
    times = interleaved_times(runners, runs=4, warmup=2, progress=False)
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 6 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]  # starting pair rotates
    assert all(len(t) == 4 and min(t) >= 0 for t in times.values())


def test_summarise_statistics():
    times = {("ref", "torch"): [10.0, 12.0, 11.0], ("x", "torch"): [5.0, 6.0, 100.0]}
    ref, x = summarise(times, ["ref", "x"], ["torch"], 320)
    assert (ref.median_ms, ref.ratio_vs_reference) == (11.0, 1.0)
    assert (x.median_ms, x.ratio_vs_reference) == (6.0, pytest.approx(6 / 11))
    assert x.p90_ms == pytest.approx(np.percentile([5, 6, 100], 90))


@pytest.mark.parametrize(
    "kwargs",
    [{"backends": ("tensorrt",)}, {"backends": ()}, {"runs": 0}, {"warmup": -1}, {"batch": 0}],
)
def test_bad_arguments_raise_usage_error(models, kwargs):
    with pytest.raises(UsageError):
        measure_latency(models, imgsz=IMGSZ, progress=False, **kwargs)


def test_no_models_raises_usage_error():
    with pytest.raises(UsageError):
        measure_latency({}, progress=False)


def test_latency_keeps_the_thread_count():
    """The ONNX export inside the benchmark must not change how many threads torch uses afterwards."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from yolo_prune.bench import measure_latency

    before = torch.get_num_threads()
    measure_latency({"n": DetectionModel("yolov8n.yaml", verbose=False)}, imgsz=64, backends=("torch", "onnx"),
                    runs=1, warmup=0, progress=False)
    assert torch.get_num_threads() == before


def test_exports_bench_in_their_own_runtime_next_to_checkpoints(models, tmp_path):
    """An existing export (here ONNX; an INT8 OpenVINO folder alike) is timed only in its runtime, against the first
    model measured there; a static export asked at another imgsz is a one-line error."""
    from yolo_prune.deploy import export_model

    onnx_file = export_model(models["yolov8n"], format="onnx", imgsz=64, save_dir=tmp_path)
    result = measure_latency({"dense": models["yolov8s"], "export": str(onnx_file)}, imgsz=64, backends="torch",
                             runs=2, warmup=0, threads=1, progress=False)
    assert {(r.model, r.backend) for r in result.entries} == {("dense", "torch"), ("dense", "onnx"), ("export", "onnx")}
    got = result.get("export", "onnx")
    assert got.ratio_vs_reference == pytest.approx(got.median_ms / result.get("dense", "onnx").median_ms)
    with pytest.raises(UsageError, match="exported static at imgsz=64 batch=1: bench it with imgsz=64"):
        measure_latency({"export": str(onnx_file)}, imgsz=96, runs=1, warmup=0, progress=False)
