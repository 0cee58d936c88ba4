"""yolo-prune: make trained YOLOv8 detectors smaller and faster, keeping their accuracy.

The public API follows the pipeline::

    import yolo_prune as yp
    model = yp.load("best.pt")                                        # 1. load
    sparse = yp.sparse_train(model, "data.yaml", sr=1e-3, epochs=30)  # 2. sparsity training
    pruned = yp.prune(sparse.best, method="bn", target_macs=0.5)      # 3. rank + remove channels
    tuned = yp.finetune(pruned.checkpoint, "data.yaml", epochs=30)    # 4. fine-tune
    zeroed = yp.sparsify(tuned.best, amount=0.5, data="data.yaml")    #    + zero single weights
    yp.validate(tuned.best, "data.yaml")                              # 5. COCO mAP
    yp.benchmark({"dense": "best.pt", "pruned": tuned.best})          #    latency
    yp.export(tuned.best, format="onnx", save_dir="out")              #    export

or all at once with :func:`pipeline`. Every function returns a typed result that prints as a table. Options are
keywords (every key of ``yolo-prune cfg``) or typed, frozen option objects (``yp.PruneOptions(...)``, ...).
Names are imported lazily, so ``import yolo_prune`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .compat import check_versions

__version__ = "0.1.0"

check_versions()  # an ultralytics or torch-pruning older than the tested minimum: one line with the pip command

# public name -> (module, attribute)
_API = {
    "load": ("yolo_prune.models", "load_model"),
    "save_checkpoint": ("yolo_prune.models", "save_checkpoint"),
    "sparse_train": ("yolo_prune.train", "sparse_train"),
    "prune": ("yolo_prune.stages.prune", "prune"),
    "sparsify": ("yolo_prune.stages.sparsify", "sparsify"),
    "sensitivity": ("yolo_prune.stages.sensitivity", "sensitivity"),
    "finetune": ("yolo_prune.train", "finetune"),
    "validate": ("yolo_prune.evaluate", "evaluate"),
    "benchmark": ("yolo_prune.bench", "measure_latency"),
    "export": ("yolo_prune.deploy", "export_model"),
    "qat_export": ("yolo_prune.stages.qat", "qat_export"),
    "pipeline": ("yolo_prune.job", "pipeline"),
    "model_stats": ("yolo_prune.stats", "model_stats"),
    "make_synthetic": ("yolo_prune.data.synthetic", "make_synthetic"),
    "SparseTrainer": ("yolo_prune.train", "SparseTrainer"),
    "FinetuneTrainer": ("yolo_prune.train", "FinetuneTrainer"),
    # option objects (yolo_prune.options: one per group of keys in `yolo-prune cfg`)
    "PruneOptions": ("yolo_prune.options", "PruneOptions"),
    "LatencyOptions": ("yolo_prune.options", "LatencyOptions"),
    "TrainOptions": ("yolo_prune.options", "TrainOptions"),
    "SparseOptions": ("yolo_prune.options", "SparseOptions"),
    "DistillOptions": ("yolo_prune.options", "DistillOptions"),
    "SparsifyOptions": ("yolo_prune.options", "SparsifyOptions"),
    "StageOptions": ("yolo_prune.options", "StageOptions"),
    "BenchOptions": ("yolo_prune.options", "BenchOptions"),
    "RunOptions": ("yolo_prune.options", "RunOptions"),
    # every result type the API returns
    "PruneResult": ("yolo_prune.stages.prune", "PruneResult"),
    "SparsifyResult": ("yolo_prune.stages.sparsify", "SparsifyResult"),
    "SensitivityResult": ("yolo_prune.stages.sensitivity", "SensitivityResult"),
    "PipelineResult": ("yolo_prune.stages.report", "PipelineResult"),
    "TrainResult": ("yolo_prune.train", "TrainResult"),
    "SparseResult": ("yolo_prune.train.results", "SparseResult"),
    "ValResult": ("yolo_prune.evaluate", "ValResult"),
    "LatencyResult": ("yolo_prune.bench", "LatencyResult"),
    "ModelStats": ("yolo_prune.stats", "ModelStats"),
    "YoloPruneError": ("yolo_prune.errors", "YoloPruneError"),
    "DependencyVersionError": ("yolo_prune.compat", "DependencyVersionError"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'yolo_prune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
