"""Where a result came from: versions, seed and the source checkpoint's hash.

Stored in every report and in every checkpoint yolo-prune writes (under the ``yolo_prune`` key).
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .compat import installed_version
from .io import sha256_file
from . import __version__


def versions() -> dict[str, str]:
    """The versions of yolo-prune, torch, ultralytics, torch-pruning (its distribution's: the module's
    ``__version__`` lags behind releases) and Python in this environment."""
    import torch
    import torch_pruning
    import ultralytics

    return {
        "yolo_prune": __version__,
        "torch": torch.__version__,
        "ultralytics": ultralytics.__version__,
        "torch_pruning": installed_version("torch-pruning") or getattr(torch_pruning, "__version__", "unknown"),
        "python": platform.python_version(),
    }


def source_info(source: Any) -> dict[str, Any]:
    """Path and sha256 of ``source`` when it is a file, else a description of the in-memory object."""
    if isinstance(source, (str, Path)) and Path(source).is_file():
        return {"source": str(Path(source).resolve()), "source_sha256": sha256_file(source)}
    if isinstance(source, (str, Path)):
        return {"source": str(source), "source_sha256": None}
    return {"source": f"<in-memory {type(source).__name__}>", "source_sha256": None}


def provenance(source: Any, *, seed: int, stage: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "stage": stage,
        **source_info(source),
        "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(),
        "versions": versions(),
        "args": args or {},
    }
