"""The forms a detection model comes in, the one way to get the ``DetectionModel`` behind any of them, and the heads
(so the tasks) yolo-prune handles.

A model reaches yolo-prune as a ``.pt`` checkpoint path, a model yaml (random init), an ultralytics ``YOLO``
object, a ``DetectionModel``, or a ``DetectionModel`` wrapped for training (DDP / ``DataParallel``,
``torch.compile``, ultralytics' ``ModelEMA``). :func:`as_detection_model` returns the ``DetectionModel``
``nn.Module`` behind every one of them - the object itself, never a copy, for in-memory input - and raises
:class:`~yolo_prune.errors.ModelLoadError` with a one-line message for anything else.

Segmentation, pose and oriented-box models are ``DetectionModel`` subclasses whose head is Detect plus one branch;
:data:`PRUNABLE_TASKS` are the tasks whose models ``prune`` takes, :func:`supported_heads` the exact head classes of
each (those the installed ultralytics has), :func:`check_head` refuses any other head by name (YOLOE, World,
RT-DETR, YOLOv10, ...). Stages that do not handle a task yet call :func:`as_detection_model` with the default
``tasks=("detect",)``.

Core layer: imports ultralytics and :mod:`yolo_prune.errors`, nothing of yolo_prune above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .errors import ModelLoadError, UnsupportedModelError

__all__ = ["DETECT", "PRUNABLE_TASKS", "ModelLike", "as_detection_model", "check_head", "check_yaml_head",
           "model_task", "supported_heads", "task_scope"]

ModelLike = Any  # str | Path | ultralytics YOLO | DetectionModel (possibly wrapped)

_YAML = (".yaml", ".yml")
_MAX_WRAPPERS = 8  # DDP(compile(model)) and the like; more nesting than this is not a model

DETECT = ("detect",)
#: The tasks whose models ``prune`` takes.
PRUNABLE_TASKS = ("detect", "segment", "pose", "obb")
# The head classes (exact types, by name in ultralytics.nn.modules.head) of each task: a subclass may compute
# something else (YOLOE's and World's heads derive from Detect and Segment).
_HEADS = {"detect": ("Detect",), "segment": ("Segment", "Segment26"), "pose": ("Pose", "Pose26"),
          "obb": ("OBB", "OBB26")}


def supported_heads() -> dict[type, str]:
    """Every head class yolo-prune prunes (those the installed ultralytics defines), with its task."""
    from ultralytics.nn.modules import head

    return {getattr(head, name): task for task, names in _HEADS.items() for name in names if hasattr(head, name)}


def check_head(net: nn.Module, what: str) -> str:
    """The task of ``net`` (a ``DetectionModel``) from its head; :class:`UnsupportedModelError` naming the head when
    yolo-prune does not prune it."""
    task = supported_heads().get(type(net.model[-1]))
    if task is None:
        raise UnsupportedModelError(_unsupported(what, type(net.model[-1]).__name__))
    return task


def check_yaml_head(path: str | Path) -> None:
    """Refuse a model yaml whose head (its last layer's module) yolo-prune does not prune, by name, before anything
    is built (ultralytics' ``YOLO`` cannot even build some, e.g. RT-DETR's). An unreadable yaml passes: building
    it says what is wrong."""
    from ultralytics.nn.tasks import yaml_model_load

    try:
        name = str(yaml_model_load(str(path))["head"][-1][2]).split(".")[-1]
    except Exception:  # missing or malformed: the build that follows raises the right error
        return
    if name not in {n for names in _HEADS.values() for n in names}:
        raise UnsupportedModelError(_unsupported(str(path), name))


def _unsupported(what: str, head: str) -> str:
    names = ", ".join(n for names in _HEADS.values() for n in names)
    return f"{what} ends in {head}; yolo-prune supports the {names} heads of YOLOv8, YOLO11 and YOLO26 models"


def model_task(net: nn.Module) -> str:
    """The task of an ultralytics model: the one of its head when yolo-prune prunes that head, else its ``task``
    attribute, else what ultralytics guesses. (ultralytics guesses ``detect`` for a checkpoint whose ``train_args``
    record no task, whatever its head.)"""
    from ultralytics.nn.tasks import guess_model_task

    layers = getattr(net, "model", None)
    if isinstance(layers, nn.Sequential) and len(layers):
        task = supported_heads().get(type(layers[-1]))
        if task is not None:
            return task
    return getattr(net, "task", None) or guess_model_task(net)


def as_detection_model(model: ModelLike, *, what: str = "model", tasks: tuple[str, ...] = DETECT) -> nn.Module:
    """The ultralytics ``DetectionModel`` behind ``model``.

    Args:
        model: a ``.pt`` checkpoint path (loaded FP32, eval mode, as ultralytics' ``load_checkpoint`` does; the
            EMA when the checkpoint holds one), a model yaml (built with random init), an ultralytics ``YOLO``
            object (its ``.model``), a ``DetectionModel``, or one wrapped in DDP / ``DataParallel``,
            ``torch.compile`` or an ultralytics ``ModelEMA``. In-memory models are returned as they are (no copy).
        what: how the messages name the model (e.g. ``"teacher"``).
        tasks: the tasks accepted (:data:`PRUNABLE_TASKS` at most: segmentation, pose and oriented-box models are
            ``DetectionModel`` subclasses).

    Raises:
        ModelLoadError: a missing or unreadable file, an object that is not a model, or a model that is not an
            ultralytics detection model of one of ``tasks`` (classification... or a plain ``nn.Module``).
    """
    net = _load(Path(model), what) if isinstance(model, (str, Path)) else _unwrap(model, what)
    _check_detection(net, model, what, tasks)
    return net


def _load(path: Path, what: str) -> nn.Module:
    """Build a yaml (random init) or load a checkpoint; every failure is a :class:`ModelLoadError`."""
    if path.suffix.lower() not in _YAML and not path.is_file():  # checked first: ultralytics would download names
        raise ModelLoadError(f"{what} file not found: {path}")
    try:
        if path.suffix.lower() in _YAML:
            check_yaml_head(path)
            return _build(path)
        from ultralytics.nn.tasks import load_checkpoint

        return load_checkpoint(path)[0]
    except ModuleNotFoundError as e:
        raise ModelLoadError(f"{what} {path} needs the Python module {e.name!r}, which is not installed") from None
    except FileNotFoundError:
        raise ModelLoadError(f"{what} file not found: {path}") from None
    except Exception as e:  # corrupt file, foreign pickle, bad yaml: ultralytics and torch raise many kinds
        raise ModelLoadError(f"cannot load {what} {path}: {_reason(e)}") from None


def _build(path: Path) -> nn.Module:
    """A model yaml built with random init, in the model class of its task (``DetectionModel`` for other tasks)."""
    from ultralytics.nn import tasks as ut

    classes = {"segment": ut.SegmentationModel, "pose": ut.PoseModel, "obb": ut.OBBModel}
    task = ut.guess_model_task(ut.yaml_model_load(str(path)))
    return classes.get(task, ut.DetectionModel)(str(path), verbose=False)


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


def _check_detection(net: Any, given: Any, what: str, tasks: tuple[str, ...]) -> None:
    from ultralytics.nn.tasks import DetectionModel

    if not isinstance(net, nn.Module):
        raise ModelLoadError(f"expected a .pt path, a model yaml, an ultralytics YOLO object or a DetectionModel "
                             f"as the {what}, got {type(given).__name__}")
    if not isinstance(net, DetectionModel):
        raise ModelLoadError(f"{_describe(given, net, what)}, not an ultralytics detection model")
    task = model_task(net)
    if task not in tasks:
        raise ModelLoadError(f"{_describe(given, net, what)} for the {task} task; {task_scope(tasks)}")


def task_scope(tasks: tuple[str, ...]) -> str:
    """What a step that takes models of ``tasks`` says to a model of another task."""
    if tuple(tasks) == DETECT:
        return ("this step takes detection models only (prune with validate or latency targets, sensitivity, sparse, "
                "finetune, val, pipeline, bench and export also take segmentation, pose and OBB models)")
    return "yolo-prune prunes detection, segmentation, pose and OBB models"


def _describe(given: Any, net: nn.Module, what: str) -> str:
    """``"model x.pt holds a SegmentationModel"`` or ``"the model is a SegmentationModel"``."""
    kind = type(net).__name__
    return f"{what} {given} holds a {kind}" if isinstance(given, (str, Path)) else f"the {what} is a {kind}"


def _reason(e: BaseException) -> str:
    """The first line of an exception's message (ultralytics' emoji prefixes dropped), at most 200 characters."""
    text = str(e).replace("ERROR ❌️", "").replace("ERROR ❌", "").strip()
    return (text.splitlines()[0].strip() if text else type(e).__name__)[:200]
