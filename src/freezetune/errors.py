"""User-facing errors: every mistake a user can make raises a subclass of ``FreezetuneError``.

The CLI turns these into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class FreezetuneError(Exception):
    """Base class of every user-facing error (bad name, bad path, bad config, ...)."""


class SpecError(FreezetuneError):
    """A freeze spec, stage name or schedule that does not match the model."""


class ConfigError(FreezetuneError):
    """An invalid configuration value (all problems are reported together)."""


class WeightsError(FreezetuneError):
    """Weights that cannot be found or do not fit the model."""


class DataError(FreezetuneError):
    """A dataset path or format that cannot be read."""


class CheckpointError(FreezetuneError):
    """A checkpoint that is missing, unreadable or does not fit the run."""


def choices(values: Iterable[object], limit: int = 40) -> str:
    """Format valid choices for an error message: ``'a', 'b', 'c'`` (shortened past ``limit``)."""
    items = [repr(str(v)) for v in values]
    if len(items) > limit:
        items = items[: limit - 1] + [f"... ({len(items) - limit + 1} more)", items[-1]]
    return ", ".join(items)


class TrainingError(FreezetuneError):
    """Training cannot go on as configured (a non-finite loss: the run diverged)."""


class ResourceError(FreezetuneError):
    """The machine lacks room for the run as configured: disk space for a cache, device memory for a batch."""
