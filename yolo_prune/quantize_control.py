"""Accuracy-controlled INT8 quantization of an OpenVINO export (``int8=True max_map_drop=D``, issue 21).

NNCF's ``quantize_with_accuracy_control`` quantizes as :func:`yolo_prune.quantize.quantize_openvino` does (preset
MIXED, Detect's decode tail ignored), then, while the mAP50-95 of the INT8 model is more than ``D`` (absolute, the
units of every yolo-prune mAP: 0.01 is one point) below the FP32 model's, puts back into floating point the group of
quantizers that costs the most, ranked by how far each group's removal brings the outputs back to the FP32 ones
(NNCF's NMSE ranking), one group at a time, until the drop holds or every group is in FP32.

The metric is yolo-prune's COCO evaluator (:class:`yolo_prune.evaluate.ValSample`): ``calib_images`` images of the
data's *val* split, preprocessed as ``val`` preprocesses the static export, NMS and COCOeval as ``val`` scores them.
That cap bounds the cost: every candidate model (one per quantizer group to rank, one per group put back) is
compiled and run on those images; progress lines every 10 s count them.

Which layers stayed in FP32 is read from the models themselves: the ops with a FakeQuantize input in the plain PTQ
model that have none in the final one. ``int8_report.json`` in the export folder records the FP32, PTQ and final mAP
on the sample and those layers.

ONNX is refused: ``format=onnx int8=True`` is onnxruntime's quantizer (uint8 activations), which has no accuracy
control. NNCF 3.4 does run ``quantize_with_accuracy_control`` on ONNX models (checked: it hands the validation
function a ``ModelProto`` and wants dict inputs), but its ONNX quantizer writes int8 activation zero points (S8S8
QDQ), the form that ran 1.5x slower than FP32 in onnxruntime here (:mod:`yolo_prune.quantize`): another quantizer,
slower, than the one ``int8=True`` ships.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from .errors import UsageError
from .evaluate import ValSample
from .io import write_json
from .quantize import (calibration_dataset, ignored_scope, int8_name, openvino_decode_tail, openvino_xml, ptq_openvino,
                       quiet_nncf, save_openvino)
from .runtimes import require_nncf, require_openvino

LOGGER = logging.getLogger("yolo_prune")
REPORT = "int8_report.json"
Metric = Callable[[Sequence[np.ndarray], Sequence[dict[str, Any]]], float]


def check_control(fmt: str, max_map_drop: float | None, *, int8: bool) -> None:
    """Refuse, in one line, ``max_map_drop`` in an export it cannot apply to."""
    if max_map_drop is None:
        return
    if not int8:
        raise UsageError("max_map_drop= in mode export needs int8=True (it bounds the mAP50-95 lost to INT8)")
    if not 0 <= float(max_map_drop) <= 1:
        raise UsageError(f"max_map_drop={max_map_drop} is out of range: an absolute mAP50-95 drop in [0, 1] "
                         "(0.01 is one point)")
    if fmt != "openvino":
        raise UsageError(f"int8=True max_map_drop= (accuracy control) needs format=openvino (NNCF); format={fmt} "
                         "quantizes with onnxruntime, which has no accuracy control")


@dataclasses.dataclass
class ControlReport:
    """mAP50-95 on the val sample of the FP32, plain PTQ and final (accuracy-controlled) models, and the ops the
    final model keeps in floating point that PTQ quantizes (``op``: OpenVINO name, ``layer``: the torch module)."""

    fp32_map: float
    ptq_map: float
    final_map: float
    max_map_drop: float
    reached: bool
    val_images: int
    kept_fp32: list[dict[str, str]]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def quantized_ops(model: Any) -> dict[str, str]:
    """Name -> type of every op of the ``ov.Model`` fed directly by a FakeQuantize (its activation or weights);
    ShapeOf (it reads a shape, not values; its generated name differs between models) left out."""
    out = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("FakeQuantize", "Constant", "ShapeOf"):
            continue
        if any(v.get_node().get_type_name() == "FakeQuantize" for v in op.input_values()):
            out[op.get_friendly_name()] = op.get_type_name()
    return out


def layer_name(op: str) -> str:
    """The torch module of an OpenVINO op converted from ultralytics' trace:
    ``__module.model.2.cv1.conv/aten::_convolution/Convolution`` -> ``model.2.cv1.conv``."""
    return op.split("/", 1)[0].removeprefix("__module.")


def kept_in_fp32(ptq: Any, final: Any) -> list[dict[str, str]]:
    """The ops ``ptq`` quantizes and ``final`` does not, in graph order."""
    before, after = quantized_ops(ptq), quantized_ops(final)
    return [{"op": name, "type": kind, "layer": layer_name(name)} for name, kind in before.items() if name not in after]


class _Validation:
    """NNCF's ``validation_fn``: the outputs of the compiled model on the items and their mAP50-95 (``metric``),
    returned with the outputs so that NNCF ranks the quantizers by output error (NMSE), not by a per-image mAP.
    ``inputs`` is the validation dataset's transform (NNCF's ranking runs the models on it directly). Both log a
    progress line at most every 10 s: NNCF runs many candidate models."""

    def __init__(self, metric: Metric) -> None:
        self.metric, self.calls, self.images = metric, 0, 0
        self.t0 = self.last = time.perf_counter()

    def __call__(self, compiled: Any, items: Any) -> tuple[float, list[list[np.ndarray]]]:
        outputs, items = [], list(items)
        for it in items:
            outputs.append(compiled(self.inputs(it))[compiled.output(0)])
        self.calls += 1
        return float(self.metric(outputs, items)), [[o] for o in outputs]

    def inputs(self, item: dict[str, Any]) -> np.ndarray:
        self.images += 1
        now = time.perf_counter()
        if now - self.last >= 10:
            self.last = now
            LOGGER.info("accuracy control: %d validations, %d images run, %s elapsed", self.calls, self.images,
                        time.strftime("%M:%S", time.gmtime(now - self.t0)))
        return ValSample.inputs(item)


def _compiled(model: Any) -> Any:
    """``model`` compiled for the CPU in f32 inference precision (as NNCF validates)."""
    ov = require_openvino()
    return ov.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _named_outputs(model: Any) -> Any:
    """``model`` with a name on every output tensor (``output0``...): NNCF's ranking collects outputs by tensor name,
    and the PyTorch frontend leaves ultralytics' output unnamed (all of them would be lost)."""
    for i, out in enumerate(model.outputs):
        if not out.get_names():
            out.get_tensor().set_names({f"output{i}"})
    return model


def _export_args(src: Path) -> dict[str, Any]:
    meta = src / "metadata.yaml"
    return (yaml.safe_load(meta.read_text(encoding="utf-8")) or {}) if meta.is_file() else {}


def quantize_openvino_controlled(src: str | Path, dst: str | Path, images: np.ndarray, *, data: Any, head: int,
                                 max_map_drop: float, val_images: int = 64, metric: Metric | None = None,
                                 verbose: bool = False, progress: bool = False) -> tuple[Path, ControlReport]:
    """Write the accuracy-controlled NNCF INT8 model of the FP32 OpenVINO folder ``src`` into the folder ``dst``
    (calibrated on ``images``, as :func:`~yolo_prune.quantize.quantize_openvino`) with ``int8_report.json``.

    ``max_map_drop``: the largest accepted mAP50-95 drop (absolute) on ``val_images`` images of ``data``'s val split.
    ``metric`` (tests only): replaces the COCO mAP of the outputs, called as ``metric(outputs, items)``.
    """
    ov, nncf = require_openvino(), require_nncf()
    t0 = time.perf_counter()
    src = Path(src)
    model = _named_outputs(ov.Core().read_model(str(openvino_xml(src))))
    size = int(model.input(0).get_partial_shape()[2].get_length())
    sample = ValSample(data, imgsz=size, n=val_images, end2end=bool(_export_args(src).get("end2end", False)),
                       progress=progress)
    validate = _Validation(metric or sample.score)
    ignored = openvino_decode_tail(model, head)
    ptq = ptq_openvino(model, images, ignored, verbose=verbose)
    fp32_map, ptq_map = validate(_compiled(model), sample.items)[0], validate(_compiled(ptq), sample.items)[0]
    final = ptq
    if fp32_map - ptq_map > max_map_drop:
        params = nncf.quantization.advanced_parameters.AdvancedAccuracyRestorerParameters(num_ranking_workers=1)
        with quiet_nncf(verbose):
            final = nncf.quantize_with_accuracy_control(
                model, calibration_dataset(images), nncf.Dataset(sample.items, validate.inputs), validate,
                max_drop=float(max_map_drop), drop_type=nncf.DropType.ABSOLUTE, preset=nncf.QuantizationPreset.MIXED,
                subset_size=len(images), ignored_scope=ignored_scope(ignored),
                advanced_accuracy_restorer_parameters=params)
    final_map = ptq_map if final is ptq else validate(_compiled(final), sample.items)[0]
    report = ControlReport(fp32_map=round(fp32_map, 5), ptq_map=round(ptq_map, 5), final_map=round(final_map, 5),
                           max_map_drop=float(max_map_drop), reached=fp32_map - final_map <= max_map_drop,
                           val_images=len(sample.items), kept_fp32=kept_in_fp32(ptq, final),
                           seconds=round(time.perf_counter() - t0, 1))
    out = save_openvino(final, src, dst)
    write_json(out / REPORT, report.to_json())
    return out, report


def log_report(report: ControlReport) -> None:
    """One line for the mAPs, one per layer kept in FP32, one if the drop was not reached."""
    LOGGER.info("INT8 accuracy control on %d val images: mAP50-95 FP32 %.4f, PTQ %.4f, final %.4f; %d op(s) kept in "
                "FP32", report.val_images, report.fp32_map, report.ptq_map, report.final_map, len(report.kept_fp32))
    for op in report.kept_fp32:
        LOGGER.info("kept in FP32: %s (%s)", op["layer"], op["type"])
    if not report.reached:
        LOGGER.warning("INT8 accuracy control could not hold max_map_drop=%s (drop %.4f)", report.max_map_drop,
                       report.fp32_map - report.final_map)


def quantize_export_controlled(fp32: Path, images: np.ndarray, *, data: Any, head: int, max_map_drop: float,
                               val_images: int, verbose: bool = False) -> Path:
    """The accuracy-controlled INT8 OpenVINO model of the FP32 export folder ``fp32`` (beside it, ultralytics' INT8
    name; the FP32 export is removed), its report logged."""
    out, report = quantize_openvino_controlled(fp32, fp32.with_name(int8_name(fp32)), images, data=data, head=head,
                                               max_map_drop=max_map_drop, val_images=val_images, verbose=verbose,
                                               progress=True)
    shutil.rmtree(fp32)
    log_report(report)
    return out
