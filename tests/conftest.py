"""Shared fixtures: random-init models (no downloads), the generated dataset, the optional real fixtures."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from .helpers import SHARED, randomize_bn

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics must never try the network in tests


def pytest_configure(config):
    """Keep yolo-prune's dataset cache of this session in a temporary folder, not in ~/.cache."""
    import tempfile

    os.environ["YOLO_PRUNE_CACHE"] = tempfile.mkdtemp(prefix="yolo_prune_cache_")


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
def synthetic_task(tmp_path_factory):
    """``synthetic_task(task)``: the generated dataset of ``task`` (detect, segment, pose, obb: ``root/yolo.yaml``;
    segment also ``root/coco.yaml``), 12 train and 6 val images of 128 px, made once per session and task."""
    from yolo_prune.data.synthetic import make_synthetic

    made: dict[str, Path] = {}

    def make(task: str) -> Path:
        if task not in made:
            made[task] = make_synthetic(tmp_path_factory.mktemp(f"synthetic_{task}"), n_train=12, n_val=6, imgsz=128,
                                        seed=0, task=task)
        return made[task]

    return make


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """``../shared/fixtures`` (real COCO weights and images), or skip when it is absent."""
    if not (SHARED / "weights" / "yolov8n_coco_int8rebuild.pt").is_file():
        pytest.skip(f"real fixtures not found at {SHARED} (only present in the project's CI)")
    return SHARED


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """yolo_prune.data's converted-dataset cache in a folder of the module's own, out of the home folder (a module
    asks for it with ``pytestmark = pytest.mark.usefixtures("data_cache")``)."""
    old = os.environ.get("YOLO_PRUNE_CACHE")
    os.environ["YOLO_PRUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("YOLO_PRUNE_CACHE", None)
    else:
        os.environ["YOLO_PRUNE_CACHE"] = old


@pytest.fixture(scope="module")
def data(synthetic) -> str:
    return str(synthetic / "yolo.yaml")
