"""``yolo-prune export int8=True qat_epochs=N``: quantization-aware training, then the INT8 export of its result.

When post-training quantization (:mod:`yolo_prune.quantize`) loses too much, :func:`qat_export` fine-tunes the
(pruned) checkpoint for ``qat_epochs`` epochs with NNCF's fake-quantizers (:mod:`yolo_prune.train.qat`, run folder
``<save_dir>/qat``; the input checkpoint is only read), then exports the trained, fake-quantized ``best.pt``
(:func:`yolo_prune.qat.export_qat`): OpenVINO IR with FakeQuantize nodes (INT8 once compiled) or QDQ ONNX, named as
the post-training exports (``<stem>_int8_openvino_model/``, ``<stem>_int8.onnx``) and carrying ultralytics'
metadata (taken from an FP32 export of the same model), so ``yolo-prune val`` reads them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..deploy import check_format, export_model
from ..errors import OutputError, UsageError
from ..forms import as_detection_model
from ..io import atomic_path
from ..options import RunOptions, TrainOptions
from ..qat import copy_metadata, export_qat, is_qat
from ..quantize import check_int8
from ..train.finetune import qat_finetune

__all__ = ["QAT_RECIPE", "check_qat", "qat_export"]

# What the QAT run trains with unless train_args say otherwise: a converged model needs only its quantization noise
# learned. Measured on the bccd pruned yolov8n (1 epoch at 640, OpenVINO export scored by `val` on bccd val):
# ultralytics' defaults (auto optimizer, warmup, mosaic) fell to 0.467 mAP50-95 from PTQ's 0.584; this recipe 0.584.
QAT_RECIPE = {"optimizer": "AdamW", "lr0": 1e-5, "warmup_epochs": 0, "mosaic": 0.0}


def check_qat(qat_epochs: Any, *, int8: Any, fmt: str, data: Any, max_map_drop: float | None = None) -> int:
    """``qat_epochs`` as an int, refused in one line when it cannot run: negative, not an integer, without
    ``int8=True``, with ``max_map_drop`` (accuracy control keeps layers FP32, QAT trains all of them INT8), for a
    format without an INT8 path, or without ``data``."""
    if isinstance(qat_epochs, bool) or not isinstance(qat_epochs, int) or qat_epochs < 0:
        raise UsageError(f"qat_epochs={qat_epochs!r} is out of range: it must be an integer >= 0")
    if qat_epochs and int8 is not True:
        raise UsageError(f"qat_epochs={qat_epochs} needs int8=True (it trains for an INT8 export)")
    if qat_epochs and max_map_drop is not None:
        raise UsageError("give qat_epochs or max_map_drop, not both (QAT trains every layer for INT8; accuracy "
                         "control keeps some in FP32)")
    if qat_epochs:
        check_int8(fmt, data)
    return qat_epochs


def qat_export(model: Any, data: Any, *, format: str = "openvino", qat_epochs: int = 1, imgsz: int = 640,
               save_dir: str | Path, batch: int = 16, workers: int = 2, device: Any = None, seed: int = 0,
               verbose: bool = False, train_args: dict[str, Any] | None = None) -> Path:
    """Train ``model`` (a checkpoint path or in-memory model) ``qat_epochs`` epochs quantization-aware on ``data``,
    then export it to INT8 ``format`` (``openvino`` or ``onnx``) in ``save_dir``; returns the export's path.

    ``train_args``: ultralytics train keys (lr0, optimizer, ...) for the QAT run, over :data:`QAT_RECIPE`; its folder
    is ``save_dir/qat``.
    """
    fmt = check_format(format)
    check_qat(qat_epochs, int8=True, fmt=fmt, data=data)
    if qat_epochs < 1:
        raise UsageError("qat_export needs qat_epochs >= 1")
    save_dir = Path(save_dir).expanduser().absolute()
    train = TrainOptions(epochs=qat_epochs, imgsz=imgsz, batch=batch, workers=workers, device=device, seed=seed)
    run = RunOptions(project=str(save_dir), name="qat", exist_ok=False, verbose=verbose, resume=False)
    result = qat_finetune(model, data, train, run, train_args={**QAT_RECIPE, **(train_args or {})})
    best = result.best or result.last
    if best is None:
        raise OutputError(f"quantization-aware training wrote no checkpoint in {result.save_dir}")
    stem = Path(str(model)).stem if isinstance(model, (str, Path)) else "model"
    return export_trained(best, fmt, save_dir, imgsz=imgsz, stem=stem)


def export_trained(checkpoint: str | Path, fmt: str, save_dir: str | Path, *, imgsz: int, stem: str | None = None
                   ) -> Path:
    """The INT8 export of a QAT checkpoint (its float model carries the quantizers as data) into ``save_dir``, named
    after ``stem`` (default: the checkpoint's): ``<stem>_int8_openvino_model/`` or ``<stem>_int8.onnx``."""
    net = as_detection_model(checkpoint)
    if not is_qat(net):
        raise UsageError(f"{checkpoint} carries no quantizers: it is not from a quantization-aware training")
    save_dir = Path(save_dir)
    stem = stem or Path(checkpoint).stem
    with tempfile.TemporaryDirectory(prefix=".qat-", dir=save_dir) as tmp:
        fp32 = export_model(net, format="onnx", imgsz=imgsz, save_dir=tmp)  # ultralytics' metadata for the export
        out = Path(tmp) / (f"{stem}_int8_openvino_model" if fmt == "openvino" else f"{stem}_int8.onnx")
        export_qat(net, fmt, out, imgsz=imgsz)
        copy_metadata(fp32, out, fmt)
        dest = save_dir / out.name
        if out.is_dir():
            if dest.exists():
                raise OutputError(f"{dest} already exists")
            shutil.move(str(out), str(dest))
        else:
            with atomic_path(dest) as part:
                shutil.move(str(out), str(part))
    return dest
