"""INT8 post-training quantization of an exported FP32 model: OpenVINO through NNCF, ONNX through onnxruntime.

:func:`yolo_prune.deploy.export_model` exports the FP32 model with ultralytics first, then hands it here with
calibration images (:func:`calibration_images`: a seeded sample of the data's *train* split, letterboxed as
ultralytics validates, from yolo-prune's :class:`~yolo_prune.data.DataSpec`, so COCO-json datasets work too).

Both paths keep Detect's decode tail in floating point, as ultralytics' own OpenVINO INT8 export does: every operation
of the Detect module that is not inside one of its conv branches (the reshapes and concats of the branch outputs,
the DFL softmax and its arange conv, the class sigmoid, the anchor/stride box arithmetic and the final concat). One
INT8 scale spanning box pixels (0..imgsz) and class probabilities (0..1) would round the scores away. The branch
convs themselves (box and class logits) are quantized.

- OpenVINO: ``nncf.quantize`` (preset MIXED: symmetric weights, asymmetric activations) with that ignored scope.
- ONNX: ``onnxruntime.quantization.quantize_static``, QDQ format, per-channel int8 weights, uint8 (asymmetric)
  activations (MinMax calibration), the tail listed in ``nodes_to_exclude``. uint8 activations are what
  onnxruntime's fast x86 kernels take (U8S8): with int8 activations (S8S8) the bccd yolov8n at 640 ran 1.5x *slower*
  than FP32 on onnxruntime 1.32 (AVX512-VNNI CPU), with uint8 2.3x faster.

The exported model keeps ultralytics' metadata (names, imgsz, stride) with ``quantize: 8`` in its args, so
ultralytics' ``AutoBackend`` (and so ``yolo-prune val``) runs it like any export.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import yaml

from .data.calibration import load_calibration_images
from .data.spec import DataSpec, resolve_data
from .errors import OutputError, UsageError
from .runtimes import require_nncf, require_openvino

INT8_FORMATS = ("openvino", "onnx")


def check_int8(fmt: str, data: Any, *, half: bool = False) -> None:
    """Refuse, in one line, an INT8 request that cannot work: a format without an INT8 path here, no ``data``,
    ``half`` as well, or OpenVINO / NNCF missing (with the pip command that fixes it)."""
    if fmt not in INT8_FORMATS:
        raise UsageError(f"int8=True has no INT8 path for format={fmt}: use format=openvino (NNCF) or format=onnx "
                         "(onnxruntime QDQ)")
    if data is None or str(data).strip() == "":
        raise UsageError("int8=True needs data=... (the calibration images come from its train split)")
    if half:
        raise UsageError("give int8=True or half=True, not both")
    if fmt == "openvino":
        require_openvino()
        require_nncf()


def calibration_images(data: str | Path | DataSpec, *, n: int, imgsz: int, seed: int = 0,
                       fraction: float | None = None, progress: bool = False) -> np.ndarray:
    """``(N, 3, imgsz, imgsz)`` float32 images in [0, 1] from the train split of ``data``: ``n`` drawn with ``seed``,
    or, with ``fraction`` (ultralytics' export key), that fraction of the split."""
    spec = resolve_data(data)
    if fraction is not None:
        if not 0 < float(fraction) <= 1:
            raise UsageError(f"fraction={fraction} is out of range: it must be in (0, 1]")
        n = max(1, round(float(fraction) * len(spec.train_images)))
    if n < 1:
        raise UsageError("int8=True needs calib_images >= 1")
    images = load_calibration_images(spec.train_images, n=n, imgsz=imgsz, seed=seed, progress=progress)
    return np.ascontiguousarray(images.numpy(), dtype=np.float32)


# ONNX ------------------------------------------------------------------------------------------------------------


def onnx_decode_tail(model: Any, head: int) -> list[str]:
    """Names of the ONNX nodes of Detect's decode tail (layer ``head``): ``/model.<head>/X`` and ``/model.<head>/dfl/...``
    (the conv branches are ``/model.<head>/cv2.0/...`` and the like)."""
    prefix = f"/model.{head}/"
    tail = []
    for node in model.graph.node:
        rest = node.name[len(prefix):] if node.name.startswith(prefix) else None
        if rest is not None and ("/" not in rest or rest.startswith("dfl/")):
            tail.append(node.name)
    if not tail:
        raise OutputError(f"cannot find the Detect decode (nodes /model.{head}/...) in the exported ONNX graph")
    return tail


class _Reader:
    """What onnxruntime's calibrators read (the ``CalibrationDataReader`` protocol): one image per call, then None."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self._feeds = iter([{input_name: im[None]} for im in images])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_onnx(src: str | Path, dst: str | Path, images: np.ndarray, *, head: int,
                  exclude: Sequence[str] | None = None) -> Path:
    """Write the QDQ INT8 model of the FP32 ONNX ``src`` to ``dst``, calibrated on ``images``.

    ``exclude``: the node names kept in float; default the Detect decode tail of layer ``head``. The metadata of
    ``src`` (ultralytics' names, imgsz, stride...) is carried over, its args marked ``quantize: 8``.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    exclude = onnx_decode_tail(model, head) if exclude is None else list(exclude)
    reader = _Reader(images, model.graph.input[0].name)
    with _quiet_logging("root"):  # onnxruntime's advice to pre-process, on the root logger
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
    out = onnx.load(str(dst))
    del out.metadata_props[:]
    for prop in model.metadata_props:
        out.metadata_props.add(key=prop.key, value=int8_args(prop.value) if prop.key == "args" else prop.value)
    onnx.save(out, str(dst))
    return dst


def int8_args(text: str) -> str:
    """ultralytics' export args (a dict literal in the ONNX metadata) with ``quantize: 8``."""
    try:
        args = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return str({**args, "quantize": 8}) if isinstance(args, dict) else text


# OpenVINO --------------------------------------------------------------------------------------------------------


def openvino_decode_tail(model: Any, head: int) -> list[str]:
    """Friendly names of Detect's decode tail in an OpenVINO model converted from ultralytics' trace:
    ``__module.model.<head>/...`` and ``__module.model.<head>.dfl...`` (the branches are ``__module.model.<head>.cv2...``)."""
    scope = f"__module.model.{head}"
    tail = [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_friendly_name().startswith((f"{scope}/", f"{scope}.dfl"))]
    if not tail:
        raise OutputError(f"cannot find the Detect decode ({scope}/...) in the exported OpenVINO model")
    return tail


def quantize_openvino(src: str | Path, dst: str | Path, images: np.ndarray, *, head: int,
                      ignored: Sequence[str] | None = None, verbose: bool = False) -> Path:
    """Write the NNCF INT8 model of the FP32 OpenVINO folder ``src`` into the folder ``dst``, calibrated on
    ``images``; ``ignored`` (default: the decode tail of Detect layer ``head``) stays in float. ``metadata.yaml``
    is copied with its args marked ``quantize: 8``."""
    xml = openvino_xml(src)
    model = require_openvino().Core().read_model(str(xml))
    ignored = openvino_decode_tail(model, head) if ignored is None else list(ignored)
    return save_openvino(ptq_openvino(model, images, ignored, verbose=verbose), src, dst)


def openvino_xml(src: str | Path) -> Path:
    """The ``.xml`` of the OpenVINO export folder ``src``."""
    xml = next(Path(src).glob("*.xml"), None)
    if xml is None:
        raise OutputError(f"no OpenVINO model (.xml) in {src}")
    return xml


def ptq_openvino(model: Any, images: np.ndarray, ignored: Sequence[str], *, verbose: bool = False) -> Any:
    """NNCF post-training quantization of the ``ov.Model`` (preset MIXED), ``ignored`` ops kept in float."""
    nncf = require_nncf()
    with quiet_nncf(verbose):
        return nncf.quantize(model, calibration_dataset(images), preset=nncf.QuantizationPreset.MIXED,
                             subset_size=len(images), ignored_scope=ignored_scope(ignored))


def calibration_dataset(images: np.ndarray) -> Any:
    """The calibration images as an ``nncf.Dataset`` of ``(1, 3, h, w)`` inputs."""
    return require_nncf().Dataset(list(images[:, None]))


def ignored_scope(names: Sequence[str]) -> Any:
    """An ``nncf.IgnoredScope`` of op names (not checked against the model: the decode tail differs per head)."""
    return require_nncf().IgnoredScope(names=list(names), validate=False)


def save_openvino(model: Any, src: str | Path, dst: str | Path) -> Path:
    """Save the quantized ``ov.Model`` into the folder ``dst`` under the name of ``src``'s model, with ``src``'s
    ``metadata.yaml`` marked ``quantize: 8``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    require_openvino().save_model(model, str(dst / openvino_xml(src).name), compress_to_fp16=False)
    meta = src / "metadata.yaml"
    if meta.is_file():
        data = yaml.safe_load(meta.read_text(encoding="utf-8")) or {}
        data["args"] = {**(data.get("args") or {}), "quantize": 8}
        (dst / "metadata.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return dst


def int8_name(fp32: Path) -> str:
    """ultralytics' INT8 names: ``x.onnx`` -> ``x_int8.onnx``, ``x_openvino_model`` -> ``x_int8_openvino_model``."""
    if fp32.is_dir():
        return fp32.name.replace("_openvino_model", "_int8_openvino_model")
    return f"{fp32.stem}_int8{fp32.suffix}"


def quantize_export(fp32: Path, fmt: str, images: np.ndarray, *, head: int, verbose: bool = False) -> Path:
    """The INT8 model of the FP32 export ``fp32`` (beside it, ultralytics' INT8 name); the FP32 export is removed."""
    dst = fp32.with_name(int8_name(fp32))
    if fmt == "openvino":
        out = quantize_openvino(fp32, dst, images, head=head, verbose=verbose)
        shutil.rmtree(fp32)
    else:
        out = quantize_onnx(fp32, dst, images, head=head)
        fp32.unlink()
    return out


@contextlib.contextmanager
def quiet_nncf(verbose: bool = False) -> Iterator[None]:
    """NNCF's log lines and progress bars, shown only with ``verbose``."""
    with _quiet_logging("nncf", verbose), _quiet_streams(verbose):
        yield


@contextlib.contextmanager
def _quiet_logging(name: str, verbose: bool = False) -> Iterator[None]:
    """Raise logger ``name`` (``"root"``: the root logger) to ERROR for the block, unless ``verbose``."""
    logger = logging.getLogger(None if name == "root" else name)
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _quiet_streams(verbose: bool) -> Iterator[None]:
    """NNCF's progress bars (rich) go to stdout/stderr: swallow them unless ``verbose``."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
