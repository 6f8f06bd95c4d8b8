"""The run's log file: every line a run says (the stage table, the auto recipe's trials and choice, each epoch, the
notes, the error or stop that ended it) is kept in its run directory as ``train.log``, each line stamped with the
time. A batch run's story then outlives the terminal it was started in (a tmux scrollback, a closed SSH session,
a notebook's cleared output); ``metrics.csv`` keeps the numbers, this file the words.

Runs nest: the auto recipe's trials and final run are runs of their own inside it, a sweep runs recipes. Each level
keeps its own file (``log(echo)`` around it, ``log_to(dir)`` once its directory is known), and a line goes to the
file of every level it is said in, once per file: the auto recipe's ``train.log`` holds its trials' lines, and each
trial's directory its own. Lines said before a directory exists wait for it; a run that fails before creating its
directory (a wrong data path) leaves no directory for the log, as it leaves none for anything else. Only the first
process of a torchrun job writes (the others say nothing). A log that cannot be written (a full disk) never stops the
run: the checkpoints' writes report that.

>>> with log(print) as say:  # doctest: +SKIP
...     log_to("runs/r1")
...     say("epoch 1/3: ...")  # printed, and appended to runs/r1/train.log with the time
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

LOG_FILE = "train.log"  # a run's; a sweep's directory keeps "sweep.log"
command: str | None = None  # the command line that started this process, when the CLI did (the log's header names it)


class _Level:
    """One level of nesting (a run, a recipe, a sweep): its file, once known, and the lines waiting for it."""

    def __init__(self, name: str) -> None:
        self.name, self.path, self.pending, self.opened = name, None, [], False
        self.warned: set[str] = set()  # the outermost level's: the warnings said in the run (``warn_once``)

    def add(self, text: str) -> None:
        self.pending.append(text)

    def flush(self) -> None:
        if self.path is None or not self.pending or not self.path.parent.is_dir():
            return
        head = [] if self.opened else [_stamped(_header())]  # a resume's lines follow its own header
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join([*head, *self.pending]))
        except OSError:  # the log is a record, not the run: a full disk is reported by the checkpoints' writes
            return
        self.opened, self.pending = True, []


_levels: ContextVar[tuple[_Level, ...]] = ContextVar("freezetune_run_log", default=())


@contextmanager
def log(echo: Callable[[str], None], run_dir: str | Path | None = None, *,
        name: str = LOG_FILE) -> Iterator[Callable[[str], None]]:  # fmt: skip
    """A level of the log around a run: yields the ``echo`` to say its lines with (they go to ``echo`` and to the
    log of this level and of every level around it). ``run_dir``: this level's directory, if known now (else
    ``log_to``). An exception leaving the level is logged as the line the command-line tool prints for it."""
    level = _Level(name)
    outer = _levels.get()
    token = _levels.set((*outer, level))
    if run_dir is not None:
        log_to(run_dir)
    say = echo if outer else _teller(echo)  # the outermost level's echo already tells every level
    warnings = None if outer else _WarningsToLog()  # freezetune's logged warnings, in the log too
    if warnings is not None:
        logging.getLogger("freezetune").addHandler(warnings)
    try:
        yield say
    except BaseException as exc:
        _record(_ending(exc), exc)
        raise
    finally:
        if warnings is not None:
            logging.getLogger("freezetune").removeHandler(warnings)
        level.flush()
        _levels.reset(token)


def warn_once(logger: logging.Logger, msg: str, *args: object) -> None:
    """``logger.warning(msg, *args)``, unless the same warning was said already in this run: the auto recipe's
    trials and final run, and a sweep's recipes, each read the data again, and its warnings came six times over.

    >>> warn_once(logging.getLogger("freezetune.doc"), "%d file(s) left out", 3)  # outside a run: always said
    """
    levels = _levels.get()
    if levels:
        text = msg % args if args else msg
        if text in levels[0].warned:
            return
        levels[0].warned.add(text)
    logger.warning(msg, *args)


class _WarningsToLog(logging.Handler):
    """Puts the warnings freezetune's modules log (stderr's ``WARNING name: message``) in the run's log."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _record(f"{record.levelname} {record.name}: {record.getMessage()}")
        except Exception:  # a log line must never stop the run
            self.handleError(record)


def log_to(run_dir: str | Path) -> None:
    """Give the innermost level without a directory yet ``run_dir``: the run's lines so far, and from now on, are kept
    in its log file once the directory exists."""
    levels = _levels.get()
    for level in reversed(levels):
        if level.path is None:
            level.path = Path(run_dir) / level.name
            if any(other.path is not None and other.path.resolve() == level.path.resolve() for other in levels
                   if other is not level):  # fmt: skip
                level.pending = []  # an outer level keeps this file, and every line said here was said there too
            level.flush()
            return


def _teller(echo: Callable[[str], None]) -> Callable[[str], None]:
    def say(line: str) -> None:
        _record(line)  # first: a closed terminal (a hung-up SSH session) must not cost the log its line
        echo(line)

    return say


def _record(line: str, exc: BaseException | None = None) -> None:
    """Add ``line`` to the log of every level (once per file); ``exc``: the error it tells, logged once per file
    as it leaves level after level."""
    if os.environ.get("RANK", "0") != "0":  # under torchrun the first process alone keeps the log
        return
    told = getattr(exc, "_freezetune_logged", set()) if exc is not None else set()
    text = _stamped(line)
    for level in _levels.get():
        where = level.path.resolve() if level.path is not None else id(level)
        if where in told:
            continue
        told.add(where)
        level.add(text)
        level.flush()
    if exc is not None:
        try:
            exc._freezetune_logged = told
        except AttributeError:  # an exception type without a __dict__: its line may then repeat in an outer file
            pass


def _ending(exc: BaseException) -> str:
    """The line for the exception that ended a level: the one the CLI prints for a user error or a stop, the
    traceback for a bug."""
    from freezetune.errors import FreezetuneError, one_line, os_error_line
    from freezetune.interrupt import RunInterrupted, raised_stop

    stop = exc if isinstance(exc, RunInterrupted) else raised_stop()
    if stop is not None:
        return f"freezetune: {stop}"
    if isinstance(exc, FreezetuneError):
        return f"freezetune: error: {one_line(exc)}"
    if isinstance(exc, OSError):
        return f"freezetune: error: {os_error_line(exc)}"
    if isinstance(exc, KeyboardInterrupt):
        return "freezetune: interrupted"
    return "freezetune: failed:\n" + "".join(traceback.format_exception(exc)).rstrip()


def _header() -> str:
    from freezetune import __version__

    how = command or f"{Path(sys.argv[0]).name or 'python'} (Python API)"
    return f"freezetune {__version__}, pid {os.getpid()}: {how}"


def _stamped(line: str) -> str:
    """Each physical line of ``line`` behind the same time stamp (a table's columns stay aligned)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return "".join(f"{stamp}  {part}\n" for part in str(line).split("\n"))
