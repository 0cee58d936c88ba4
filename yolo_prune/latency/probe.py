"""What a latency table is measured on: the CPU, the runtime (see :mod:`yolo_prune.runtimes`), the clock, the cache."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from ..errors import UsageError
from ..runtimes import ALIASES, RUNTIMES, check_runtime, require_openvino, runtime_version

__all__ = ["ALIASES", "RUNTIMES", "cache_dir", "check_runtime", "cpu_model", "require_openvino", "resolve_clock",
           "runtime_version"]


def resolve_clock(clock: str, threads: int | None) -> str:
    """``auto`` -> ``cpu`` with one thread, else ``wall``."""
    if clock not in ("auto", "wall", "cpu"):
        raise UsageError(f"clock={clock!r} must be auto, wall or cpu")
    if clock == "auto":
        return "cpu" if threads == 1 else "wall"
    return clock


def cache_dir() -> Path:
    """``$YOLO_PRUNE_CACHE/latency`` or ``~/.cache/yolo_prune/latency``."""
    env = os.environ.get("YOLO_PRUNE_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "yolo_prune") / "latency"


def cpu_model() -> str:
    """The CPU's model name and the vector extensions that decide kernel block sizes."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name":
                    name = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    isa = [f for f in ("avx512_bf16", "amx_tile", "avx512f", "avx2") if f in flags]
    return f"{name} [{' '.join(isa) or 'baseline'}]"
