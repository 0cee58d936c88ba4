"""Datasets: YOLO- and COCO-format data yamls resolved into one :class:`DataSpec`, and a synthetic dataset.

Imports are lazy so that ``python -m yolo_prune.data.synthetic`` and light users do not load ultralytics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .coco import DataWarning
    from .spec import DataSpec, resolve_data
    from .synthetic import make_synthetic

__all__ = ["DataSpec", "DataWarning", "resolve_data", "make_synthetic"]

_LAZY = {"DataSpec": "spec", "DataWarning": "coco", "resolve_data": "spec", "make_synthetic": "synthetic"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
