"""User-facing errors: every mistake a user can make raises a subclass of ``FreezetuneError``.

The CLI turns these into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class FreezetuneError(Exception):
    """Base class of every user-facing error (bad name, bad path, bad config, ...): the CLI prints its message as one
    line and exits with code 2; a notebook catches it by this class.

    >>> from freezetune import TrainConfig, train
    >>> try:
    ...     train(TrainConfig(data="no/such/folder"))
    ... except FreezetuneError as exc:
    ...     print(type(exc).__name__)
    DataError
    """


class SpecError(FreezetuneError):
    """A freeze spec, stage name or schedule that does not match the model."""


class ConfigError(FreezetuneError):
    """An invalid configuration value (all problems are reported together)."""


class MissingExtra(ConfigError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the extra that installs it. An
    ``ImportError`` too: ``try: from freezetune.integrations.lightning import ...`` / ``except ImportError`` works."""


class WeightsError(FreezetuneError):
    """Weights that cannot be found or do not fit the model."""


class DataError(FreezetuneError):
    """A dataset path or format that cannot be read."""


class CheckpointError(FreezetuneError):
    """A checkpoint that is missing, unreadable or does not fit the run."""


def choices(values: Iterable[object], limit: int = 40) -> str:
    """Format valid choices for an error message: ``'a', 'b', 'c'`` (shortened past ``limit``: the first ``limit - 1``,
    how many are left out, the last).

    >>> choices("abcdef", limit=4)
    "'a', 'b', 'c', ... (2 more), 'f'"
    """
    items = [repr(str(v)) for v in values]
    if len(items) > limit:
        items = items[: limit - 1] + [f"... ({len(items) - limit} more)", items[-1]]
    return ", ".join(items)


def shown(value: object) -> str:
    """A value as a message quotes it, cut short: a YAML file's aliases nest a list of ten ten times in 600 bytes,
    whose repr took 14 s and a 52 MB line.

    >>> shown([[1, 2, 3, 4, 5, 6, 7]] * 2), len(shown("x" * 200))
    ('[[1, 2, 3, 4, 5, 6, ...], [1, 2, 3, 4, 5, 6, ...]]', 80)
    """
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, 80, 80
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 6
    return short.repr(value)


def setting(name: str, value: object = None, *, placeholder: bool = False) -> str:
    """A setting as both of its users write it, the command's flag and ``TrainConfig``'s field, for the messages a
    notebook sees as often as a shell does (a run dir in use, a device not there): "pass --resume" alone told a
    Python user nothing to type. ``placeholder``: ``value`` stands for what the user fills in.

    >>> setting("resume", True), setting("final_test", False), setting("device", "cpu"), setting("out")
    ('--resume (resume=True)', '--no-final-test (final_test=False)', "--device cpu (device='cpu')", '--out (out=...)')
    >>> setting("weights", "PATH", placeholder=True)
    '--weights PATH (weights=<path>)'
    """
    flag = "--" + name.replace("_", "-")
    if value is None:
        return f"{flag} ({name}=...)"
    if isinstance(value, bool):
        return f"{flag} ({name}=True)" if value else f"--no-{flag[2:]} ({name}=False)"
    shown = f"<{str(value).lower()}>" if placeholder else repr(value)
    return f"{flag} {value} ({name}={shown})"


def one_line(exc: BaseException) -> str:
    """The line a user sees for ``exc``. A ``DataLoader`` worker re-raises an error in the main process with the
    worker's traceback as its message ("Caught DataError in DataLoader worker process 0. Original Traceback ...");
    the error's own message is that traceback's last line.

    >>> one_line(DataError("Caught DataError in DataLoader worker process 0.\\nOriginal Traceback (most recent call "
    ...     "last):\\n  File ...\\nfreezetune.errors.DataError: cannot read image 'a.jpg': truncated\\n"))
    "cannot read image 'a.jpg': truncated"
    >>> one_line(ConfigError("invalid config: epochs must be >= 1"))
    'invalid config: epochs must be >= 1'
    """
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[-1].removeprefix(f"{type(exc).__module__}.{type(exc).__qualname__}: ")


def os_error_line(exc: OSError) -> str:
    """The line a user sees for an ``OSError`` that ended a command (a full disk, a read-only or vanished run dir):
    every write being atomic, what was written before stays whole.

    >>> os_error_line(OSError(28, "No space left on device", "runs/r1/last.pt"))
    'No space left on device (runs/r1/last.pt); files written before are intact'
    """
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}; files written before are intact"


class TrainingError(FreezetuneError):
    """Training cannot go on as configured (a non-finite loss: the run diverged)."""


class ResourceError(FreezetuneError):
    """The machine lacks room for the run as configured: disk space for a cache, device memory for a batch."""
