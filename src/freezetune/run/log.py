"""The run's log file: every line a run says (the stage table, the auto recipe's trials and choice, each epoch, the
notes, the error or stop that ended it) is kept in its run directory as ``train.log``, each line stamped with the
time. A batch run's story then outlives the terminal it was started in (a tmux scrollback, a closed SSH session,
a notebook's cleared output); ``metrics.csv`` keeps the numbers, this file the words.

Runs nest: the auto recipe's trials and final run are runs of their own inside it, a sweep runs recipes. Each level
keeps its own file (``log(echo)`` around it, ``log_to(dir)`` once its directory is known), and a line goes to the
file of every level it is said in, once per file: the auto recipe's ``train.log`` holds its trials' lines, and each
trial's directory its own. Lines wait until a run has made the directory its own (``opened``: the run-dir and resume
checks passed), so a refused command leaves a run's files as they were, and a run that fails before creating its
directory (a wrong data path) leaves none. Freezetune's logged warnings are kept too, each once a file (and said once
a run: ``warn_once``). Only the first process of a torchrun job writes (the others say nothing). A log that cannot be
written (a full disk) never stops the run: the checkpoints' writes report that.

>>> with log(print) as say:  # doctest: +SKIP
...     log_to("runs/r1"); opened("runs/r1")
...     say("epoch 1/3: ...")  # printed, and appended to runs/r1/train.log with the time
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from freezetune.run.display import PrintableArgs, printable_args
from freezetune.run.interrupt import forget_stop

LOG_FILE = "train.log"  # a run's
SWEEP_LOG = "sweep.log"  # the sweep's lines (its recipes' too), time-stamped; each recipe keeps its train.log
# a folder holding one is a run's or a sweep's: its plots (report.png) are no images of the data it sits in
RUN_LOGS = (LOG_FILE, SWEEP_LOG)
# The first file a run writes in its dir (run.directory names its use), and the first a sweep writes in its --out:
# a folder holding one is freezetune's for certain, and none of its files is data (an image folder read for classes
# leaves it out; a user's own train.log alone, which RUN_LOGS would take for a run's, does not)
RUN_MARK = ".freezetune-run"
SWEEP_SETTINGS = "sweep_config.yaml"  # the settings every recipe of a sweep ran with (its --resume must keep them)
SWEEP_FEATURES = "features"  # the features a sweep's recipes share, in its folder (without --cache-dir)
RUN_FOLDER_MARKS = (RUN_MARK, SWEEP_SETTINGS)
WARNING_FORMAT = "%(levelname)s %(name)s: %(message)s"  # a logged warning, on stderr and in the log
command: str | None = None  # the command line that started this process, when the CLI did (the log's header names it)
# how a character that cannot be written is shown, in the log, on a terminal and in a plot: as its escape. Linux hands
# a file name that is not UTF-8 (an old Latin-1 zip's "d\xf6g/") to Python as a lone surrogate, '\udcf6'
ESCAPE = "backslashreplace"


class _Level:
    """One level of nesting (a run, a recipe, a sweep): its file once known (``path``), whether a run has opened its
    directory as its own (``confirmed``: only then is anything written there), and the lines waiting for both."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path: Path | None = None
        self.confirmed = False
        self.pending: list[str] = []
        self.writes: list[Callable[[], None]] = []  # the directory's other files that wait too (``when_opened``)
        self.opened = False  # the header written, in this process
        self.warned: set[str] = set()  # the warnings this level's log holds (once each)
        self.started = time.time()  # the header's stamp: it is written with the first lines, which waited for it

    def where(self) -> Path | int:
        """What identifies this level's file: its path (resolved when given), or the level itself while it has none."""
        return self.path if self.path is not None else id(self)

    def flush(self) -> None:
        if not (self.confirmed and self.pending and self.path is not None and self.path.parent.is_dir()):
            return
        head = [] if self.opened else [_stamped(_header(), self.started)]  # a resume's lines follow its own header
        try:
            with open(self.path, "a", encoding="utf-8", errors=ESCAPE) as f:  # a name not UTF-8: \udce9
                f.write("".join([*head, *self.pending]))
        except OSError:  # the log is a record, not the run: a full disk is reported by the checkpoints' writes
            return
        self.opened, self.pending = True, []


_levels: ContextVar[tuple[_Level, ...]] = ContextVar("freezetune_run_log", default=())
_lock = threading.Lock()  # lines come from the run's thread and, as logged warnings, from its helper threads


@contextmanager
def log(echo: Callable[[str], None], run_dir: str | Path | None = None, *,
        name: str = LOG_FILE) -> Iterator[Callable[[str], None]]:  # fmt: skip
    """A level of the log around a run: yields the ``echo`` to say its lines with (they go to ``echo`` and to the
    log of this level and of every level around it). ``run_dir``: this level's directory, if known now (else
    ``log_to``); nothing is written there before ``opened`` says the run made it its own. An exception leaving the
    level is logged in its file as the line the command-line tool prints for it.

    Args:
        echo: where the lines are said (``print``, a notebook's list).
        run_dir: the level's directory.
        name: the log file's name in it.

    >>> with log(print) as say:  # doctest: +SKIP
    ...     say("before the directory is known: kept for it")
    """
    level = _Level(name)
    outer = _levels.get()
    if not outer:  # a stop an earlier run of this process raised (a notebook's Ctrl-C) is not this run's
        forget_stop()
    token = _levels.set((*outer, level))
    if run_dir is not None:
        log_to(run_dir)
    say = echo if outer else _teller(echo)  # the outermost level's echo already tells every level
    warnings = None if outer else _WarningsToLog(_levels.get())  # freezetune's logged warnings, in the log too
    if warnings is not None:
        logging.getLogger("freezetune").addHandler(warnings)
    try:
        yield say
    except BaseException as exc:
        _end(level, exc)
        raise
    finally:
        if warnings is not None:
            logging.getLogger("freezetune").removeHandler(warnings)
        with _lock:
            level.flush()
        _levels.reset(token)


def introduced(echo: Callable[[str], None], intro: str) -> Callable[[str], None]:
    """``echo`` that says ``intro`` before its first line: a trial's first line comes once its data is read, so a
    data error (a wrong path, an empty folder) is the one line the user sees, not a plan that never ran."""
    said = False

    def say(line: str) -> None:
        nonlocal said
        if not said:
            said = True
            echo(intro)
        echo(line)

    return say


def indented(echo: Callable[[str], None]) -> Callable[[str], None]:
    """``echo`` for a run nested in another (the auto recipe's trials): each of its lines two spaces in."""
    return lambda line: echo("  " + line.replace("\n", "\n  "))


def first_time(note: str, *, each_recipe: bool = False) -> bool:
    """Whether ``note`` is new to this run (then marked said): the auto recipe's trials and final run, and a sweep's
    recipes, each set up again, and a note about the data came from each. ``each_recipe``: new to each of a sweep's
    recipes (what a recipe's run does, its ``train.log`` holds: the cache it trained on). Outside a run: always new.

    >>> first_time("note: a doc's note")
    True
    """
    levels = _levels.get()
    if not levels:
        return True
    runs = [level for level in levels if level.name == LOG_FILE] if each_recipe else []
    owner = runs[0] if runs else levels[0]
    with _lock:
        new = note not in owner.warned
        owner.warned.add(note)
    return new


def warn_once(logger: logging.Logger, msg: str, *args: object) -> None:
    """``logger.warning(msg, *args)``, unless the same warning was said already in this run: the auto recipe's
    trials and final run, and a sweep's recipes, each read the data again, and its warnings came six times over. The
    log of each level still gets it once (a sweep's second recipe's ``train.log`` too).

    >>> warn_once(logging.getLogger("freezetune.doc"), "%d file(s) left out", 3)  # outside a run: always said
    """
    levels = _levels.get()
    line = _warning_line(logging.WARNING, logger.name, msg % printable_args(args) if args else msg)  # as logged
    if levels and line in levels[0].warned:
        _record(line, warning=True)
        return
    logger.warning(msg, *args)  # the handler logs it (and marks it said)


class _WarningsToLog(logging.Handler):
    """Puts the warnings freezetune's modules log (stderr's ``WARNING name: message``) in the run's log, each once
    per file, and what else the logging set-up lets through (``-v``'s INFO lines, printed on stderr: "every line the
    run printed" lacked them). Bound to its run's levels: a helper thread has none of its own."""

    def __init__(self, levels: tuple[_Level, ...]) -> None:
        super().__init__(logging.NOTSET)  # the loggers' levels decide, as they decide what stderr shows
        self.levels = levels
        self.addFilter(PrintableArgs())  # first of the handlers: stderr's shows the names as the log does

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = _warning_line(record.levelno, record.name, record.getMessage())
            _record(line, warning=record.levelno >= logging.WARNING, levels=_levels.get() or self.levels)
            if self._alone(logging.getLogger(record.name)) and first_process():
                print(line, file=sys.stderr)
        except Exception:  # a log line must never stop the run
            self.handleError(record)

    def _alone(self, logger: logging.Logger) -> bool:
        """Whether no other handler shows the warning: the Python API without logging set up (a notebook, a script).
        This handler then stands in for logging's last resort, which any handler at all turns off: a notebook saw
        none of the data's warnings (test images that are copies of training images among them)."""
        while logger is not None:
            if any(h is not self and not isinstance(h, _WarningsToLog) for h in logger.handlers):
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        ours = [h for h in logging.getLogger("freezetune").handlers if isinstance(h, _WarningsToLog)]
        return ours[:1] == [self]  # runs in two threads at once: the first run's handler says it, once


def _warning_line(levelno: int, name: str, text: str) -> str:
    """A logged warning as stderr shows it (the command line's logging format is ``WARNING_FORMAT``)."""
    return WARNING_FORMAT % {"levelname": logging.getLevelName(levelno), "name": name, "message": text}


def log_to(run_dir: str | Path) -> None:
    """Give the innermost level without a directory yet ``run_dir``: the run's lines so far, and from now on, are kept
    in its log file once a run there has ``opened`` it."""
    levels = _levels.get()
    for level in reversed(levels):
        if level.path is None:
            level.path = Path(run_dir).resolve() / level.name  # resolved once: every line compares it
            if any(other.where() == level.where() for other in levels if other is not level):
                level.pending = []  # an outer level keeps this file, and every line said here was said there too
            return


def opened(run_dir: str | Path) -> None:
    """A run made ``run_dir`` its own (it passed the run-dir checks and the resume's, and writes its files now):
    the logs there and in the directories around it (an auto recipe's, a sweep's) are written from now on, and the
    files that waited for it (``when_opened``). Before, a refused command left a run's ``train.log`` untouched."""
    run_dir = Path(run_dir).resolve()
    with _lock:
        levels = [lv for lv in _levels.get() if lv.path is not None and run_dir.is_relative_to(lv.path.parent)]
        writes = [write for level in levels for write in level.writes]
        for level in levels:
            level.confirmed, level.writes = True, []
    for write in writes:  # outside the lock: a write's logged warning takes it
        write()
    with _lock:
        for level in levels:
            level.flush()


def when_opened(run_dir: str | Path, write: Callable[[], None]) -> None:
    """Call ``write`` (it writes a file of ``run_dir``'s own: a sweep's settings) once a run has made ``run_dir`` its
    own (``opened``), as the lines of its log wait: a refused resume leaves the file as it was. At once where that
    happened already, or where no level of the log has ``run_dir`` (``log_to``)."""
    run_dir = Path(run_dir).resolve()
    with _lock:
        level = next((lv for lv in _levels.get() if lv.path is not None and lv.path.parent == run_dir), None)
        if level is not None and not level.confirmed:
            level.writes.append(write)
            return
    write()


def _teller(echo: Callable[[str], None]) -> Callable[[str], None]:
    def say(line: str) -> None:
        _record(line)  # first: a closed terminal (a hung-up SSH session) must not cost the log its line
        echo(line)

    return say


def _record(line: str, *, warning: bool = False, levels: tuple[_Level, ...] | None = None) -> None:
    """Add ``line`` to the log of every level (once per file; a ``warning`` once per level)."""
    if not first_process():
        return
    text, told = _stamped(line), set()
    with _lock:
        for level in _levels.get() if levels is None else levels:
            if level.where() in told or (warning and line in level.warned):
                continue
            told.add(level.where())
            if warning:
                level.warned.add(line)
            level.pending.append(text)
            level.flush()


def _end(level: _Level, exc: BaseException) -> None:
    """Log the line of the exception leaving ``level`` in its file, once a file: the same exception leaves the levels
    around it too (the auto recipe's final run shares its directory), and a level around it that words it anew (a
    trial's stop, said as the recipe's) logs its own line."""
    if not first_process():
        return
    told = getattr(exc, "_freezetune_logged", set())
    if level.where() in told:
        return
    # the file's first level writes it: one that shares it (the auto recipe's final run) never wrote its header, and
    # put a second one, stamped at its start, in front of the stop line
    owner = next((other for other in _levels.get() if other.where() == level.where()), level)
    with _lock:
        owner.pending.append(_stamped(ending_line(exc)))
        owner.flush()
    try:
        exc._freezetune_logged = {*told, level.where()}
    except AttributeError:  # an exception type without a __dict__: its line may then repeat in an outer file
        pass


def first_process() -> bool:
    """Under torchrun the first process alone keeps the log (read from the environment: a level may open before
    the process group is joined)."""
    return os.environ.get("RANK", "0") == "0"


def first_on_machine() -> bool:
    """Under torchrun the first process of each machine says a command's user error (``cli.main``): a path missing
    on one node is said there, and one line comes per machine, not one per process."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def ending_line(exc: BaseException) -> str:
    """The line for the exception that ended a run, as ``cli.main`` prints it, in its order: a user error, a full
    disk, a stop; for another error after a stop signal, the stop (what it broke); else the traceback.

    >>> from freezetune.errors import DataError
    >>> ending_line(DataError("no class folders"))
    'freezetune: error: no class folders'
    """
    from freezetune.errors import FreezetuneError, one_line, os_error_line
    from freezetune.run.interrupt import RunInterrupted, raised_stop

    if isinstance(exc, FreezetuneError):
        return f"freezetune: error: {one_line(exc)}"
    if isinstance(exc, BrokenPipeError) and _output_closed():  # the reader of its output left, as cli.main says
        return "freezetune: stopped: its output pipe was closed"
    if isinstance(exc, OSError):
        return f"freezetune: error: {os_error_line(exc)}"
    if isinstance(exc, RunInterrupted):
        return f"freezetune: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "freezetune: interrupted"
    stop = raised_stop()
    if stop is not None:
        return f"freezetune: {stop}"
    from freezetune.cli.exit import PEER_GONE, peer_gone

    if peer_gone(exc, remote_only=True):  # under torchrun: another rank ended (cli.main says the same)
        return f"{PEER_GONE} ({one_line(exc)})"
    return "freezetune: failed:\n" + "".join(traceback.format_exception(exc)).rstrip()


def _output_closed() -> bool:
    from freezetune.cli.exit import reader_gone

    return reader_gone(sys.stdout) or reader_gone(sys.stderr)


def _header() -> str:
    from freezetune import __version__
    from freezetune.run.versions import versions_line

    how = command or f"{Path(sys.argv[0]).name or 'python'} (Python API)"
    return f"freezetune {__version__} ({versions_line()}), pid {os.getpid()}: {how}"


def _stamped(line: str, when: float | None = None) -> str:
    """Each physical line of ``line`` behind the same time stamp, ``when``'s or now's (a table's columns stay
    aligned)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    return "".join(f"{stamp}  {part}\n" for part in str(line).split("\n"))
