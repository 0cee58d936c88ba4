"""The forms a detection model comes in, and the one way to get the ``DetectionModel`` behind any of them.

A model reaches yolo-prune as a ``.pt`` checkpoint path, a model yaml (random init), an ultralytics ``YOLO``
object, a ``DetectionModel``, or a ``DetectionModel`` wrapped for training (DDP / ``DataParallel``,
``torch.compile``, ultralytics' ``ModelEMA``). :func:`as_detection_model` returns the ``DetectionModel``
``nn.Module`` behind every one of them - the object itself, never a copy, for in-memory input - and raises
:class:`~yolo_prune.errors.ModelLoadError` with a one-line message for anything else.

Core layer: imports ultralytics and :mod:`yolo_prune.errors`, nothing of yolo_prune above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .errors import ModelLoadError

__all__ = ["ModelLike", "as_detection_model"]

ModelLike = Any  # str | Path | ultralytics YOLO | DetectionModel (possibly wrapped)

_YAML = (".yaml", ".yml")
_MAX_WRAPPERS = 8  # DDP(compile(model)) and the like; more nesting than this is not a model


def as_detection_model(model: ModelLike, *, what: str = "model") -> nn.Module:
    """The ultralytics ``DetectionModel`` behind ``model``.

    Args:
        model: a ``.pt`` checkpoint path (loaded FP32, eval mode, as ultralytics' ``load_checkpoint`` does; the
            EMA when the checkpoint holds one), a model yaml (built with random init), an ultralytics ``YOLO``
            object (its ``.model``), a ``DetectionModel``, or one wrapped in DDP / ``DataParallel``,
            ``torch.compile`` or an ultralytics ``ModelEMA``. In-memory models are returned as they are (no copy).
        what: how the messages name the model (e.g. ``"teacher"``).

    Raises:
        ModelLoadError: a missing or unreadable file, an object that is not a model, or a model that is not an
            ultralytics detection model (segmentation, pose, classification... or a plain ``nn.Module``).
    """
    net = _load(Path(model), what) if isinstance(model, (str, Path)) else _unwrap(model, what)
    _check_detection(net, model, what)
    return net


def _load(path: Path, what: str) -> nn.Module:
    """Build a yaml (random init) or load a checkpoint; every failure is a :class:`ModelLoadError`."""
    if path.suffix.lower() not in _YAML and not path.is_file():  # checked first: ultralytics would download names
        raise ModelLoadError(f"{what} file not found: {path}")
    try:
        if path.suffix.lower() in _YAML:
            from ultralytics.nn.tasks import DetectionModel

            return DetectionModel(str(path), verbose=False)
        from ultralytics.nn.tasks import load_checkpoint

        return load_checkpoint(path)[0]
    except ModuleNotFoundError as e:
        raise ModelLoadError(f"{what} {path} needs the Python module {e.name!r}, which is not installed") from None
    except FileNotFoundError:
        raise ModelLoadError(f"{what} file not found: {path}") from None
    except Exception as e:  # corrupt file, foreign pickle, bad yaml: ultralytics and torch raise many kinds
        raise ModelLoadError(f"cannot load {what} {path}: {_reason(e)}") from None


def _unwrap(obj: Any, what: str) -> Any:
    """Peel ``YOLO`` objects, DDP / ``DataParallel``, ``torch.compile`` and ``ModelEMA`` off ``obj``."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    from ultralytics.engine.model import Model

    for _ in range(_MAX_WRAPPERS):
        if isinstance(obj, Model):  # a YOLO object is an nn.Module too: the network is its .model
            if not isinstance(obj.model, nn.Module):
                raise ModelLoadError(f"{what}: the {type(obj).__name__} object holds no PyTorch model "
                                     f"({obj.model!r})")
            obj = obj.model
        elif isinstance(obj, (DataParallel, DistributedDataParallel)):
            obj = obj.module
        elif isinstance(obj, nn.Module) and isinstance(getattr(obj, "_orig_mod", None), nn.Module):
            obj = obj._orig_mod  # torch.compile
        elif not isinstance(obj, nn.Module) and isinstance(getattr(obj, "ema", None), nn.Module):
            obj = obj.ema  # ultralytics ModelEMA
        else:
            break
    return obj


def _check_detection(net: Any, given: Any, what: str) -> None:
    from ultralytics.nn.tasks import DetectionModel, guess_model_task

    if not isinstance(net, nn.Module):
        raise ModelLoadError(f"expected a .pt path, a model yaml, an ultralytics YOLO object or a DetectionModel "
                             f"as the {what}, got {type(given).__name__}")
    if not isinstance(net, DetectionModel):
        raise ModelLoadError(f"{_describe(given, net, what)}, not an ultralytics detection model")
    task = getattr(net, "task", None) or guess_model_task(net)
    if task != "detect":
        raise ModelLoadError(f"{_describe(given, net, what)} for the {task} task; yolo-prune prunes detection models")


def _describe(given: Any, net: nn.Module, what: str) -> str:
    """``"model x.pt holds a SegmentationModel"`` or ``"the model is a SegmentationModel"``."""
    kind = type(net).__name__
    return f"{what} {given} holds a {kind}" if isinstance(given, (str, Path)) else f"the {what} is a {kind}"


def _reason(e: BaseException) -> str:
    """The first line of an exception's message (ultralytics' emoji prefixes dropped), at most 200 characters."""
    text = str(e).replace("ERROR ❌️", "").replace("ERROR ❌", "").strip()
    return (text.splitlines()[0].strip() if text else type(e).__name__)[:200]
