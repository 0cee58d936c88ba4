"""Logging: yolo-prune's own logger, its progress lines and sub-step timings, and the switch that quiets ultralytics.

``LOGGER`` (``logging.getLogger("yolo_prune")``) carries yolo-prune's progress lines: the CLI shows them, library
users see nothing unless they configure logging or ask a function for ``progress=True``
(:func:`progress_output`). ultralytics logs to its own ``ultralytics`` logger, and its progress bars follow that
logger's level; :func:`quiet_ultralytics` raises it to WARNING for a block.

:class:`Progress` is the one progress helper every layer uses for a sub-step that can take more than a few
seconds; its lines look like the trainers' per-epoch lines (:mod:`yolo_prune.train.progress`)::

    sensitivity: 45/171 probes  0:42 elapsed, ETA 2:48
    sensitivity: 171/171 probes in 2:41

:class:`Timings` adds up the wall time of named sub-steps (the ``timings`` block of a prune report).

Core layer: imports nothing else of yolo_prune.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

__all__ = ["LOGGER", "EVERY", "STRIDE", "Progress", "Timings", "format_seconds", "listening", "progress_output",
           "quiet_ultralytics"]

LOGGER = logging.getLogger("yolo_prune")
EVERY = 10.0  # seconds between two progress lines of one sub-step (the closing line always comes)
STRIDE = 0.05  # ... and the share of the items done between them: a long sub-step logs ~20 lines, not hundreds

T = TypeVar("T")


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of one sub-step of ``total`` items as lines on the ``yolo_prune`` logger (INFO).

    While it runs, a line ``label: i/N unit  elapsed, ETA`` once at least ``every`` seconds passed and ``stride``
    of the items were done since the last one; when it ends (:meth:`close`, or the end of a ``with`` block that
    raised nothing) one line ``label: N/N unit in m:ss``.
    Nothing at all unless ``enabled``, so library code can create one unconditionally::

        with Progress("sensitivity", len(probes), unit="probes", enabled=progress) as bar:
            for p in probes:
                ...
                bar.update()
    """

    def __init__(self, label: str, total: int, *, unit: str = "", enabled: bool = True, every: float = EVERY,
                 stride: float = STRIDE, logger: logging.Logger = LOGGER):
        self.label, self.total, self.unit, self.enabled = label, max(int(total), 0), unit, enabled
        self.every, self.stride, self.logger = every, stride * max(int(total), 0), logger
        self.done = self.logged = 0
        self.t0 = self.last = time.perf_counter()
        self.closed = False

    def _count(self) -> str:
        return f"{self.done}/{self.total}" + (f" {self.unit}" if self.unit else "")

    def update(self, n: int = 1) -> None:
        """``n`` more items are done; log a line if ``every`` seconds and ``stride`` of the items passed since the
        last one."""
        self.done += n
        if not self.enabled or self.done >= self.total:
            return
        now = time.perf_counter()
        if now - self.last >= self.every and self.done - self.logged >= self.stride:
            self.last, self.logged = now, self.done
            elapsed = now - self.t0
            eta = elapsed / max(self.done, 1) * (self.total - self.done)
            self.logger.info("%s: %s  %s elapsed, ETA %s", self.label, self._count(), format_seconds(elapsed),
                             format_seconds(eta))

    def close(self) -> None:
        """The closing line (once)."""
        if self.enabled and not self.closed:
            self.logger.info("%s: %s in %s", self.label, self._count(), format_seconds(time.perf_counter() - self.t0))
        self.closed = True

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, counting each one done after the caller's loop body ran; close at the end."""
        for item in items:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class Timings(dict):
    """Wall seconds of named sub-steps, added up over repeated ones: ``with timings("ranking"): ...``.

    A plain ``dict[str, float]`` otherwise (JSON-able as it is). Nested blocks of one object count twice.
    """

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0

    def add(self, other: dict[str, float]) -> Timings:
        """Add another set of timings into this one; returns self."""
        for name, seconds in other.items():
            self[name] = self.get(name, 0.0) + float(seconds)
        return self


def listening() -> bool:
    """True when INFO lines of the ``yolo_prune`` logger reach a handler (the CLI's, or the user's logging set-up)."""
    return LOGGER.isEnabledFor(logging.INFO) and LOGGER.hasHandlers()


@contextlib.contextmanager
def progress_output(enabled: bool) -> Iterator[None]:
    """Where ``progress=True`` lines go when nothing listens: with ``enabled`` and no handler taking the
    ``yolo_prune`` logger's INFO lines (a plain script or notebook), they are written to stderr for the block.
    When the CLI or the user's logging set-up listens, or without ``enabled``, nothing changes."""
    if not enabled or listening():
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = LOGGER.level, LOGGER.propagate
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # a root handler below INFO level would print every line a second time
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
        LOGGER.propagate = propagate


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
