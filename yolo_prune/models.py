"""Stage 1 of the pipeline: load a model, and write it back as a normal ultralytics checkpoint.

``load_model`` accepts an ultralytics ``.pt`` checkpoint, a model yaml (``yolov8n.yaml``, random init),
an ultralytics ``YOLO`` object or a ``DetectionModel``, and always returns a ``YOLO`` object wrapping a
detection model (with ``tasks=PRUNABLE_TASKS`` also a segmentation, pose or oriented-box model, whose task the
``YOLO`` object keeps). Every way this can go wrong is a :class:`~yolo_prune.errors.ModelLoadError` with a
one-line message (:class:`~yolo_prune.errors.UnsupportedModelError` for a model whose head yolo-prune does not
handle, e.g. YOLOv10's ``v10Detect``, RT-DETR's decoder, YOLOE's or World's heads).
"""

from __future__ import annotations

import copy
import io
import pickle
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compat import version_drift
from .errors import ModelLoadError
from .forms import DETECT, ModelLike, as_detection_model, check_head, check_yaml_head, model_task, task_scope
from .io import atomic_write
from .logs import LOGGER
from .provenance import versions


def _yolo_class():
    from ultralytics import YOLO

    return YOLO


def load_model(source: ModelLike, *, tasks: tuple[str, ...] = DETECT) -> Any:
    """Return an ultralytics ``YOLO`` object for ``source`` (path, yaml, YOLO or DetectionModel) of one of ``tasks``
    (:data:`~yolo_prune.forms.PRUNABLE_TASKS` at most).

    An in-memory ``YOLO`` is returned as it is (not copied); a ``DetectionModel`` is wrapped.
    """
    YOLO = _yolo_class()
    if isinstance(source, YOLO):
        _check_model(source.model, repr(source.model_name or "model"), tasks)
        return source
    if isinstance(source, nn.Module) or _is_wrapper(source):
        net = as_detection_model(source, tasks=tasks)  # DDP / compile / EMA wrappers peeled off
        _check_model(net, type(net).__name__, tasks)
        return wrap_model(net)
    if not isinstance(source, (str, Path)):
        raise ModelLoadError(f"model must be a path, a YOLO object or a DetectionModel, not {type(source).__name__}")

    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        check_yaml_head(source)
        try:
            model = YOLO(str(source))
        except FileNotFoundError:
            raise ModelLoadError(f"model yaml not found: {source}") from None
        except Exception as e:  # ultralytics raises many kinds for a malformed yaml
            raise ModelLoadError(f"cannot build a model from {source}: {_short(e)}") from None
    elif suffix == ".pt":
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {source}")
        model = _load_pt(path)
    else:
        raise ModelLoadError(f"unsupported model file {source}: expected an ultralytics .pt checkpoint or a model .yaml")
    task = model_task(model.model)  # the head's: ultralytics says "detect" when a checkpoint records no task
    _check_model(model.model, str(source), tasks, task=task)
    model.task = model.model.task = model.overrides["task"] = task
    _warn_version_drift(model, path)
    return model


def _warn_version_drift(model: Any, path: Path) -> None:
    """One warning line when the checkpoint records versions that differ from this environment's in a way known
    to matter (:func:`~yolo_prune.compat.version_drift`); checkpoints yolo-prune did not write record none."""
    recorded = ((getattr(model, "ckpt", None) or {}).get("yolo_prune") or {}).get("versions") or {}
    if not recorded:
        return
    notes = version_drift(recorded, versions())
    if notes:
        LOGGER.warning("%s was pruned with %s; prune again here if it misbehaves", path, ", ".join(notes))


def _is_wrapper(source: Any) -> bool:
    """True for an ultralytics ``ModelEMA`` (not an ``nn.Module``, its ``.ema`` is)."""
    return isinstance(getattr(source, "ema", None), nn.Module)


def _load_pt(path: Path) -> Any:
    YOLO = _yolo_class()
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty, not a checkpoint")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path} is not a PyTorch checkpoint (not a torch zip archive; truncated or another format)")
    try:
        return YOLO(str(path))
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, TypeError, KeyError, AttributeError) as e:
        raise ModelLoadError(f"{path} is not a readable ultralytics checkpoint: {_short(e)}") from None
    except ModuleNotFoundError as e:
        raise ModelLoadError(f"{path} needs the Python module {e.name!r}, which is not installed") from None


def _check_model(model: nn.Module, what: str, tasks: tuple[str, ...], *, task: str | None = None) -> None:
    """A ``DetectionModel`` of one of ``tasks`` (``task``: the one the YOLO object says) whose head yolo-prune
    prunes, or a one-line :class:`ModelLoadError` / :class:`UnsupportedModelError` before any work."""
    from ultralytics.nn.tasks import DetectionModel

    if not isinstance(model, DetectionModel):
        raise ModelLoadError(f"{what} is a {task + ' model' if task else type(model).__name__}, not an ultralytics "
                             "DetectionModel; yolo-prune prunes detection models")
    task = task or model_task(model)
    if task not in tasks:
        raise ModelLoadError(f"{what} is a {task} model; {task_scope(tasks)}")
    check_head(model, what)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


def wrap_model(model: nn.Module) -> Any:
    """Wrap an in-memory ``DetectionModel`` (or a segmentation, pose or OBB model: its task is kept) in an
    ultralytics ``YOLO`` object (no file is written)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    YOLO = _yolo_class()
    yolo = YOLO.__new__(YOLO)
    nn.Module.__init__(yolo)
    from ultralytics.utils import callbacks

    yolo.callbacks = callbacks.get_default_callbacks()
    yolo.predictor = yolo.trainer = yolo.metrics = None
    yolo.ckpt, yolo.cfg, yolo.ckpt_path, yolo.model_name = {}, None, None, None
    task = model_task(model)
    yolo.model = model
    yolo.task = task
    model.task = task
    if not isinstance(getattr(model, "args", None), dict):
        model.args = dict(DEFAULT_CFG_DICT)
    yolo.overrides = {"task": task}
    del yolo.training
    return yolo


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    train_args: dict | None = None,
    metrics: dict | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write ``model`` as an ultralytics checkpoint (fp16, like ultralytics' own), atomically.

    The result loads with ``YOLO(path)``; ``provenance`` is stored under the ``yolo_prune`` key.
    """
    from ultralytics import __version__

    m = copy.deepcopy(model).half()
    if hasattr(m, "criterion"):
        m.criterion = None
    for p in m.parameters():
        p.requires_grad_(False)
    args = dict(train_args if train_args is not None else getattr(model, "args", {}) or {})
    args["task"] = m.task = model_task(model)  # what YOLO(path) reads back
    ckpt = {
        "date": datetime.now(timezone.utc).isoformat(),
        "version": __version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,
        "best_fitness": None,
        "model": m,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()},
        "train_metrics": metrics or {},
        "train_results": {},
        "yolo_prune": provenance or {},
    }
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return atomic_write(path, lambda p: p.write_bytes(buffer.getvalue()))


def save_input_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Save an in-memory model as an ultralytics-loadable checkpoint to train from (float32, so nothing is lost).

    Unlike :func:`save_checkpoint` (fp16, a finished model with provenance) this is the minimal checkpoint a
    trainer loads as its input: the model, its args as ``train_args`` and the date.
    """
    m = copy.deepcopy(model).cpu().float()
    if hasattr(m, "criterion"):
        m.criterion = None
    for p in m.parameters():
        p.requires_grad_(False)
    args = getattr(model, "args", None)
    args = dict(args) if isinstance(args, dict) else dict(vars(args)) if args is not None else {}
    args["task"] = m.task = model_task(model)  # what YOLO(path) reads back
    ckpt = {"model": m, "train_args": args, "date": datetime.now().astimezone().isoformat()}
    return atomic_write(path, lambda p: torch.save(ckpt, p))


def read_provenance(path: str | Path) -> dict:
    """The ``yolo_prune`` provenance dict stored in a checkpoint written by :func:`save_checkpoint`."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return dict(ckpt.get("yolo_prune") or {})


def pickled_modules(path: str | Path) -> set[str]:
    """Every Python module whose classes or functions the checkpoint's pickle names: a checkpoint that names no
    ``yolo_prune`` module loads with ultralytics alone (``portable=True``)."""
    import types

    found: set[str] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found.add(module)
            return super().find_class(module, name)

    torch.load(path, map_location="cpu", weights_only=False,
               pickle_module=types.SimpleNamespace(Unpickler=Recorder, load=pickle.load, __name__="pickle"))
    return found


def reset_class_head(model: nn.Module, nc: int, names: dict[int, str] | list[str] | None = None) -> int:
    """Give a detection model a new class count, in place, keeping everything but Detect's final class convs.

    Only ``cv3[i][-1]`` (and ``one2one_cv3[i][-1]``) are replaced: ``nn.Conv2d(width, nc, 1)`` with the width
    the model has (pruned or not). Classes whose name matches one of the model's current class names
    (case-insensitive) keep their rows; the others start as ultralytics initialises a class head (default
    weights, bias log(5 / nc / (640 / stride)^2)). ``model.nc``, ``model.names`` (when ``names`` is given), the
    head's ``nc`` / ``no`` and ``model.yaml["nc"]`` follow. Returns the number of class rows carried over.
    """
    import math

    head = model.model[-1]
    if not hasattr(head, "cv3") or not hasattr(head, "reg_max"):
        raise ModelLoadError(f"cannot change the classes of a {type(head).__name__} head")
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    old_names = getattr(model, "names", None)
    match: dict[int, int] = {}
    if isinstance(old_names, dict) and isinstance(names, dict):
        lookup = {str(v).strip().lower(): int(k) for k, v in old_names.items()}
        match = {k: lookup[str(v).strip().lower()] for k, v in names.items() if str(v).strip().lower() in lookup}
        if any(str(k) == str(v) for k, v in old_names.items()):
            match = {}  # placeholder names {0: "0", ...} say nothing about the classes
    stride = getattr(head, "stride", None)
    for attr in ("cv3", "one2one_cv3"):
        branches = getattr(head, attr, None)
        if branches is None:
            continue
        for i, branch in enumerate(branches):
            old = branch[-1]
            new = nn.Conv2d(old.in_channels, nc, 1).to(old.weight.device, old.weight.dtype)
            with torch.no_grad():
                s = float(stride[i]) if stride is not None and len(stride) > i and float(stride[i]) > 0 else 8.0 * 2**i
                new.bias.fill_(math.log(5 / nc / (640 / s) ** 2))
                for dst, src in match.items():
                    new.weight[dst] = old.weight[src]
                    new.bias[dst] = old.bias[src]
            new.weight.requires_grad_(old.weight.requires_grad)
            new.bias.requires_grad_(old.weight.requires_grad)
            branch[-1] = new
    head.nc = nc
    head.no = nc + head.reg_max * 4
    model.nc = nc
    if names is not None:
        model.names = dict(names)
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml["nc"] = nc
    return len(match)
