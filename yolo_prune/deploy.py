"""Export a (pruned) model with the ultralytics exporter into a run folder.

ultralytics' ``YOLO(...).export`` writes its output next to the source checkpoint (or into the
current directory for a yaml-built model). To keep the user's folders clean and to accept in-memory
models, :func:`export_model` always saves the model as a temporary FP32 checkpoint in a hidden
folder inside ``save_dir``, exports ``YOLO(that checkpoint)`` and moves the result into ``save_dir``.

:func:`export_onnx` is the single ONNX path used by both ``mode=export`` and the onnxruntime latency
benchmark (:mod:`yolo_prune.bench`), so the graph that is timed is the graph that is shipped.

Detection, segmentation, pose and OBB models export alike (the task travels in the checkpoint).
``int8=True`` (formats ``openvino`` and ``onnx``; detection models only) quantizes that FP32 export after the fact, calibrated on images of
``data``'s train split, Detect's decode kept in float (:mod:`yolo_prune.quantize`).
"""

from __future__ import annotations

import copy
import difflib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import OutputError, UsageError
from .forms import PRUNABLE_TASKS, ModelLike, as_detection_model, model_task
from .io import atomic_path
from .logs import quiet_ultralytics
from .quantize import calibration_images, check_int8, quantize_export
from .quantize_control import check_control, quantize_export_controlled
from .runtimes import require_openvino


def export_formats() -> list[str]:
    """Format names accepted by ``format=`` (those of the installed ultralytics exporter)."""
    from ultralytics.engine.exporter import export_formats as table

    return [f for f in table()["Argument"] if f != "-"]


def _format_args(fmt: str) -> set[str]:
    """The format-specific export arguments ultralytics accepts for ``fmt`` (e.g. simplify, opset)."""
    from ultralytics.engine.exporter import export_formats as table

    t = table()
    return set(dict(zip(t["Argument"], t["Arguments"])).get(fmt) or ())


def check_format(format: str) -> str:
    """Return ``format`` lower-cased if ultralytics can export to it, else raise :class:`UsageError`.

    ultralytics itself silently replaces an unknown format by the closest match; yolo-prune refuses it.
    """
    fmt = str(format).strip().lower()
    valid = export_formats()
    if fmt in valid:
        return fmt
    close = difflib.get_close_matches(fmt, valid, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UsageError(f"unknown export format '{format}'{hint}; valid formats: {', '.join(valid)}")


def _model_stem(model: ModelLike, module: nn.Module) -> str:
    """Base name of the exported file: the source checkpoint's stem, else ``model``."""
    for source in (
        model if isinstance(model, (str, Path)) else None,
        getattr(model, "ckpt_path", None),
        getattr(module, "pt_path", None),
    ):
        if source and not str(source).lower().endswith((".yaml", ".yml")):
            return Path(str(source)).stem
    return "model"


def _save_checkpoint(module: nn.Module, path: Path) -> None:
    """Save ``module`` as a minimal ultralytics checkpoint (FP32 so the export matches torch exactly)."""
    ckpt: dict[str, Any] = {"model": copy.deepcopy(module).float().eval()}
    if isinstance(getattr(module, "args", None), dict):
        ckpt["train_args"] = dict(module.args)  # ultralytics re-attaches these as model.args on load
    torch.save(ckpt, path)


def _one_line(e: BaseException) -> str:
    text = str(e).replace("ERROR ❌️", "").replace("ERROR ❌", "").strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _move_output(src: Path, save_dir: Path) -> Path:
    """Move an exported file (atomically) or folder into ``save_dir``; return its new path."""
    dest = save_dir / src.name
    if src.is_dir():
        if dest.exists():
            raise OutputError(f"{dest} already exists")
        shutil.move(str(src), str(dest))
        return dest
    with atomic_path(dest) as tmp:
        shutil.move(str(src), str(tmp))
    return dest


def _export_args(fmt: str, imgsz: int, half: bool, simplify: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arguments for ``YOLO.export``: ``simplify`` only where the format has it, ``half`` as quantize=16."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    unknown = sorted(k for k in kwargs if k not in DEFAULT_CFG_DICT and k not in {"half", "int8"})
    if unknown:
        raise UsageError(f"unknown export argument(s): {', '.join(unknown)}")
    args: dict[str, Any] = {"format": fmt, "imgsz": imgsz, "device": "cpu", **kwargs}
    if "simplify" in _format_args(fmt):
        args.setdefault("simplify", simplify)
    if half:
        args.setdefault("quantize", 16)
    return args


def export_model(
    model: ModelLike,
    *,
    format: str = "onnx",
    imgsz: int = 640,
    save_dir: str | Path,
    half: bool = False,
    simplify: bool = True,
    int8: bool = False,
    data: Any = None,
    calib_images: int = 64,
    seed: int = 0,
    max_map_drop: float | None = None,
    verbose: bool = False,
    **kwargs: Any,
) -> Path:
    """Export ``model`` (path, ``YOLO`` or ``DetectionModel``) with ultralytics; return the file in ``save_dir``.

    ``format`` is any ultralytics export format (an unknown one raises :class:`UsageError`); ``half``
    requests FP16 (ultralytics ``quantize=16``); ``simplify`` runs onnxslim on ONNX-based formats;
    other ``kwargs`` (``opset``, ``dynamic``, ``batch``, ``nms``...) go to the ultralytics exporter.
    ``int8=True`` (or ultralytics' ``quantize=8``), for ``openvino`` and ``onnx``: post-training INT8 quantization
    of the FP32 export (:mod:`yolo_prune.quantize`) on ``calib_images`` images of ``data``'s train split drawn with
    ``seed`` (or ultralytics' ``fraction`` of it); writes ``<stem>_int8_openvino_model/`` or ``<stem>_int8.onnx``.
    ``max_map_drop`` (with ``int8=True``, format ``openvino``): NNCF's accuracy-controlled quantization keeps layers
    in FP32 until the mAP50-95 on ``calib_images`` val images is at most that much (absolute) below the FP32 model's
    (:mod:`yolo_prune.quantize_control`); the folder gets ``int8_report.json`` (mAPs, layers kept in FP32).
    The model is never modified. ultralytics' log lines are shown only with ``verbose=True``.
    """
    fmt = check_format(format)
    if str(kwargs.get("quantize", "")).lower() in ("8", "int8"):
        int8 = bool(kwargs.pop("quantize"))
    fraction = kwargs.pop("fraction", None) if int8 else None
    module = as_detection_model(model, tasks=PRUNABLE_TASKS)
    if int8 and model_task(module) != "detect":
        raise UsageError(f"int8=True exports detection models only; this is a {model_task(module)} model "
                         "(export it without int8)")
    check_control(fmt, max_map_drop, int8=int8)
    if int8:
        check_int8(fmt, data, half=half)
    elif fmt == "openvino":  # ultralytics would try to pip-install it (and fail offline) with a long traceback
        require_openvino()
    args = _export_args(fmt, imgsz, half, simplify, kwargs)
    images = calibration_images(data, n=calib_images, imgsz=imgsz, seed=seed, fraction=fraction) if int8 else None
    save_dir = Path(save_dir).expanduser().absolute()  # the exporter writes beside its (absolute) checkpoint
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        tmp_root = tempfile.TemporaryDirectory(prefix=".export-", dir=save_dir)
    except OSError as e:
        raise OutputError(f"cannot write to {save_dir}: {e.strerror or e}") from None
    with tmp_root as tmp:
        out = _ultralytics_export(module, Path(tmp) / f"{_model_stem(model, module)}.pt", args, verbose)
        head = len(module.model) - 1
        if images is not None and max_map_drop is not None:
            out = quantize_export_controlled(out, images, data=data, head=head, max_map_drop=max_map_drop,
                                             val_images=calib_images, verbose=verbose)
        elif images is not None:
            out = quantize_export(out, fmt, images, head=head, verbose=verbose)
        return _move_output(out, save_dir)


def _ultralytics_export(module: nn.Module, ckpt: Path, args: dict[str, Any], verbose: bool) -> Path:
    """Save ``module`` as the FP32 checkpoint ``ckpt`` and export it with ``YOLO(ckpt).export(**args)``."""
    from ultralytics import YOLO

    _save_checkpoint(module, ckpt)
    with quiet_ultralytics(verbose):
        try:
            out = YOLO(ckpt).export(**args)
        except (AssertionError, SyntaxError) as e:  # ultralytics' argument checks
            raise UsageError(f"export format={args['format']}: {_one_line(e)}") from None
    if not out or not Path(out).exists():
        raise OutputError(f"ultralytics export to {args['format']} produced no output")
    return Path(out)


def export_onnx(model: ModelLike, save_dir: str | Path, *, imgsz: int = 640, batch: int = 1) -> Path:
    """Export ``model`` to a static-shape FP32 ONNX file (onnxslim-simplified), quietly.

    Outputs equal the fused torch model's eval output ``model(x)[0]`` (``1 x (4 + nc) x anchors``; a segmentation
    model adds its mask coefficients to those rows and a second output, the prototypes).
    """
    return export_model(model, format="onnx", imgsz=imgsz, save_dir=save_dir, batch=batch, simplify=True)
