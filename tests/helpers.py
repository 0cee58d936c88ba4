"""Plain helpers shared by the test modules (constants, model builders, checkpoint and CSV readers, subprocess
environment); the fixtures are in conftest.py."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm distinct gammas, betas and running stats (random init has gamma == 1 everywhere)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) * 1.4 + 0.1
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model


def zero_channels(graph, *, seed: int, beta: bool = True) -> tuple[int, int]:
    """Zero the BN gamma (and beta, with ``beta``) of a random quarter of every channel group's channels, in
    every BN that produces them. Returns (channels zeroed, channels in all groups); a group without a BN (Proto's
    transposed conv) has none zeroed."""
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    zeroed = 0
    for group in graph.groups():
        k = group.channels // 4
        chosen = torch.randperm(group.channels, generator=g)[:k].tolist()
        has_bn = False
        for dep, idxs in graph.dg.get_pruning_group(group.root, group.handler, chosen) if k else []:
            if isinstance(dep.target.module, nn.BatchNorm2d) and graph.dg.is_out_channel_pruning_fn(dep.handler):
                has_bn = True
                dep.target.module.weight.data[idxs] = 0.0
                if beta:
                    dep.target.module.bias.data[idxs] = 0.0
        zeroed += k if has_bn else 0
    return zeroed, sum(grp.channels for grp in graph.groups())


# ----------------------------------------------------------------------------------------------- training
NC = 3  # classes of the synthetic dataset
# Small and fast: 4 optimizer steps per epoch (nbs=batch), no warmup epoch eaten by the tiny run.
FAST = dict(imgsz=64, batch=4, workers=0, device="cpu", nbs=4, warmup_epochs=0)



def model_class(cfg: str) -> type:
    """The ultralytics model class of a model yaml's task (DetectionModel, SegmentationModel, PoseModel, OBBModel)."""
    from ultralytics.nn import tasks as ut

    classes = {"segment": ut.SegmentationModel, "pose": ut.PoseModel, "obb": ut.OBBModel}
    return classes.get(ut.guess_model_task(ut.yaml_model_load(cfg)), ut.DetectionModel)


# Every per-scale branch list of a head whose last conv is an output: box, class, and the tasks' (mask coefficients,
# keypoints, angle; Pose26's cv4 ends in a hidden conv, its outputs are cv4_kpts / cv4_sigma).
HEAD_OUTPUTS = ("cv2", "cv3", "one2one_cv2", "one2one_cv3", "cv4", "one2one_cv4", "cv4_kpts", "one2one_cv4_kpts",
                "cv4_sigma", "one2one_cv4_sigma")


def random_detection_model(cfg: str, nc: int = NC) -> torch.nn.Module:
    """The model of ``cfg`` (detection, or segmentation / pose / OBB in their model class) with random BN statistics
    and random head output biases (so that no output is trivially equal across widths), eval mode; seeded."""
    import logging

    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "no model scale passed" for the variants; restored (later tests read the logs)
    try:
        torch.manual_seed(0)
        model = randomize_bn(model_class(cfg)(cfg, nc=nc, verbose=False))
    finally:
        logger.setLevel(level)
    g = torch.Generator().manual_seed(1)
    head = model.model[-1]
    for name in HEAD_OUTPUTS:
        for branch in getattr(head, name, None) or []:
            last = branch[-1] if isinstance(branch, nn.Sequential) else branch
            if type(last) is nn.Conv2d:
                last.bias.data = torch.randn(last.out_channels, generator=g)
    return model.eval()


def make_pruned_model(nc: int = NC, seed: int = 0) -> nn.Module:
    """A really pruned yolov8n (torch-pruning via yolo_prune.pruning, 30% of channels), in the free form (halves of
    different widths, yolo-prune's block classes): the harder case for whatever runs on it next."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = randomize_bn(DetectionModel("yolov8n.yaml", nc=nc, verbose=False), seed=seed)
    try:
        from yolo_prune.stages.prune import prune
    except ImportError:  # pruning engine not there: fake it (see fake_pruned_model)
        return fake_pruned_model(model)
    return prune(model, method="l1", ratio=0.3, imgsz=64, save=False, portable=False).model.model


def fake_pruned_model(model: nn.Module) -> nn.Module:
    """Narrow layer 0 (and layer 1's input) to 8 channels and claim the yolov8s yaml: a yaml rebuild would
    produce different shapes everywhere, which is exactly what must not happen."""
    from ultralytics.nn.tasks import yaml_model_load

    c0, c1 = model.model[0], model.model[1]
    keep = slice(0, 8)
    c0.conv.weight = nn.Parameter(c0.conv.weight.data[keep].clone())
    c0.conv.out_channels = 8
    bn = c0.bn
    bn.weight, bn.bias = nn.Parameter(bn.weight.data[keep].clone()), nn.Parameter(bn.bias.data[keep].clone())
    bn.running_mean, bn.running_var = bn.running_mean[keep].clone(), bn.running_var[keep].clone()
    bn.num_features = 8
    c1.conv.weight = nn.Parameter(c1.conv.weight.data[:, keep].clone())
    c1.conv.in_channels = 8
    model.yaml = {**yaml_model_load("yolov8s.yaml"), "nc": model.nc}
    return model


def save_like_ultralytics(model: nn.Module, path: Path) -> Path:
    """A checkpoint the way ultralytics writes one: fp16 module under 'model', frozen parameters."""
    m = copy.deepcopy(model).half()
    for p in m.parameters():
        p.requires_grad_(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": m, "train_args": {}, "epoch": -1}, path)
    return path


def shapes(model_or_path) -> dict[str, tuple]:
    if isinstance(model_or_path, (str, Path)):
        from ultralytics.nn.tasks import load_checkpoint

        model_or_path = load_checkpoint(model_or_path)[0]
    return {k: tuple(v.shape) for k, v in model_or_path.state_dict().items()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------- subprocesses
def subprocess_env() -> dict[str, str]:
    """The environment of a fresh python process that must import this checkout's yolo_prune (offline, one thread)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run_ddp_file(trainer, cwd: Path) -> None:
    """Run ultralytics' generated DDP worker script for ``trainer`` in a fresh process (one CPU rank)."""
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

    file = generate_ddp_file(trainer)
    try:
        proc = subprocess.run([sys.executable, file], env=subprocess_env(), cwd=cwd, capture_output=True, text=True,
                              timeout=300)
    finally:
        ddp_cleanup(trainer, file)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# Runs in a fresh interpreter: every yolo_prune import fails as if the package were not installed.
BLOCKED = r'''
import sys


class NoYoloPrune:
    """A finder that refuses yolo_prune as if it were not installed (first on sys.meta_path)."""

    def find_spec(self, name, path=None, target=None):
        if name == "yolo_prune" or name.startswith("yolo_prune."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoYoloPrune())
'''

# The same, then the job a test passes as JSON in argv[1]: ``jobs`` with the input tensor ``x`` and the image ``image``.
BLOCKED_JOBS = BLOCKED + r'''
import json
import numpy as np
import torch
from ultralytics import YOLO

jobs = json.loads(sys.argv[1])
x = torch.load(jobs["x"])
image = np.load(jobs["image"])
'''
