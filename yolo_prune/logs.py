"""Logging: yolo-prune's own logger and the one switch that quiets ultralytics.

``LOGGER`` (``logging.getLogger("yolo_prune")``) carries yolo-prune's progress lines: the CLI shows them, library
users see nothing unless they configure logging. ultralytics logs to its own ``ultralytics`` logger, and its
progress bars follow that logger's level; :func:`quiet_ultralytics` raises it to WARNING for a block.

Core layer: imports nothing else of yolo_prune.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

__all__ = ["LOGGER", "quiet_ultralytics"]

LOGGER = logging.getLogger("yolo_prune")


@contextlib.contextmanager
def quiet_ultralytics(verbose: bool = False) -> Iterator[None]:
    """Silence ultralytics' INFO logs (and so its progress bars) for the block, unless ``verbose``.

    The level the ultralytics logger had before is restored afterwards, also on an exception.
    """
    if verbose:
        yield
        return
    from ultralytics.utils import LOGGER as ULTRALYTICS  # imported first: its set-up would reset the level

    level = ULTRALYTICS.level
    ULTRALYTICS.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ULTRALYTICS.setLevel(level)
