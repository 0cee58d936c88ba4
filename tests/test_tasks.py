"""Segmentation, pose and oriented-box models (issue 22, first slice): YOLOv8 / YOLO11 / YOLO26 ``-seg``, ``-pose``
and ``-obb`` prune through the dependency graph like detection models.

Random-init models from the yamls (3 classes, distinct BN statistics and head biases), MACs at imgsz 128. What is
checked: the MACs target is met; the task outputs (mask coefficients, prototypes, keypoints, angle; box and class)
keep their widths while the task branches' hidden widths and Proto's inner convs are pruned; the graph's MACs model
counts the new branches as ultralytics-thop does (Proto at its resolution, training-only branches left out); zeroed
channels go without changing any output, training-only branches (Pose26's sigmas, Proto26's semantic head) follow;
a portable checkpoint of each task loads, predicts and exports to ONNX in a process without yolo_prune; the heads
yolo-prune does not prune are refused by name in one line before any work.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import yolo_prune as yp
from yolo_prune import cli
from yolo_prune.errors import ModelLoadError
from yolo_prune.models import load_model, pickled_modules
from yolo_prune.pruning import build_graph, prepare, prune_model
from yolo_prune.stats import count_macs

from .helpers import BLOCKED_JOBS, random_detection_model, read_csv, subprocess_env, task_widths, zero_channels

NC = 3
IMGSZ = 128
TARGET = 0.5
FAMILIES = ["yolo11n-seg.yaml", "yolov8n-seg.yaml", "yolo26n-seg.yaml", "yolo11n-pose.yaml", "yolov8n-pose.yaml",
            "yolo26n-pose.yaml", "yolo11n-obb.yaml", "yolo26n-obb.yaml"]
METHODS = ["l1", "bn", "random"]
X = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(21))

_BASE: dict[str, nn.Module] = {}


def base(cfg: str) -> nn.Module:
    """A fresh copy of the random-init model of ``cfg`` (eval mode), built once per module."""
    if cfg not in _BASE:
        _BASE[cfg] = random_detection_model(cfg, NC)
    return copy.deepcopy(_BASE[cfg])


def tensors(out) -> list[torch.Tensor]:
    """Every tensor of a model output (decoded predictions, prototypes, each branch's raw maps), in order; not the
    feature maps the head read (``feats``: the neck's widths)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = [v for k, v in out.items() if k != "feats"]
    return [t for o in out for t in tensors(o)] if isinstance(out, (list, tuple)) else []


def outputs(model: nn.Module, x: torch.Tensor = X) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return tensors(model(x))


def hidden_widths(model: nn.Module) -> dict[str, int]:
    """Summed output width of the task branches' hidden convs (cv4's Conv layers) and of Proto's inner convs."""
    head = model.model[-1]
    out = {"cv4": 0, "proto": 0}
    for name, m in head.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            continue
        if name.startswith("cv4.") and name.endswith(".conv"):
            out["cv4"] += m.out_channels
        elif name.startswith(("proto.cv1", "proto.cv2", "proto.upsample", "proto.feat_fuse")):
            out["proto"] += m.out_channels
    return out


# ---------------------------------------------------------------------------------------- target and widths
@pytest.mark.parametrize("cfg, method", [(cfg, METHODS[i % 3]) for i, cfg in enumerate(FAMILIES)])
def test_half_the_macs_with_task_outputs_kept(cfg, method):
    model = base(cfg)
    macs0, shapes0, widths0, hidden0 = (count_macs(model, imgsz=IMGSZ), [t.shape for t in outputs(model)],
                                        task_widths(model), hidden_widths(model))
    prune_model(model, method=method, target_macs=TARGET, macs_imgsz=IMGSZ, compensate="none")
    reached = count_macs(model, imgsz=IMGSZ) / macs0
    assert abs(reached - TARGET) <= 0.03, reached
    assert [t.shape for t in outputs(model)] == shapes0  # masks coefficients, protos, keypoints, angle, box, class
    assert task_widths(model) == widths0 and len(widths0) >= 9
    hidden = hidden_widths(model)
    assert hidden["cv4"] < hidden0["cv4"]  # the task branches' hidden widths are pruned
    if "seg" in cfg:
        assert hidden["proto"] < hidden0["proto"]  # and Proto's inner convs
    assert all(torch.isfinite(t).all() for t in outputs(model))


def test_task_outputs_are_the_head_widths():
    """What ``task_widths`` reads is what the heads define: nm masks and nm prototypes, nk keypoints, ne angles."""
    seg, pose, obb = (base(c).model[-1] for c in ("yolo26n-seg.yaml", "yolo26n-pose.yaml", "yolo11n-obb.yaml"))
    widths = task_widths(base("yolo26n-seg.yaml"))
    assert {w for n, w in widths.items() if "cv4" in n or n == "proto.cv3"} == {seg.nm} and widths["proto.semseg"] == NC
    widths = task_widths(base("yolo26n-pose.yaml"))
    assert {w for n, w in widths.items() if "kpts" in n} == {pose.nk} and "cv4.0" not in widths  # cv4: hidden
    assert {w for n, w in widths.items() if "sigma" in n} == {pose.nk_sigma}
    assert {w for n, w in task_widths(base("yolo11n-obb.yaml")).items() if "cv4" in n} == {obb.ne}


# --------------------------------------------------------------------------------------------- the MACs model
@pytest.mark.parametrize("cfg", ["yolov8n-seg.yaml", "yolo26n-seg.yaml", "yolo26n-pose.yaml"])
def test_macs_model_counts_the_task_branches(cfg):
    """The graph's MACs equal ultralytics-thop's on the fused model: cv4 branches and Proto (its transposed conv per
    input pixel, at twice P3's resolution) counted, training-only branches (Proto26's semantic head, Pose26's sigmas,
    dropped by fuse()) not."""
    model = prepare(base(cfg))
    for size in (64, IMGSZ):
        graph = build_graph(model, macs_imgsz=size)
        assert graph.conv_macs() == count_macs(model, imgsz=size)
    head = model.model[-1]
    if hasattr(head, "proto"):
        assert graph.conv_hw[head.proto.cv2.conv] == (2 * IMGSZ // 8) ** 2
        assert graph.conv_hw[head.proto.upsample] == (IMGSZ // 8) ** 2
    dropped = [getattr(getattr(head, "proto", None), "semseg", None), getattr(head, "cv4_sigma", None)]
    assert not any(m in graph.conv_hw for mod in dropped if mod is not None for m in mod.modules())


# ------------------------------------------------------------------------------------- lossless removal
@pytest.mark.parametrize("cfg", ["yolo11n-seg.yaml", "yolo26n-seg.yaml", "yolo26n-pose.yaml"])
def test_zeroed_channels_go_losslessly_and_training_branches_follow(cfg):
    """Zero gamma and beta of a quarter of every group's channels: removing exactly those (cv4 hidden widths, Proto
    and Proto26's fusion included) leaves every output unchanged, and the training forward (Pose26's sigma convs,
    Proto26's semantic head, which the eval forward does not run) still computes the same shapes."""
    model = prepare(base(cfg))
    zeroed, total = zero_channels(build_graph(model), seed=3)
    ref = outputs(model)
    train_shapes = [t.shape for t in tensors(copy.deepcopy(model).train()(X))]  # (a copy: BN statistics move)
    outcome = prune_model(model, method="bn", ratio=zeroed / total, round_to=None)
    assert outcome.steps[0].channels_removed == zeroed
    for a, b in zip(outputs(model), ref, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), (a - b).abs().max()
    assert [t.shape for t in tensors(model.train()(X))] == train_shapes


def test_compensation_absorbs_constant_channels_in_the_task_branch():
    """Pose26: zero only gamma, so the chosen channels output a constant; least-squares compensation on calibration
    images folds it into their consumers (cv4_kpts among them), removing most of the shift that removing them causes
    in the keypoints."""
    model = prepare(base("yolo26n-pose.yaml"))
    zeroed, total = zero_channels(build_graph(model), seed=4, beta=False)
    calib = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    kpts = lambda m: m.eval()(calib[:2])[1]["one2many"]["kpts"]  # noqa: E731 (raw keypoints of every anchor)
    with torch.no_grad():
        ref = kpts(model)
    errors = {}
    for comp in ("none", "lstsq"):
        m = copy.deepcopy(model)
        prune_model(m, method="bn", ratio=zeroed / total, round_to=None, calib_images=calib, compensate=comp)
        with torch.no_grad():
            errors[comp] = (kpts(m) - ref).abs().mean().item()
    assert errors["none"] > 1e-3 and errors["lstsq"] < 0.3 * errors["none"], errors


def test_sequential_refit_reaches_the_masks():
    """``lstsq_seq`` refits the task branches too (cv4 per scale, Proto): the prototypes and mask coefficients of a
    pruned yolo11n-seg come much closer to the dense model's than without compensation."""
    dense = base("yolo11n-seg.yaml")
    calib = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    ref = dense.eval()(calib[:2])[1]
    errors = {}
    for comp in ("none", "lstsq_seq"):
        m = copy.deepcopy(dense)
        prune_model(m, method="l1", target_macs=0.6, calib_images=calib, compensate=comp, macs_imgsz=64)
        with torch.no_grad():
            got = m.eval()(calib[:2])[1]
        errors[comp] = [((got[k] - ref[k]).abs().mean() / ref[k].abs().mean()).item()
                        for k in ("proto", "mask_coefficient")]
    assert all(seq < 0.3 * none for seq, none in zip(errors["lstsq_seq"], errors["none"])), errors


# ---------------------------------------------------------------- CLI / API, checkpoint in a fresh process
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, yp.PruneResult]:
    """One family per task pruned portable to half its MACs: the seg one through the CLI, the others through the
    API (yolo26n-pose: Pose26 with its flow model and sigma convs)."""
    root = tmp_path_factory.mktemp("tasks")
    base_seg = root / "yolo11n-seg.pt"
    yp.models.save_input_checkpoint(base("yolo11n-seg.yaml"), base_seg)
    assert cli.main(["prune", f"model={base_seg}", "method=l1", f"target_macs={TARGET}", "imgsz=64",
                     f"project={root}", "name=seg"]) == 0
    out = {"segment": root / "seg" / "weights" / "pruned.pt"}
    for task, cfg in (("pose", "yolo26n-pose.yaml"), ("obb", "yolo11n-obb.yaml")):
        res = yp.prune(base(cfg), method="l1", target_macs=TARGET, imgsz=64, project=root, name=task)
        assert res.portable and abs(res.steps[-1].macs_fraction - TARGET) <= 0.03
        out[task] = res.checkpoint
    return out


def test_cli_report_lists_the_task_branches(checkpoints):
    """The CLI run's layers.csv lists the seg head's prunable convs (cv4 hidden widths, Proto's inner convs and its
    transposed conv) with their pruned widths, and none of its outputs."""
    rows = {r["name"]: (int(r["channels_before"]), int(r["channels_after"]))
            for r in read_csv(checkpoints["segment"].parent.parent / "layers.csv")}
    head = [n for n in rows if n.startswith("model.23.")]
    assert {"model.23.proto.cv1.conv", "model.23.proto.upsample", "model.23.proto.cv2.conv"} <= set(head)
    assert not any(n.startswith("model.23.proto.cv3") or n.endswith((".2", "dfl.conv")) for n in head), head
    for part in (".proto.", ".cv4."):
        before, after = (sum(w[i] for n, w in rows.items() if part in n) for i in (0, 1))
        assert after < before, part


CHECK = BLOCKED_JOBS + r'''
report = {}
for task, path in jobs["models"].items():
    yolo = YOLO(path)
    assert yolo.task == task, (yolo.task, task)
    r = yolo.predict(image, imgsz=jobs["imgsz"], conf=0.01, device="cpu", verbose=False)[0]
    found = {"segment": r.masks, "pose": r.keypoints, "obb": r.obb}[task]
    with torch.no_grad():
        out = YOLO(path).model.float().eval()(x)
    onnx = YOLO(path).export(format="onnx", imgsz=jobs["imgsz"], device="cpu", simplify=False)
    torch.save(out, path + ".out")
    report[task] = {"onnx": str(onnx), "found": None if found is None else list(found.data.shape)}
assert not any(m == "yolo_prune" or m.startswith("yolo_prune.") for m in sys.modules)
print(json.dumps(report))
'''


def test_checkpoints_reload_predict_and_export_without_yolo_prune(checkpoints, tmp_path):
    """In a process where yolo_prune cannot be imported: ``YOLO(pruned.pt)`` of each task computes what the pruned
    model computes here, predicts masks / keypoints / rotated boxes, and its ONNX export matches torch (every output:
    boxes, scores and the task's channels; the prototypes of the seg model)."""
    import onnxruntime as ort

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    torch.save(x, tmp_path / "x.pt")
    np.save(tmp_path / "image.npy", (np.random.default_rng(6).random((64, 64, 3)) * 255).astype(np.uint8))
    jobs = {"x": str(tmp_path / "x.pt"), "image": str(tmp_path / "image.npy"), "imgsz": 64,
            "models": {task: str(path) for task, path in checkpoints.items()}}
    env = {**subprocess_env(), "YOLO_AUTOINSTALL": "False"}
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(jobs)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    per_instance = {"segment": [64, 64], "pose": [17, 3], "obb": [7]}
    for task, path in checkpoints.items():
        assert not any(m.startswith("yolo_prune") for m in pickled_modules(path)), task
        here = load_model(path, tasks=("segment", "pose", "obb")).model.float().eval()
        want = outputs(here, x)
        got = tensors(torch.load(str(path) + ".out"))
        assert len(got) == len(want) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want)), task
        found = report[task]["found"]
        assert found and found[0] > 0 and found[1:] == per_instance[task], (task, found)
        session = ort.InferenceSession(report[task]["onnx"], providers=["CPUExecutionProvider"])
        onnx = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        decoded = want[: len(onnx)]  # (y, proto) for seg, y for pose and obb
        assert len(onnx) == (2 if task == "segment" else 1)
        for a, b in zip(onnx, decoded):
            assert a.shape == b.shape and np.abs(a - b.numpy()).max() < 1e-3, (task, np.abs(a - b.numpy()).max())


# ---------------------------------------------------------------------------------------------- refused
@pytest.mark.parametrize("cfg, head", [
    ("yoloe-11-seg.yaml", "YOLOESegment"), ("yoloe-26n.yaml", "YOLOEDetect"), ("yolov8-worldv2.yaml", "WorldDetect"),
    ("yolov8-rtdetr.yaml", "RTDETRDecoder"), ("yolov10n.yaml", "v10Detect"), ("yolo26-sem.yaml", "SemanticSegment"),
    ("yolo26-depth.yaml", "Depth")])
def test_unsupported_heads_are_refused_by_name_before_any_work(cfg, head, tmp_path, capsys):
    code = cli.main(["prune", f"model={cfg}", f"project={tmp_path}", "name=x"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"ends in {head};" in err and "Segment" in err
    assert not (tmp_path / "x").exists()


def test_other_steps_refuse_task_models_in_one_line(synthetic, tmp_path, capsys):
    """Stages that do not handle a task yet (sparsify) say so, a yaml too."""
    with pytest.raises(ModelLoadError, match=r"segment model; this step takes detection models only") as e:
        load_model("yolo11n-seg.yaml")
    assert "\n" not in str(e.value)
    assert cli.main(["sparsify", "model=yolo11n-obb.yaml", f"data={synthetic / 'yolo.yaml'}", f"project={tmp_path}",
                     "name=f"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "obb model; this step takes detection models only" in err, err
    assert not (tmp_path / "f").exists()
