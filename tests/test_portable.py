"""Portable pruning (``portable=True``): the pruned checkpoint holds stock ultralytics classes only and loads,
predicts, validates and exports ONNX in a process where ``yolo_prune`` cannot be imported.

Random-init yolov8n, yolo11n and yolo26n (3 classes, distinct BN statistics and head biases), pruned at imgsz 64
once per module; one subprocess checks all three checkpoints, with a finder on ``sys.meta_path`` that refuses every
``yolo_prune`` import, installed before ultralytics is imported.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from ultralytics.nn.modules import C2, C2PSA, C2f
from ultralytics.nn.modules.block import Attention

import yolo_prune as yp
from yolo_prune.errors import UsageError
from yolo_prune.models import pickled_modules
from yolo_prune.modules import to_prunable, to_stock
from yolo_prune.pruning import build_graph, prepare
from yolo_prune.pruning.allocation import curve_of
from yolo_prune.pruning.graph import ChannelGroup
from yolo_prune.pruning.portable import TiedGroup, tie, tie_counts, untie
from yolo_prune.pruning.schedule import LossCurve

from .helpers import BLOCKED, BLOCKED_JOBS, FAST, random_detection_model, shapes, subprocess_env, zero_channels

FAMILIES = ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"]
NC = 3
IMGSZ = 64
TARGET = 0.6
X = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(3))
IMAGE = (np.random.default_rng(4).random((IMGSZ, IMGSZ, 3)) * 255).astype(np.uint8)

CHECK = BLOCKED_JOBS + r'''
out = {}
for name, path in jobs["models"].items():
    yolo = YOLO(path)
    with torch.no_grad():
        raw = yolo.model.float().eval()(x)[0]
    boxes = yolo.predict(image, imgsz=jobs["imgsz"], conf=0.01, device="cpu", verbose=False)[0].boxes.data
    metrics = YOLO(path).val(data=jobs["data"], imgsz=jobs["imgsz"], batch=4, device="cpu", plots=False,
                             verbose=False, workers=0)
    onnx = YOLO(path).export(format="onnx", imgsz=jobs["imgsz"], device="cpu", simplify=False)
    torch.save({"raw": raw, "boxes": boxes}, path + ".out")
    out[name] = {"onnx": str(onnx), "map50_95": float(metrics.box.map)}
assert not any(m == "yolo_prune" or m.startswith("yolo_prune.") for m in sys.modules)
print(json.dumps(out))
'''

LOAD_ONLY = BLOCKED + r'''
from ultralytics import YOLO

YOLO(sys.argv[1])
'''


def _base(cfg: str) -> nn.Module:
    return random_detection_model(cfg, NC)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> dict[str, yp.PruneResult]:
    """Each family pruned portable to TARGET of its MACs (l1, no data), saved in a run folder."""
    root = tmp_path_factory.mktemp("portable")
    return {cfg: yp.prune(_base(cfg), method="l1", target_macs=TARGET, imgsz=IMGSZ, portable=True, project=root,
                          name=cfg.split(".")[0]) for cfg in FAMILIES}


def _run(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "YOLO_AUTOINSTALL": "False"}  # ultralytics must not try to pip-install yolo_prune
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


# --------------------------------------------------------------------------------------- the checkpoint alone
def test_checkpoints_load_predict_validate_and_export_without_yolo_prune(pruned, data, tmp_path):
    """In a process where importing yolo_prune fails, ``YOLO(pruned.pt)`` of yolov8n / yolo11n / yolo26n predicts
    what the pruned model predicts here, validates, and exports an ONNX file that computes the same."""
    import onnxruntime as ort

    torch.save(X, tmp_path / "x.pt")
    np.save(tmp_path / "image.npy", IMAGE)
    jobs = {"x": str(tmp_path / "x.pt"), "image": str(tmp_path / "image.npy"), "imgsz": IMGSZ, "data": data,
            "models": {cfg: str(res.checkpoint) for cfg, res in pruned.items()}}
    proc = _run(CHECK, json.dumps(jobs), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for cfg, res in pruned.items():
        got = torch.load(str(res.checkpoint) + ".out")
        with torch.no_grad():
            want = res.model.model.float().eval()(X)[0]
        assert torch.allclose(got["raw"], want, atol=1e-5), cfg
        boxes = res.model.predict(IMAGE, imgsz=IMGSZ, conf=0.01, device="cpu", verbose=False)[0].boxes.data
        assert got["boxes"].shape == boxes.shape and torch.allclose(got["boxes"], boxes, atol=1e-4), cfg
        assert np.isfinite(report[cfg]["map50_95"]), cfg
        session = ort.InferenceSession(report[cfg]["onnx"], providers=["CPUExecutionProvider"])
        onnx_out = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
        assert np.abs(onnx_out - want.numpy()).max() < 1e-3, cfg


def test_free_form_checkpoint_needs_yolo_prune(tmp_path):
    """``portable=False`` keeps yolo-prune's block forms: without yolo_prune the checkpoint does not load, and the
    error names the missing package; the report says so too."""
    res = yp.prune(_base("yolov8n.yaml"), method="l1", target_macs=TARGET, imgsz=IMGSZ, portable=False,
                   project=tmp_path, name="free")
    assert any(m.startswith("yolo_prune") for m in pickled_modules(res.checkpoint))
    proc = _run(LOAD_ONLY, str(res.checkpoint), cwd=tmp_path)
    assert proc.returncode != 0
    assert "No module named 'yolo_prune" in proc.stderr
    assert "needs yolo-prune installed" in (res.save_dir / "report.md").read_text()
    assert json.loads((res.save_dir / "report.json").read_text())["portable"] is False


# --------------------------------------------------------------------------------------- what is in it
@pytest.mark.parametrize("cfg", FAMILIES)
def test_only_stock_classes_and_macs_near_the_target(pruned, cfg):
    res = pruned[cfg]
    assert res.portable and res.to_dict()["portable"] is True
    assert abs(res.steps[-1].macs_fraction - TARGET) <= 0.03
    assert res.macs_ratio < TARGET + 0.05 and res.params_ratio < 0.8
    modules = pickled_modules(res.checkpoint)
    assert modules and not any(m.startswith("yolo_prune") for m in modules), sorted(modules)
    assert {type(m).__module__.split(".")[0] for m in res.model.model.modules()} <= {"torch", "ultralytics"}
    assert "loads with `YOLO(path)` without yolo-prune" in (res.save_dir / "report.md").read_text()


@pytest.mark.parametrize("cfg", FAMILIES)
def test_stock_widths_agree_and_halves_were_pruned(pruned, cfg):
    """Every attribute stock forward reads matches the pruned widths, and the split blocks did lose channels."""
    net, dense = pruned[cfg].model.model, dict(_base(cfg).named_modules())
    narrowed = 0
    for name, m in net.named_modules():
        if isinstance(m, (C2f, C2, C2PSA)):
            assert m.cv1.conv.out_channels == 2 * m.c, name
            narrowed += m.c < dense[name].c
        if isinstance(m, Attention):  # stock reshapes the values with the input width
            d = dense[name]
            assert m.qkv.conv.in_channels == m.num_heads * m.head_dim == d.qkv.conv.in_channels, name
            assert (m.num_heads, m.key_dim, m.head_dim) == (d.num_heads, d.key_dim, d.head_dim)
    assert narrowed >= 4


@pytest.mark.parametrize("cfg", FAMILIES)
def test_stock_form_computes_what_the_prunable_form_computes(pruned, cfg):
    net = pruned[cfg].model.model.float().eval()
    split = copy.deepcopy(net)
    assert to_prunable(split) > 0
    with torch.no_grad():
        assert torch.equal(net(X)[0], split(X)[0])
    assert to_stock(split) > 0
    assert set(split.state_dict()) == set(net.state_dict())


def test_a_finetuned_portable_checkpoint_stays_portable(pruned, data, tmp_path):
    """yolo-prune's trainer keeps the pruned shapes, and what it saves still names no yolo_prune class."""
    res = pruned["yolo11n.yaml"]
    tuned = yp.finetune(res.checkpoint, data, epochs=1, project=tmp_path, name="ft", plots=False, **FAST)
    assert shapes(tuned.last) == shapes(res.checkpoint)
    for ckpt in (tuned.last, tuned.best):
        modules = pickled_modules(ckpt)
        assert not any(m.startswith("yolo_prune") for m in modules), sorted(modules)


# --------------------------------------------------------------------------------------- the other paths
def test_calibrated_pruning_is_portable(data, tmp_path):
    """With data: sensitivity allocation (probes over tied groups), least-squares refit of the consumers, BN
    re-estimation and validation (with the mAP before re-estimation) all run on the tied plan."""
    res = yp.prune(_base("yolo11n.yaml"), target_macs=0.7, data=data, imgsz=IMGSZ, calib_images=8, validate=True,
                   compensate="lstsq", portable=True, project=tmp_path, name="calib", batch=4, device="cpu")
    assert res.allocation == "sensitivity" and res.compensate == "lstsq"
    assert abs(res.steps[-1].macs_fraction - 0.7) <= 0.03
    assert res.map50_95_no_recalibration is not None and res.map50_95_after is not None
    assert not any(m.startswith("yolo_prune") for m in pickled_modules(res.checkpoint))


def test_free_channels_go_in_equal_numbers(tmp_path):
    """threshold=: both halves of a split block lose the smaller of their two free counts."""
    model = prepare(_base("yolov8n.yaml"))
    zero_channels(build_graph(model), seed=0)  # a quarter of every group, both halves alike
    bn = model.model[2].cv0.bn  # and 3 channels more in one half (its group holds no other BN)
    extra = torch.nonzero(bn.weight != 0).flatten()[:3]
    bn.weight.data[extra], bn.bias.data[extra] = 0.0, 0.0
    res = yp.prune(model, threshold=0.01, round_to=None, imgsz=IMGSZ, portable=True, save=False)
    assert res.channels_free > 0
    net = res.model.model
    assert all(m.cv1.conv.out_channels == 2 * m.c for m in net.modules() if isinstance(m, C2f))
    assert net.model[2].c == 12  # 16 - 4 free in both halves; the first half's 3 more stay
    assert not any(type(m).__module__.startswith("yolo_prune") for m in net.modules())


def test_greg_plans_what_portable_pruning_removes():
    """sr_mode=greg zeroes, with portable, the same count in both halves of every split block and nothing of an
    attention's input width, so that a portable threshold removal takes exactly its plan."""
    from yolo_prune.pruning.bngroups import BNGroups
    from yolo_prune.train.penalty import greg_plan

    model = _base("yolo11n.yaml")  # stock classes: the plan names the live BNs (both halves in cv1.bn)
    plan = greg_plan(BNGroups.build(model), target_macs=0.6, method="l1", portable=True)
    assert plan.macs_fraction == pytest.approx(0.6, abs=0.03)
    tied = 0
    for i, layer in enumerate(model.model):
        if isinstance(layer, (C2f, C2PSA)):
            idx = torch.tensor(plan.entries.get(f"model.{i}.cv1.bn", []), dtype=torch.long)
            assert int((idx < layer.c).sum()) == int((idx >= layer.c).sum()), i
            tied += len(idx) > 0
    assert tied >= 4
    assert not any(name.startswith("model.10.m.0.attn.proj") for name in plan.entries)


def test_a_free_form_model_is_refused_in_one_line():
    model = yp.prune(_base("yolov8n.yaml"), method="l1", target_macs=0.5, imgsz=IMGSZ, portable=False,
                     save=False).model
    with pytest.raises(UsageError, match=r"pruned with portable=False .*: prune the unpruned model, or pass "
                                         r"portable=False") as err:
        yp.prune(model, method="l1", target_macs=0.8, imgsz=IMGSZ, portable=True, save=False)
    assert "\n" not in str(err.value)


def test_a_portable_model_prunes_again():
    """A portable result (stock classes) goes back to the prunable form for the next step of a pipeline."""
    first = yp.prune(_base("yolo26n.yaml"), method="l1", target_macs=0.8, imgsz=IMGSZ, portable=True, save=False)
    second = yp.prune(first.model, method="l1", target_macs=0.8, imgsz=IMGSZ, portable=True, save=False)
    assert second.macs_after < first.macs_after
    assert not any(type(m).__module__.startswith("yolo_prune") for m in second.model.model.modules())


# --------------------------------------------------------------------------------------- tying, in small
def _group(name: str, conv: nn.Conv2d, channels: int) -> ChannelGroup:
    return ChannelGroup(name=name, root=conv, handler=None, channels=channels, group=None,
                        convs=[(conv, True, 1.0)])


def test_tied_units_take_the_lowest_channels_of_both_halves():
    a, b, other = nn.Conv2d(1, 4, 1), nn.Conv2d(1, 4, 1), nn.Conv2d(1, 3, 1)
    graph = types.SimpleNamespace(portable=True, pairs=((a, b),))
    sa, sb, so = torch.tensor([4.0, 1.0, 3.0, 2.0]), torch.tensor([0.5, 9.0, 0.1, 7.0]), torch.tensor([1.0, 2, 3])
    scored = tie(graph, [(_group("a", a, 4), sa), (_group("o", other, 3), so), (_group("b", b, 4), sb)])
    assert [g.name for g, _ in scored] == ["a+b", "o"]
    tied, scores = scored[0]
    assert isinstance(tied, TiedGroup) and tied.channels == 4
    assert torch.allclose(scores, torch.tensor([0.55, 1.25, 5.0, 6.5]))  # means of the k-th lowest of each half
    plans = untie([(tied, [0, 1]), (scored[1][0], [2])])
    assert [(g.name, idx) for g, idx in plans] == [("a", [1, 3]), ("b", [0, 2]), ("o", [2])]
    # a half without its partner cannot lose channels alone; counts of a pair go to the smaller one
    assert [g.name for g, _ in tie(graph, [(_group("a", a, 4), sa)])] == []
    groups = [_group("a", a, 4), _group("b", b, 4), _group("o", other, 3)]
    assert tie_counts(graph, groups, [3, 1, 2]) == [1, 1, 2]
    assert tie_counts(graph, groups[:1], [3]) == [0]


def test_a_tied_group_sums_its_halves_curves():
    curves = {"a": LossCurve((0.25, 0.5), (1.0, 2.0)), "b": LossCurve((0.25, 0.5), (0.5, 4.0))}
    a, b = nn.Conv2d(1, 4, 1), nn.Conv2d(1, 4, 1)
    tied = TiedGroup(name="a+b", root=a, handler=None, channels=4, group=None, convs=[],
                     members=((_group("a", a, 4), torch.arange(4)), (_group("b", b, 4), torch.arange(4))))
    assert curve_of(tied, curves).losses == (1.5, 6.0)
    assert curve_of(tied, {"a": curves["a"]}) is None


def test_portable_is_an_option_of_prune_and_pipeline():
    from yolo_prune.options import SCHEMA

    key = SCHEMA["portable"]
    assert key.kind == "bool" and key.group == "prune" and {"prune", "pipeline"} <= key.modes
    assert yp.PruneOptions().portable is key.default
    with pytest.raises(UsageError):
        yp.PruneOptions(portable="maybe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
