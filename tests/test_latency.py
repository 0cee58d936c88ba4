"""Latency model: table structure and cache key, latency targets in the schedule, OpenVINO, one-line errors.

Timing is never asserted: tables are measured (tiny and fast: few runs, a small image) and the tests check what
the code does with them (shapes, cache hits, the solver respecting the table's own predictions).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging

import numpy as np
import pytest
import torch

from yolo_prune import cli, latency
from yolo_prune.errors import PruningError, UsageError
from yolo_prune.latency import LatencyCost, LatencyTable, build_table, model_widths, table_key
from yolo_prune.pruning import prune_model
from yolo_prune.stages.prune import prune

FAST = dict(points=2, runs=1, warmup=0, dense_runs=2, calibrate=0)


@pytest.fixture(scope="module")
def torch_table(_v8n_base):
    """A measured torch table of the random-init yolov8n at imgsz 128 (seconds to build)."""
    return build_table(copy.deepcopy(_v8n_base), imgsz=128, runtime="torch", threads=1, cache=False, **FAST)


def test_table_structure(torch_table, v8n):
    t = torch_table
    assert (t.runtime, t.threads, t.imgsz, t.clock) == ("torch", 1, 128, "cpu")
    specs = {n: c.spec for n, c in t.convs.items()}
    # input resolution from the traced graph: the stem sees the image, every stride-2 conv halves it
    assert specs["model.0.conv"].size == 128 and specs["model.1.conv"].size == 64
    assert specs["model.2.cv0.conv"].size == 32 and specs["model.9.cv2.conv"].size == 4
    assert not specs["model.0.conv"].prune_in and specs["model.0.conv"].prune_out  # the image keeps 3 channels
    head = specs["model.22.cv3.0.2"]  # Detect's class output: only its input follows pruning
    assert head.prune_in and not head.prune_out and head.cout == 80
    assert "model.22.dfl.conv" not in t.convs
    for entry in t.convs.values():
        s = entry.spec
        assert entry.ins == sorted(entry.ins) and entry.outs == sorted(entry.outs)
        assert entry.ins[-1] == s.cin and entry.outs[-1] == s.cout  # the dense widths are grid points
        assert all(w % entry.q_in == 0 for w in entry.ins[:-1]) and all(w % entry.q_out == 0 for w in entry.outs[:-1])
        assert np.asarray(entry.ms).shape == (len(entry.ins), len(entry.outs))
        assert np.all(np.asarray(entry.ms) >= 0)
        if not s.prune_out:
            assert entry.outs == [s.cout]
    assert t.fixed_ms == pytest.approx(t.dense_ms - t.scale * t.conv_ms)
    assert t.predict_model(v8n) == pytest.approx(t.dense_ms)  # the dense widths predict the measured dense time


def test_table_interpolates_and_rounds_to_quanta(torch_table):
    entry = next(e for e in torch_table.convs.values() if e.spec.prune_in and e.spec.prune_out and len(e.ins) > 1)
    i0, i1, o0, o1 = entry.ins[0], entry.ins[1], entry.outs[0], entry.outs[1]
    ms = np.asarray(entry.ms)
    assert entry.time(i0, o0) == pytest.approx(max(ms[0, 0], 0))
    mid = entry.time((i0 + i1) / 2, o0)  # linear between grid points (after rounding up to the quantum)
    assert min(ms[0, 0], ms[1, 0]) - 1e-9 <= mid <= max(ms[0, 0], ms[1, 0]) + 1e-9
    if entry.q_in > 1:  # a width inside a quantum costs the whole quantum
        assert entry.time(i0 - 1, o0) == pytest.approx(entry.time(i0, o0))


def test_cache_key_and_reuse(_v8n_base, monkeypatch, tmp_path):
    monkeypatch.setenv("YOLO_PRUNE_CACHE", str(tmp_path))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # the CLI's logger does not propagate: listen on it directly
    logger = logging.getLogger("yolo_prune")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        first = build_table(copy.deepcopy(_v8n_base), imgsz=64, runtime="torch", threads=1, progress=True, **FAST)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    n = 2 * len(first.convs)  # quanta probes, then the width grids: the progress lines count both
    assert f"latency table torch: {n}/{n} conv measurements in " in "\n".join(r.getMessage() for r in records)
    assert first.path.parent == tmp_path / "latency" and first.path.is_file()
    assert json.loads(first.path.read_text())["key"] == first.key

    def no_measuring(*a, **k):
        raise AssertionError("a cached table was measured again")

    monkeypatch.setattr(latency.build, "probe_quanta", no_measuring)  # where build_table looks it up
    again = build_table(copy.deepcopy(_v8n_base), imgsz=64, runtime="torch", threads=1, **FAST)
    assert again.key == first.key and again.dense_ms == first.dense_ms
    assert again.predict_ms({}) == pytest.approx(first.predict_ms({}))
    # every part of the key matters: architecture, imgsz, runtime, threads (the CPU model is in it too)
    from yolo_prune.latency import conv_specs, prepared_model
    from yolo_prune.pruning.graph import build_graph

    module = prepared_model(_v8n_base)
    specs = conv_specs(module, build_graph(module), 64, 64)
    base = dict(imgsz=64, runtime="torch", threads=1, clock="cpu", points=2, min_fraction=0.25)
    keys = {table_key(specs, **base)}
    for change in ({"imgsz": 96}, {"runtime": "onnxruntime"}, {"threads": 2}, {"clock": "wall"}):
        keys.add(table_key(specs, **{**base, **change}))
    keys.add(table_key(specs[1:], **base))
    assert len(keys) == 6
    assert "AMD" in latency.cpu_model() or latency.cpu_model()  # the CPU model string is part of the key


def test_onnxruntime_conv_counts_only_its_own_nodes(tmp_path):
    bench = latency.ConvBench("onnxruntime", 32, 32, 3, 1, 32, 1, 1, profile_dir=tmp_path)
    for _ in range(3):
        bench()
    share = bench.share()
    assert 0 < share <= 1  # the tiny model's layout conversions are not the conv's
    assert not list(tmp_path.iterdir())  # the profile file is removed


def test_target_latency_respects_the_tables_predictions(torch_table, v8n):
    """On a small model at imgsz 128: the solver reaches the target of the table's own prediction.

    (torch eager at 128 is mostly per-op overhead, so the target sits between the floor and 1.)
    """
    table = torch_table
    everything = LatencyCost(table, 0.01)
    floor = everything.fraction(_graph_at_max(v8n), {})  # about what max_layer_ratio 0.75 leaves
    target = round(1 - (1 - floor) / 2, 3)
    for aware, round_to in ((True, "auto"), (False, 8)):
        model = copy.deepcopy(v8n)
        cost = LatencyCost(table, target, aware=aware)
        out = prune_model(model, latency=cost, round_to=round_to, tolerance=0.03)
        predicted = table.predict_model(model) / table.dense_ms
        assert target - 0.1 <= predicted <= target + 0.03
        assert out.steps[-1].target_latency == pytest.approx(target) and out.steps[-1].target_macs is None
        assert out.steps[-1].latency_fraction == pytest.approx(predicted)
        with torch.no_grad():
            assert model.eval()(torch.zeros(1, 3, 128, 128))[0].shape[1] == 84  # still a working detector


def test_sensitivity_allocation_reaches_a_latency_target(torch_table, v8n):
    """allocation=sensitivity works in the latency cost too (one channel alone often saves no measurable time:
    the allocation's per-channel saving is a slope over several channels)."""
    floor = LatencyCost(torch_table, 0.01).fraction(_graph_at_max(v8n), {})
    target = round(1 - (1 - floor) / 2, 3)
    model = copy.deepcopy(v8n)
    images = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    out = prune_model(model, latency=LatencyCost(torch_table, target), round_to="auto", tolerance=0.03,
                      allocation="sensitivity", calib_images=images, compensate="none")
    predicted = torch_table.predict_model(model) / torch_table.dense_ms
    assert out.allocation == "sensitivity" and target - 0.1 <= predicted <= target + 0.03


def _graph_at_max(v8n):
    """The graph of a copy of ``v8n`` pruned as far as max_layer_ratio=0.75 allows (ratio 0.75 everywhere)."""
    from yolo_prune.pruning.graph import build_graph

    model = copy.deepcopy(v8n)
    prune_model(model, ratio=0.74, global_pruning=False, round_to=None)
    return build_graph(model)


def test_round_to_auto_keeps_quanta(torch_table, v8n):
    table = copy.deepcopy(torch_table)
    for entry in table.convs.values():  # make every quantum 16 to see it in the widths
        entry.q_in = entry.q_out = 16
    model = copy.deepcopy(v8n)
    prune_model(model, target_macs=0.5, round_to="auto", latency=LatencyCost(table, None))
    for name, (cin, cout) in model_widths(model, table.convs).items():
        dense = table.convs[name].spec
        if dense.prune_out and cout != dense.cout and dense.cout > 16:  # (layers of <= 16 are not rounded)
            assert cout % 16 == 0, (name, cout)


def test_unreachable_latency_target_names_the_fixed_part(torch_table, v8n):
    table = torch_table
    with pytest.raises(PruningError, match="fixed part"):
        prune_model(copy.deepcopy(v8n), latency=LatencyCost(table, 0.02), max_layer_ratio=0.5)


def test_prune_with_target_latency_reports_predicted_and_measured(torch_table, v8n, tmp_path):
    target = 0.9
    res = prune(copy.deepcopy(v8n), target_latency=target, runtime="torch", threads=1, imgsz=128,
                latency_table=torch_table, project=tmp_path, name="p")
    lat = res.latency
    assert lat["runtime"] == "torch" and lat["target_fraction"] == target
    assert lat["predicted_ratio"] <= target + 0.03
    assert lat["measured_ms"] > 0 and lat["measured_ratio"] == pytest.approx(lat["measured_ms"] / lat["measured_dense_ms"])
    assert res.target_macs is None and "target_latency=0.9" in str(res)
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["latency"]["predicted_ms"] == pytest.approx(lat["predicted_ms"])
    md = (tmp_path / "p" / "report.md").read_text()
    assert "## Latency" in md and "measured" in md and "predicted" in md


@pytest.mark.parametrize(
    "argv, text",
    [
        (["prune", "target_latency=1.5"], "target_latency=1.5 is out of range"),
        (["prune", "target_latency=0"], "target_latency=0.0 is out of range"),
        (["prune", "target_ms=-3"], "target_ms=-3.0 is out of range"),
        (["prune", "target_latency=0.5", "target_ms=10"], "not both"),
        (["prune", "runtime=tensorrt"], "unknown runtime 'tensorrt'"),
        (["prune", "threads=-1"], "threads=-1 is out of range"),
        (["prune", "threads=two"], "threads='two' must be an integer"),
        (["prune", "round_to=fast"], "round_to='fast' must be an integer"),
        (["bench", "backends=torch,tensorrt"], "unknown backend(s) tensorrt"),
        (["pipeline", "data=x.yaml", "round_to=auto"], "does not take round_to=auto"),
    ],
)
def test_latency_options_fail_in_one_line(argv, text, capsys, tmp_path):
    code = cli.main(argv + ["model=yolov8n.yaml", f"project={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("yolo-prune: error:") and text in err and "\n" not in err


def test_api_rejects_bad_latency_options(v8n):
    with pytest.raises(UsageError, match="unknown runtime"):
        prune(v8n, target_latency=0.5, runtime="nope", save=False)
    with pytest.raises(UsageError, match="threads"):
        prune(v8n, target_latency=0.5, threads=1.5, save=False)
    with pytest.raises(UsageError, match="target_latency=2"):
        prune(v8n, target_latency=2, save=False)
    with pytest.raises(UsageError, match="round_to=auto"):
        prune_model(copy.deepcopy(v8n), round_to="auto")
    with pytest.raises(UsageError, match="imgsz"):
        build_table(v8n, imgsz=100, runtime="torch")


def test_table_round_trips_through_json(torch_table, tmp_path, v8n):
    path = torch_table.save(tmp_path / "t.json")
    back = LatencyTable.load(path)
    assert back.key == torch_table.key and set(back.convs) == set(torch_table.convs)
    half = {n: (c.spec.cin // 2, c.spec.cout // 2) for n, c in torch_table.convs.items()}
    assert back.predict_ms(half) == pytest.approx(torch_table.predict_ms(half))
    assert "fixed part (ms)" in str(back)


# --------------------------------------------------------------------------------------------------- OpenVINO


def test_openvino_export_of_a_pruned_model_matches_torch(v8n, tmp_path):
    ov = pytest.importorskip("openvino")
    from yolo_prune.bench import openvino_compiled
    from yolo_prune.deploy import export_model
    from yolo_prune.stats import inference_copy

    model = copy.deepcopy(v8n)
    prune_model(model, target_macs=0.5)
    folder = export_model(model, format="openvino", imgsz=64, save_dir=tmp_path)
    xml = next(folder.glob("*.xml"))
    compiled = openvino_compiled(xml, 1, precision="f32")  # bf16 (the default on some CPUs) is not exact
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    got = compiled(x.numpy())[compiled.output(0)]
    with torch.no_grad():
        want = inference_copy(model)(x)[0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))
    assert isinstance(ov.__version__, str)


def test_openvino_backend_and_table(v8n):
    pytest.importorskip("openvino")
    from yolo_prune.bench import measure_latency

    res = measure_latency({"a": v8n}, imgsz=64, backends="onnxruntime,openvino", runs=2, warmup=1, threads=1,
                          progress=False)
    assert {r.backend for r in res.entries} == {"onnx", "openvino"}
    bench = latency.ConvBench("openvino", 16, 16, 3, 1, 16, 1, 1, profile_dir=".")
    bench()
    assert 0 < bench.share() <= 1


# --------------------------------------------------------------------------------------------------- INT8


@pytest.fixture
def few_convs(monkeypatch):
    """Tables of the first 3 prunable convs only: an INT8 table of the whole model takes minutes."""
    from yolo_prune.latency import build

    real = build.conv_specs
    monkeypatch.setattr(build, "conv_specs", lambda *a, **k: real(*a, **k)[:3])


def test_int8_conv_probe_is_quantized_as_the_export():
    import onnx

    from yolo_prune.latency.convs import conv_onnx, int8_onnx

    ops = {n.op_type for n in onnx.load_from_string(int8_onnx(conv_onnx(16, 32, 3, 1, 16), 16, 16)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # QDQ around the conv, per-channel int8 weights
    bench = latency.ConvBench("onnxruntime", 16, 32, 3, 1, 16, 1, 1, int8=True)
    from yolo_prune.bench import interleaved_times

    times = interleaved_times({"int8": bench}, runs=2, warmup=1, progress=False)["int8"]
    assert len(times) == 2 and min(times) > 0
    with pytest.raises(UsageError, match="torch has no INT8 path"):
        latency.ConvBench("torch", 16, 32, 3, 1, 16, 1, 1, int8=True)
    if importlib.util.find_spec("openvino") is not None:  # OpenVINO runs the QDQ probe as its INT8 convolution
        ov_bench = latency.ConvBench("openvino", 16, 32, 3, 1, 16, 1, 1, int8=True, profile_dir=".")
        ov_bench()
        assert 0 < ov_bench.share() <= 1
        kinds = {p.exec_type for p in ov_bench._request.profiling_info}
        assert any("I8" in k.upper() or "U8" in k.upper() for k in kinds), kinds


def test_int8_table_differs_from_fp32_and_is_cached_apart(_v8n_base, few_convs, monkeypatch, tmp_path):
    monkeypatch.setenv("YOLO_PRUNE_CACHE", str(tmp_path))
    kw = dict(imgsz=64, runtime="onnxruntime", threads=1, **FAST)
    fp32 = build_table(copy.deepcopy(_v8n_base), **kw)
    int8 = build_table(copy.deepcopy(_v8n_base), int8=True, **kw)
    assert set(int8.convs) == set(fp32.convs) and len(int8.convs) == 3
    assert int8.int8 and not fp32.int8 and int8.key != fp32.key
    assert int8.path != fp32.path and "-int8-" in int8.path.name and int8.path.is_file() and fp32.path.is_file()
    grids = lambda t: [np.asarray(c.ms) for c in t.convs.values()]  # noqa: E731
    assert any(a.shape != b.shape or not np.allclose(a, b) for a, b in zip(grids(fp32), grids(int8)))
    assert int8.dense_ms != fp32.dense_ms  # the whole model measured as its INT8 export
    again = build_table(copy.deepcopy(_v8n_base), int8=True, **kw)  # from the INT8 cache, not the FP32 one
    assert again.path == int8.path and again.int8 and again.dense_ms == int8.dense_ms
    assert LatencyTable.load(int8.path).int8
    with pytest.raises(UsageError, match="torch has no INT8 path"):
        build_table(copy.deepcopy(_v8n_base), imgsz=64, runtime="torch", int8=True)
    with pytest.raises(UsageError, match="measured in FP32"):
        prune(copy.deepcopy(_v8n_base), target_latency=0.9, runtime="onnxruntime", int8=True, imgsz=64,
              latency_table=fp32, save=False)
    res = prune(copy.deepcopy(_v8n_base), target_latency=1.0, runtime="onnxruntime", threads=1, int8=True,
                imgsz=64, latency_table=int8, project=tmp_path, name="p")
    lat = res.latency  # predicted from the INT8 table, measured on the INT8 exports
    assert lat["int8"] and lat["predicted_ms"] > 0 and lat["measured_ms"] > 0 and lat["measured_dense_ms"] > 0
    assert "latency onnxruntime INT8 1 thr measured (ms)" in str(res)
    md = (tmp_path / "p" / "report.md").read_text()
    assert "predicted (INT8 latency table)" in md and "measured (INT8 exported models, interleaved)" in md
