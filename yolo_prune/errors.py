"""Exceptions. Every error a user can cause derives from :class:`YoloPruneError`.

The CLI prints such errors as one line and exits with :attr:`YoloPruneError.exit_code`;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class YoloPruneError(Exception):
    """Base class of all yolo-prune errors caused by input, configuration or environment."""

    exit_code = 1


class UsageError(YoloPruneError):
    """A bad command line or argument value (unknown key, value out of range, wrong type)."""

    exit_code = 2


class ModelLoadError(YoloPruneError):
    """The model could not be loaded: missing, corrupt, or not a detection model."""


class UnsupportedModelError(YoloPruneError):
    """The model contains a block that yolo-prune cannot prune safely."""


class DatasetError(YoloPruneError):
    """A dataset yaml, image folder or COCO json is missing or malformed."""


class PruningError(YoloPruneError):
    """Pruning could not reach the requested target."""


class OutputError(YoloPruneError):
    """An output folder or file cannot be written, or would overwrite something."""
