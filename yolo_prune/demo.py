"""``yolo-prune demo``: the whole pipeline on a generated dataset, with a small dense model trained first."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from ultralytics import YOLO

from .data.synthetic import make_synthetic
from .io import run_dir, run_path
from .logs import quiet_ultralytics
from .job import config_keys, pipeline
from .stages.report import PipelineResult
from .train.progress import EpochProgress

LOGGER = logging.getLogger("yolo_prune")


def demo(cfg: dict[str, Any], extra: dict[str, Any]) -> PipelineResult:
    """Generate the synthetic dataset, train a small dense model, then run the pipeline on it.

    Settings come from ``cfg/demo.yaml`` (merged by :func:`yolo_prune.config.build`), so any of them can be
    overridden on the command line. Nothing is downloaded.
    """
    task = YOLO(str(cfg["model"])).task  # a -seg / -pose / -obb model gets the generated data of its task
    data = cfg["data"] or _demo_data(task, cfg["seed"])
    if cfg["resume"]:
        save_dir = run_path(cfg["project"], "demo", cfg["name"])
    else:
        save_dir = run_dir(cfg["project"], "demo", cfg["name"], exist_ok=cfg["exist_ok"])
    dense = save_dir / "dense" / "weights" / "best.pt"
    if not dense.is_file():
        _train_dense(cfg, extra, data, save_dir)
    keys = config_keys(cfg)
    if keys.get("int8") == "auto":  # the demo ends deployable where OpenVINO's INT8 path exists (detection)
        on = int8_available() and task == "detect"
        keys.update(int8=True, runtime="openvino") if on else keys.update(int8=False)
    result = pipeline(dense, data, save_dir=save_dir, train_args=extra, **keys)
    LOGGER.info("demo: the pruned model trained %d epochs more than the dense one (sparse + finetune), which is "
                "part of its mAP; BENCHMARKS.md compares at equal training budget", cfg["sparse_epochs"] +
                cfg["finetune_epochs"])
    return result


def _demo_data(task: str, seed: int) -> Path:
    """The generated dataset of ``task`` in the user's cache, YOLO form (the dense model trains with ultralytics)."""
    cache = Path(os.environ.get("YOLO_PRUNE_CACHE") or Path.home() / ".cache" / "yolo_prune")
    folder = cache / ("demo_data" if task == "detect" else f"demo_data_{task}")
    root = make_synthetic(folder, n_train=128, n_val=32, imgsz=256, seed=seed, task=task)
    return root / "yolo.yaml"


def int8_available() -> bool:
    """OpenVINO and NNCF are importable: the demo adds the INT8 stage (``int8=True runtime=openvino``)."""
    return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))


def _train_dense(cfg: dict[str, Any], extra: dict[str, Any], data: Path, save_dir: Path) -> None:
    """The dense model the demo prunes (it stands in for the user's trained checkpoint)."""
    LOGGER.info("demo: training a dense %s for %d epochs on %s (it stands in for your trained model)", cfg["model"],
                cfg["epochs"], data)
    yolo = YOLO(str(cfg["model"]))
    if not cfg["verbose"]:
        EpochProgress("dense").attach(yolo)
    with quiet_ultralytics(cfg["verbose"]):
        yolo.train(
            data=str(data), epochs=cfg["epochs"], imgsz=cfg["imgsz"], batch=cfg["batch"], workers=cfg["workers"],
            device=cfg["device"] or None, seed=cfg["seed"], project=str(save_dir), name="dense", exist_ok=True,
            save_dir=str(save_dir / "dense"), plots=False, val=False, verbose=cfg["verbose"], **extra)
