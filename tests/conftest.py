"""Shared fixtures: random-init models (no downloads), the generated dataset, the optional real fixtures."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics must never try the network in tests


def pytest_configure(config):
    """Keep yolo-prune's dataset cache of this session in a temporary folder, not in ~/.cache."""
    import tempfile

    os.environ["YOLO_PRUNE_CACHE"] = tempfile.mkdtemp(prefix="yolo_prune_cache_")

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
    every BN that produces them. Returns (channels zeroed, channels in all groups)."""
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    zeroed = 0
    for group in graph.groups():
        k = group.channels // 4
        chosen = torch.randperm(group.channels, generator=g)[:k].tolist()
        for dep, idxs in graph.dg.get_pruning_group(group.root, group.handler, chosen) if k else []:
            if isinstance(dep.target.module, nn.BatchNorm2d) and graph.dg.is_out_channel_pruning_fn(dep.handler):
                dep.target.module.weight.data[idxs] = 0.0
                if beta:
                    dep.target.module.bias.data[idxs] = 0.0
        zeroed += k
    return zeroed, sum(grp.channels for grp in graph.groups())


@pytest.fixture(scope="session")
def _v8n_base():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return randomize_bn(DetectionModel("yolov8n.yaml", verbose=False)).eval()


@pytest.fixture
def v8n(_v8n_base):
    """A fresh random-init yolov8n DetectionModel (eval mode, distinct BN statistics)."""
    return copy.deepcopy(_v8n_base)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """The generated dataset (YOLO form: root/yolo.yaml, COCO form: root/coco.yaml), small images."""
    from yolo_prune.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic"), n_train=16, n_val=8, imgsz=128, seed=0)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """``../shared/fixtures`` (real COCO weights and images), or skip when it is absent."""
    if not (SHARED / "weights" / "yolov8n_coco_int8rebuild.pt").is_file():
        pytest.skip(f"real fixtures not found at {SHARED} (only present in the project's CI)")
    return SHARED
