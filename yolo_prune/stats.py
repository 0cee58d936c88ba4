"""Model cost: parameters, multiply-accumulates (MACs) and checkpoint size.

All functions accept what :func:`yolo_prune.forms.as_detection_model` accepts (a ``DetectionModel``, an
ultralytics ``YOLO`` object, a ``.pt`` checkpoint or model ``.yaml`` path), of every task yolo-prune prunes
(detection, segmentation, pose, oriented boxes), and never modify the model they are given.

MACs are counted with ultralytics-thop on a fused (Conv+BatchNorm folded) copy of the model in eval
mode, with one ``1 x 3 x imgsz x imgsz`` input. That counts exactly the multiply-accumulates of the
convolution and linear layers, the same quantity ultralytics reports (``GFLOPs = 2 * GMACs``,
8.7 GFLOPs = 4.37 GMACs for yolov8n at 640) and the same number whether or not the model was fused
before. A segmentation model's ``Proto`` counts at its resolution (its transposed conv per input pixel), and
what ``fuse()`` drops for inference (YOLO26's unused head branch, Pose26's sigma convs and flow model, Proto26's
semantic branch) is not counted. Element-wise work (activations, BatchNorm, upsampling, pooling, concatenation) is not counted.
"""

from __future__ import annotations

import copy
import dataclasses
import io

import torch
from torch import nn

from .forms import PRUNABLE_TASKS, ModelLike, as_detection_model
from .results import Result


def input_channels(module: nn.Module) -> int:
    """Number of image channels the model expects (ultralytics stores it in ``model.yaml``)."""
    yaml = getattr(module, "yaml", None)
    return int(yaml.get("channels", yaml.get("ch", 3))) if isinstance(yaml, dict) else 3


def model_device(module: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def inference_copy(model: ModelLike) -> nn.Module:
    """A deep copy of ``model`` as ultralytics runs it for inference: FP32, eval mode, Conv+BN fused."""
    module = copy.deepcopy(as_detection_model(model, tasks=PRUNABLE_TASKS)).float().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if hasattr(module, "fuse"):
        module = module.fuse(verbose=False) if _fuse_takes_verbose(module) else module.fuse()
    return module.eval()


def _fuse_takes_verbose(module: nn.Module) -> bool:
    """True if ``module.fuse`` accepts ``verbose=`` (ultralytics BaseModel does)."""
    import inspect

    try:
        return "verbose" in inspect.signature(module.fuse).parameters
    except (TypeError, ValueError):
        return False


def count_macs(model: ModelLike, *, imgsz: int = 640) -> int:
    """Multiply-accumulates of one forward pass at batch 1 and a square ``imgsz`` input.

    Counted with ultralytics-thop on a fused eval-mode deep copy (see the module docstring);
    ``model`` itself is untouched.
    """
    import thop

    module = inference_copy(model)
    x = torch.zeros(1, input_channels(module), imgsz, imgsz, device=model_device(module))
    with torch.no_grad():
        macs, _ = thop.profile(module, inputs=(x,), verbose=False)
    return int(macs)


def count_params(model: ModelLike) -> int:
    """Number of parameters of the model as given (unfused: BatchNorm weights included, like ultralytics)."""
    return sum(p.numel() for p in as_detection_model(model, tasks=PRUNABLE_TASKS).parameters())


def checkpoint_size_mb(model: ModelLike) -> float:
    """Size in MB (1e6 bytes) of ``{"model": model.half()}`` saved with ``torch.save``, computed in memory.

    This mirrors an ultralytics checkpoint without optimizer or training state, so sizes before and
    after pruning compare like for like.
    """
    half = copy.deepcopy(as_detection_model(model, tasks=PRUNABLE_TASKS)).half()
    buffer = io.BytesIO()
    torch.save({"model": half}, buffer)
    return buffer.getbuffer().nbytes / 1e6


@dataclasses.dataclass
class ModelStats(Result):
    """Cost of one model: parameters, MACs at ``imgsz`` and fp16 checkpoint size."""

    params: int
    macs: int
    gmacs: float
    size_mb: float
    imgsz: int


def model_stats(model: ModelLike, *, imgsz: int = 640) -> ModelStats:
    """Parameters, MACs (one batch-1 forward at ``imgsz``) and fp16 checkpoint size of ``model``."""
    module = as_detection_model(model, tasks=PRUNABLE_TASKS)
    macs = count_macs(module, imgsz=imgsz)
    return ModelStats(
        params=count_params(module),
        macs=macs,
        gmacs=macs / 1e9,
        size_mb=checkpoint_size_mb(module),
        imgsz=imgsz,
    )
