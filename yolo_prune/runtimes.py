"""The CPU inference runtimes yolo-prune measures on: their names, availability and versions.

A small bottom module shared by :mod:`yolo_prune.deploy`, :mod:`yolo_prune.bench` and :mod:`yolo_prune.latency`
(and the option checks of :mod:`yolo_prune.config`), so that none of them imports another for these.
"""

from __future__ import annotations

from typing import Any

from .errors import UsageError
from .options import SCHEMA, choices

RUNTIMES = choices("runtime")
ALIASES = dict(SCHEMA["runtime"].aliases)


def require_openvino():
    """Import and return the ``openvino`` module, or raise a one-line :class:`UsageError` naming the extra."""
    try:
        import openvino
    except ImportError:
        raise UsageError("the openvino runtime is not installed: pip install 'yolo-prune[openvino]' "
                         "(or pip install openvino)") from None
    return openvino


def require_nncf():
    """Import and return ``nncf`` (OpenVINO's post-training quantization), or raise a one-line :class:`UsageError`."""
    try:
        import nncf
    except ImportError:
        raise UsageError("INT8 export to OpenVINO needs nncf, which is not installed: pip install "
                         "'yolo-prune[openvino]' (or pip install nncf)") from None
    return nncf


def check_runtime(runtime: Any) -> str:
    """Canonical runtime name (``onnx``/``ort`` -> ``onnxruntime``, ``ov`` -> ``openvino``), else UsageError."""
    name = ALIASES.get(str(runtime).strip().lower(), str(runtime).strip().lower())
    if name not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if name == "openvino":
        require_openvino()
    return name


def runtime_version(runtime: str) -> str:
    """The installed version of ``runtime`` (a canonical name)."""
    if runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    if runtime == "openvino":
        return require_openvino().__version__
    import torch

    return torch.__version__
