"""The convs a latency table measures: what pruning can change of each (:class:`ConvSpec`), and one conv alone as
a tiny model in a runtime (:func:`conv_onnx`, :class:`ConvBench`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..bench import openvino_compiled
from ..errors import UsageError
from ..quantize import quantize_onnx
from ..runtimes import require_openvino


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A conv of the model as the runtime sees it (BN folded), with what pruning can change."""

    name: str
    cin: int
    cout: int
    kernel: int
    stride: int
    groups: int
    size: int  # input height = width at imgsz
    prune_in: bool
    prune_out: bool


def conv_specs(model: nn.Module, graph: Any, imgsz: int, trace_imgsz: int) -> list[ConvSpec]:
    """Every conv of a prepared model whose input or output channels some group can remove."""
    touched: dict[nn.Conv2d, set[bool]] = {}
    for group in graph.groups():
        for conv, is_out, _ in group.convs:
            touched.setdefault(conv, set()).add(is_out)
    specs = []
    for conv, sides in touched.items():
        if conv not in graph.conv_hw:
            continue
        out_side = math.sqrt(graph.conv_hw[conv]) * imgsz / trace_imgsz
        stride = conv.stride[0]
        if conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1]:
            raise UsageError(f"latency model: conv {graph.names.get(conv)} is not square")
        depthwise = conv.groups > 1 and conv.groups == conv.in_channels
        specs.append(ConvSpec(name=graph.names[conv], cin=conv.in_channels, cout=conv.out_channels,
                              kernel=conv.kernel_size[0], stride=stride, groups=conv.groups if depthwise else 1,
                              size=int(round(out_side * stride)), prune_in=False in sides, prune_out=True in sides))
    return sorted(specs, key=lambda s: _natural(s.name))


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def architecture_hash(specs: Sequence[ConvSpec], extra: Iterable[Any] = ()) -> str:
    text = json.dumps([dataclasses.astuple(s) for s in specs] + list(map(str, extra)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def conv_onnx(cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1, seed: int = 0) -> bytes:
    """ONNX bytes of Conv(+bias) -> Sigmoid -> Mul (SiLU), the exported form of an ultralytics Conv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin // groups, kernel, kernel)) * 0.05).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.05).astype(np.float32)
    pad = kernel // 2
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                         pads=[pad] * 4, group=groups),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def int8_onnx(model: bytes, cin: int, size: int, *, samples: int = 4, seed: int = 0) -> bytes:
    """The INT8 form of an FP32 ONNX model with one input ``1 x cin x size x size``, quantized as
    ``yolo-prune export int8=True format=onnx`` quantizes (onnxruntime QDQ, per-channel int8 weights, uint8
    activations: U8S8), calibrated on ``samples`` random images in [0, 1)."""
    images = np.random.default_rng(seed).random((samples, cin, size, size), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="yolo-prune-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        quantize_onnx(src, dst, images, head=0, exclude=[])
        return dst.read_bytes()


class ConvBench:
    """One conv (cin -> cout at ``size`` x ``size``, + bias + SiLU) as a tiny model in ``runtime``; call to run it.

    In the whole model, consecutive convs exchange tensors in the runtime's blocked layout; alone, the tiny
    model also converts its input and output (onnxruntime's ReorderInput/ReorderOutput, OpenVINO's Reorder),
    which the whole model does not pay per conv. :meth:`share` is the fraction of the runtime's own time
    spent in the conv's nodes (from the runtime's per-node profile), so ``time * share`` is the conv's cost in
    context. torch eager has no such conversions (share 1).

    ``int8``: the conv quantized as the INT8 export quantizes it (:func:`int8_onnx`; QDQ nodes around conv and
    SiLU), run by onnxruntime's INT8 kernels or by OpenVINO, which turns the QDQ pairs into its INT8 convolution.
    """

    def __init__(self, runtime: str, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int,
                 threads: int | None, *, profile_dir: str | Path | None = None, int8: bool = False):
        self.runtime = runtime
        if int8 and runtime == "torch":
            raise UsageError("int8=True latency tables: torch has no INT8 path here; use runtime=onnxruntime or "
                             "runtime=openvino")
        x = np.random.default_rng(1).random((1, cin, size, size), dtype=np.float32)
        self._profile = None
        if runtime == "torch":
            conv = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups), nn.SiLU()).eval()
            xt = torch.from_numpy(x)

            def run() -> Any:
                with torch.inference_mode():
                    return conv(xt)

            self.run = run
            return
        model = conv_onnx(cin, cout, kernel, stride, size, groups)
        if int8:
            model = int8_onnx(model, cin, size)
        if runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if profile_dir is not None:
                opts.enable_profiling = True
                opts.profile_file_prefix = str(Path(profile_dir) / f"conv{cin}x{cout}_{id(self)}")  # unique
            session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
            value = ort.OrtValue.ortvalue_from_numpy(x)
            binding = session.io_binding()
            binding.bind_ortvalue_input("x", value)
            binding.bind_output("y")
            session.run_with_iobinding(binding)  # allocate the output once, then write into it
            out = binding.get_outputs()[0]
            binding = session.io_binding()
            binding.bind_ortvalue_input("x", value)
            binding.bind_ortvalue_output("y", out)
            self._session = session
            self.run = lambda: session.run_with_iobinding(binding)
            self._profile = profile_dir is not None
            return
        ov = require_openvino()
        compiled = openvino_compiled(model, threads, perf_count=profile_dir is not None)
        request = compiled.create_infer_request()
        request.set_input_tensor(ov.Tensor(x))
        self._request = request
        self._ov_shares: list[float] = []
        self._profile = profile_dir is not None
        if self._profile:
            def run() -> Any:
                request.infer()

            self.run = run
        else:
            self.run = request.infer

    def __call__(self) -> Any:
        return self.run()

    def share(self) -> float:
        """Fraction of the runtime's time in the conv's own nodes (1.0 without a profile)."""
        if not self._profile:
            return 1.0
        if self.runtime == "onnxruntime":
            path = self._session.end_profiling()
            self._profile = False
            try:
                events = json.loads(Path(path).read_text(encoding="utf-8"))
            finally:
                Path(path).unlink(missing_ok=True)
            runs = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
            nodes = [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
            reorder = sum(e["dur"] for e in nodes if str(e.get("args", {}).get("op_name", "")).startswith("Reorder"))
            own = sum(e["dur"] for e in nodes) - reorder
            return float(min(1.0, own / sum(runs))) if runs and sum(runs) > 0 else 1.0
        # OpenVINO: the last inference's per-node times (Swish is fused into the Convolution node)
        info = self._request.profiling_info
        total = sum(p.real_time.total_seconds() for p in info)
        own = sum(p.real_time.total_seconds() for p in info if p.node_type not in ("Reorder", "Parameter", "Result"))
        return float(own / total) if total > 0 else 1.0
