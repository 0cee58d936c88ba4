"""Which versions of ultralytics and torch-pruning yolo-prune works with, checked at ``import yolo_prune``.

``MINIMUM`` is the oldest release of each that the core tests pass with (``.ci/oldest`` runs them there);
``pyproject.toml`` declares the same. Versions are read from the installed distributions' metadata, so the check
imports neither package. :func:`version_drift` says how a checkpoint's recorded versions differ from this
environment's in a way known to matter.
"""

from __future__ import annotations

import re
from importlib import metadata

from .errors import YoloPruneError

# ultralytics 8.4.142: export's nms=None/False choose YOLO26's head branch (before: the end2end argument, and
# 8.3.0 built yolov8 yamls with YOLO11's depthwise class head). torch-pruning 1.5.2: GroupMagnitudeImportance.
MINIMUM = {"ultralytics": "8.4.142", "torch-pruning": "1.5.2"}


class DependencyVersionError(YoloPruneError):
    """An installed dependency is older than the oldest release yolo-prune is tested with."""


def parse_version(text: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: ``"2.14.1+cpu"`` -> ``(2, 14, 1)``, ``"1.6.0rc1"`` ->
    ``(1, 6, 0)``."""
    parts = []
    for piece in str(text).split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):
            break
    return tuple(parts)


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_versions() -> None:
    """Raise :class:`DependencyVersionError` (one line, with the pip command) for a dependency older than
    ``MINIMUM``. A dependency that is not installed at all is left to its import to report."""
    for name, minimum in MINIMUM.items():
        found = installed_version(name)
        if found is not None and parse_version(found) < parse_version(minimum):
            raise DependencyVersionError(
                f"yolo-prune needs {name}>={minimum} (found {found}): pip install -U \"{name}>={minimum}\""
            )


def version_drift(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """How the versions a checkpoint was pruned with (``recorded``, provenance keys ``ultralytics``,
    ``torch_pruning``) differ from ``current`` in a known-relevant way: another ultralytics major.minor (its
    modules and yamls change between minors), or either package older than ``MINIMUM`` (untested, e.g. 8.3.0's
    yolov8 head). An empty list when nothing relevant differs or nothing was recorded."""
    notes = []
    for key, name in (("ultralytics", "ultralytics"), ("torch_pruning", "torch-pruning")):
        then, now = recorded.get(key), current.get(key)
        if not then or not parse_version(then):
            continue
        if parse_version(then) < parse_version(MINIMUM[name]):
            notes.append(f"{name} {then} (older than the tested {MINIMUM[name]})")
        elif key == "ultralytics" and now and parse_version(then)[:2] != parse_version(now)[:2]:
            notes.append(f"ultralytics {then} (this environment has {now})")
    return notes
