"""Model cost: parameters, multiply-accumulates (MACs) and checkpoint size.

All functions accept an ultralytics ``DetectionModel`` (any ``nn.Module``), an ultralytics ``YOLO``
object (its ``.model`` is used) or a path (``.pt`` checkpoint or model ``.yaml``), and never modify
the model they are given.

MACs are counted with ultralytics-thop on a fused (Conv+BatchNorm folded) copy of the model in eval
mode, with one ``1 x 3 x imgsz x imgsz`` input. That counts exactly the multiply-accumulates of the
convolution and linear layers, the same quantity ultralytics reports (``GFLOPs = 2 * GMACs``,
8.7 GFLOPs = 4.37 GMACs for yolov8n at 640) and the same number whether or not the model was fused
before. Element-wise work (activations, BatchNorm, upsampling, pooling, concatenation) is not counted.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError
from .results import Result

ModelLike = Any  # nn.Module | ultralytics YOLO | str | Path


def as_module(model: ModelLike) -> nn.Module:
    """Return the ``nn.Module`` behind ``model``: itself, a ``YOLO`` object's ``.model``, or a loaded path."""
    from ultralytics.engine.model import Model

    if isinstance(model, Model):  # YOLO(...) wrapper (itself an nn.Module): use the network inside
        if not isinstance(model.model, nn.Module):
            raise ModelLoadError(f"{type(model).__name__} object holds no PyTorch model ({model.model!r})")
        return model.model
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, (str, Path)):
        return load_module(model)
    raise ModelLoadError(f"expected a DetectionModel, a YOLO object or a model path, got {type(model).__name__}")


def load_module(path: str | Path) -> nn.Module:
    """Load a model from a ``.pt`` checkpoint (FP32, eval) or build a random-init one from a ``.yaml``."""
    path = str(path)
    try:
        if path.lower().endswith((".yaml", ".yml")):
            from ultralytics.nn.tasks import DetectionModel

            return DetectionModel(path, verbose=False)
        if not Path(path).is_file():
            raise ModelLoadError(f"model file not found: {path}")
        from ultralytics.nn.tasks import load_checkpoint

        return load_checkpoint(path)[0]
    except ModelLoadError:
        raise
    except Exception as e:  # corrupt file, foreign pickle, bad yaml...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model {path}: {reason}") from e


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
    module = copy.deepcopy(as_module(model)).float().eval()
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
    return sum(p.numel() for p in as_module(model).parameters())


def checkpoint_size_mb(model: ModelLike) -> float:
    """Size in MB (1e6 bytes) of ``{"model": model.half()}`` saved with ``torch.save``, computed in memory.

    This mirrors an ultralytics checkpoint without optimizer or training state, so sizes before and
    after pruning compare like for like.
    """
    half = copy.deepcopy(as_module(model)).half()
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
    module = as_module(model)
    macs = count_macs(module, imgsz=imgsz)
    return ModelStats(
        params=count_params(module),
        macs=macs,
        gmacs=macs / 1e9,
        size_mb=checkpoint_size_mb(module),
        imgsz=imgsz,
    )
