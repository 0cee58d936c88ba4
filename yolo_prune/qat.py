"""Quantization-aware training (QAT) with NNCF's PyTorch backend: fake-quantize a (pruned) detector, keep its
quantizers across checkpoints, export the trained result to INT8 OpenVINO IR or QDQ ONNX.

The training itself is ultralytics' loop (:class:`yolo_prune.train.qat.QATMixin`); this module holds what does not
depend on a trainer:

- :func:`prepare_qat`: ``nncf.quantize`` on the torch model (preset MIXED, as the post-training path in
  :mod:`yolo_prune.quantize`), calibrated on images; Detect's decode tail (everything of the Detect module outside its
  cv2/cv3 conv branches: the reshapes and concats of the branch outputs, DFL, anchors, the sigmoid, the box
  arithmetic) is an ignored scope, found on NNCF's own graph as every operation the branches' output convs do not
  depend on. The model comes back as a copy of class :class:`QATDetectionModel` carrying NNCF's fake-quantizers
  (trainable ranges); channel counts are untouched.
- checkpoints: NNCF's quantizers cannot be pickled (ultralytics pickles modules), so :func:`plain_copy` gives the
  float model with the quantizer configuration and ranges as data in its ``qat`` attribute (``nncf.torch.get_config``
  plus the quantizers' state dict), and :func:`restore_qat` re-inserts them (``nncf.torch.load_from_config``).
- :func:`export_qat`: the fake-quantized model as OpenVINO IR (``ov.convert_model``: FakeQuantize nodes, INT8
  weights once compiled) or ONNX (``torch.onnx.export``: QuantizeLinear/DequantizeLinear), BatchNorm left unfused
  (the weight quantizers' ranges belong to the unfused convs; both runtimes fold it themselves).

NNCF compiles a small C++ extension for its CPU quantizers on first use (about two minutes, cached in
``~/.cache/torch_extensions``); :func:`prepare_qat` lifts NNCF's 60 s limit on that build.
"""

from __future__ import annotations

import ast
import copy
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from torch import nn
from ultralytics.nn.tasks import DetectionModel

from .errors import OutputError, UsageError
from .logs import quiet_ultralytics
from .quantize import int8_args, quiet_nncf
from .runtimes import require_nncf, require_openvino

__all__ = ["QATDetectionModel", "copy_metadata", "export_qat", "is_qat", "plain_copy", "prepare_qat", "restore_qat"]

QAT_ATTR = "qat"  # attribute of a saved float model: {"config": NNCF config, "state": quantizer tensors}
_HOOKS = "__nncf_hooks"  # the submodule NNCF's wrap_model adds (nncf.torch.function_hook.wrapper.ATR_HOOK_STORAGE)


# The operations of an attention module itself (not of its convs): traced for export, its size arithmetic
# (``N = H * W``) becomes tensor operations that shift NNCF's per-name operation counters, so a quantizer keyed to
# ``attn/mul/0`` would land on that product. They stay float (quantizing them changed nothing measurable in PTQ).
ATTENTION_OPS = r"(^|.*/)attn/[^/]+/\d+$"


class QATDetectionModel(DetectionModel):
    """A ``DetectionModel`` whose training loss runs the network through :meth:`predict`.

    ultralytics' ``loss(batch)`` calls ``self.forward(batch["img"])`` from inside ``forward(batch)``; NNCF's wrapped
    ``forward`` (its hook context) cannot be entered twice, so the inner call goes to ``predict`` and stays inside the
    outer context. The image input itself is then not fake-quantized in training (images are 8-bit already).
    Instances are made by :func:`prepare_qat` / :func:`restore_qat`; saved copies are plain ``DetectionModel``.
    """

    def loss(self, batch: dict, preds: Any = None) -> Any:
        if preds is None:
            preds = self.predict(batch["img"])
        return super().loss(batch, preds)


def is_qat(model: nn.Module) -> bool:
    """True for a model carrying NNCF quantizers, or a saved float copy with their state (``qat`` attribute)."""
    return _HOOKS in getattr(model, "_modules", {}) or isinstance(getattr(model, QAT_ATTR, None), dict)


def _check_model(model: nn.Module) -> None:
    if type(model) not in (DetectionModel, QATDetectionModel):
        raise UsageError(f"qat_epochs needs a detection model (ultralytics DetectionModel), got {type(model).__name__}")


def _as_qat_class(model: nn.Module) -> nn.Module:
    _check_model(model)
    model.__class__ = QATDetectionModel  # same attributes and modules; only the training loss path differs
    return model


def decode_tail(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names, in NNCF's torch graph of ``model`` (eval), of the operations of Detect's decode tail: every operation
    the branches' output convs (bare ``Conv2d`` of the last layer, DFL's left out) do not depend on."""
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph
    from nncf.torch.function_hook.wrapper import wrap_model

    last = len(model.model) - 1
    outputs = {f"model.{last}.{name}.weight" for name, m in model.model[-1].named_modules()
               if type(m) is nn.Conv2d and name.split(".")[-1] != "conv" and not name.startswith("dfl")}
    graph = build_nncf_graph(wrap_model(copy.deepcopy(model)), example)
    nodes = graph.get_all_nodes()
    stack = [nxt for n in nodes if n.node_name in outputs for nxt in graph.get_next_nodes(n)]
    if not stack:
        raise OutputError(f"cannot find Detect's output convs (model.{last}.cv2/cv3) in NNCF's graph")
    needed: set[int] = set()
    while stack:
        node = stack.pop()
        if node.node_id not in needed:
            needed.add(node.node_id)
            stack.extend(graph.get_previous_nodes(node))
    return [n.node_name for n in nodes if n.node_id not in needed and n.node_type != "nncf_model_const"]


def prepare_qat(model: nn.Module, images: Sequence[Any], *, verbose: bool = False) -> nn.Module:
    """A fake-quantized copy of ``model`` (a :class:`QATDetectionModel` wrapped by NNCF), its ranges calibrated on
    ``images`` (``(3, H, W)`` arrays or tensors in [0, 1], sizes may differ); Detect's decode tail stays float.
    ``model`` is not modified."""
    nncf = require_nncf()
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # first use compiles NNCF's CPU extension (minutes)
    src = copy.deepcopy(model).float().eval()
    _check_model(src)
    if is_qat(src):
        raise UsageError("the model is already quantization-aware trained (it carries NNCF quantizers)")
    images = [torch.as_tensor(np.asarray(im), dtype=torch.float32)[None] for im in images]
    if not images:
        raise UsageError("quantization-aware training needs at least one calibration image")
    head = src.model[-1]
    dynamic = getattr(head, "dynamic", False)
    head.dynamic = True  # anchors rebuilt at every call: the same operations when tracing and calibrating
    try:
        ignored = decode_tail(src, images[0])
        with quiet_nncf(verbose):
            qmodel = nncf.quantize(src, nncf.Dataset(images),
                                   preset=nncf.QuantizationPreset.MIXED, subset_size=len(images),
                                   ignored_scope=nncf.IgnoredScope(names=ignored, patterns=[ATTENTION_OPS],
                                                                   validate=False),
                                   advanced_parameters=nncf.AdvancedQuantizationParameters(
                                       disable_bias_correction=True))  # training adapts the biases itself
    finally:
        head.dynamic = dynamic
    qmodel.model[-1].dynamic = dynamic
    return _as_qat_class(qmodel)


def plain_copy(model: nn.Module) -> nn.Module:
    """A picklable float copy of the NNCF-wrapped ``model`` (plain ``DetectionModel``), its quantizers' configuration
    and ranges in ``copy.qat``; :func:`restore_qat` turns it back. A model without quantizers is copied as it is."""
    out = copy.deepcopy(model)
    if _HOOKS not in out._modules:
        return out
    nncf = require_nncf()
    state = {k[len(_HOOKS) + 1:]: v.detach().float().clone() for k, v in model.state_dict().items()
             if k.startswith(_HOOKS + ".")}
    config = nncf.torch.get_config(model)
    for attr in ("forward", "_replicate_for_data_parallel"):  # NNCF's instance wrappers (nncf.torch.wrap_model)
        out.__dict__.pop(attr, None)
    del out._modules[_HOOKS]
    out.__class__ = DetectionModel
    setattr(out, QAT_ATTR, {"config": config, "state": state})
    return out


def restore_qat(model: nn.Module) -> nn.Module:
    """Re-insert the quantizers a :func:`plain_copy` (or a QAT checkpoint's model) carries in ``model.qat``, in place;
    returns the wrapped :class:`QATDetectionModel`. A model without them is returned unchanged."""
    saved = model.__dict__.get(QAT_ATTR)
    if not isinstance(saved, dict):
        return model
    nncf = require_nncf()
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    del model.__dict__[QAT_ATTR]
    model = nncf.torch.load_from_config(model, saved["config"])
    hooks = model._modules[_HOOKS]
    device = next(model.parameters()).device
    missing, unexpected = hooks.load_state_dict({k: v.to(device) for k, v in saved["state"].items()}, strict=False)
    if missing or unexpected:
        raise OutputError(f"the saved quantizer state does not fit the model ({len(missing)} quantizer tensors "
                          f"missing, {len(unexpected)} unknown)")
    return _as_qat_class(model)


def _export_ready(model: nn.Module, fmt: str) -> nn.Module:
    """An eval copy of the QAT model whose Detect returns the export output (``1 x (4 + nc) x anchors``)."""
    model = restore_qat(plain_copy(model) if _HOOKS in model._modules else copy.deepcopy(model)).float().eval()
    if not is_qat(model):
        raise UsageError("the model carries no quantizers: train it with qat_epochs >= 1 first")
    head = model.model[-1]
    head.export, head.format, head.dynamic = True, fmt, False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def export_qat(model: nn.Module, fmt: str, dst: str | Path, *, imgsz: int) -> Path:
    """Write the fake-quantized ``model`` (NNCF-wrapped, or a float copy with its ``qat`` state) to ``dst``:
    ``format=openvino``: the IR (``dst`` a folder; the ``.xml`` named after it) with FakeQuantize nodes;
    ``format=onnx``: a QDQ ONNX file. Metadata is the caller's (see :mod:`yolo_prune.stages.qat`)."""
    require_nncf()
    net = _export_ready(model, fmt)
    x = torch.zeros(1, 3, imgsz, imgsz)
    with torch.no_grad():
        net(x)  # anchors for this size
    dst = Path(dst)
    with torch.no_grad(), quiet_ultralytics(False):
        if fmt == "openvino":  # traced, NNCF's quantizers emit FakeQuantize
            ov = require_openvino()
            dst.mkdir(parents=True, exist_ok=True)
            xml = dst / f"{dst.name.replace('_int8_openvino_model', '')}.xml"
            ov.save_model(ov.convert_model(net, example_input=x), str(xml), compress_to_fp16=False)
        elif fmt == "onnx":  # traced for ONNX: QuantizeLinear / DequantizeLinear pairs
            from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

            for m in net.modules():
                if isinstance(m, BaseQuantizer):
                    m.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
            torch.onnx.export(net, x, str(dst), opset_version=17, dynamo=False, input_names=["images"],
                              output_names=["output0"])
        else:
            raise UsageError(f"qat_epochs has no INT8 path for format={fmt}: use format=openvino or format=onnx")
    return dst


def copy_metadata(fp32_onnx: Path, dst: Path, fmt: str) -> None:
    """Carry ultralytics' metadata of an FP32 ONNX export of the model (names, imgsz, stride...) over to the QAT
    export ``dst`` (an ONNX file, or an OpenVINO folder's ``metadata.yaml``), its args marked ``quantize: 8``, so that
    ``AutoBackend`` (and ``yolo-prune val``) run it like any export."""
    import onnx

    src = onnx.load(str(fp32_onnx))
    if fmt == "openvino":  # ultralytics writes the same dict as yaml there; ONNX holds each value as its str()
        data = {p.key: _literal(p.value) for p in src.metadata_props}
        data["args"] = {**(data.get("args") if isinstance(data.get("args"), dict) else {}), "quantize": 8}
        (dst / "metadata.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return
    out = onnx.load(str(dst))
    del out.metadata_props[:]
    for prop in src.metadata_props:
        value = int8_args(prop.value) if prop.key == "args" else prop.value
        out.metadata_props.add(key=prop.key, value=value)
    onnx.save(out, str(dst))


def _literal(text: str) -> Any:
    """A metadata value as ultralytics wrote it (``{0: 'a'}``, ``[640, 640]``, ``32``...), or the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
