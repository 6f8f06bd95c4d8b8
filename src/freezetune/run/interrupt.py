"""Stopping a run on request: SIGTERM (a cluster preempting the job) and SIGINT (Ctrl-C) end it where its state is
saved, with one line that says how to continue; and the test hook that holds a run at a named moment so the crash
tests can kill it exactly there.

While the training loop runs, a signal is only recorded (``StopRequest.defer``): the loop finishes the step it is
in, saves ``last.pt`` with its position in the epoch and raises ``RunInterrupted``. Elsewhere (set-up, the feature
cache build, the final test) there is nothing to save yet, and a SIGTERM must not wait for a long cache build before
the scheduler's SIGKILL comes: the signal raises ``RunInterrupted`` at once, and every file write being atomic, the
run directory stays resumable or restartable.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from freezetune.errors import setting

STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
# A closed SSH session or terminal window hangs up a run started in it (no nohup, no tmux; a tmux pane killed): stopped
# as by SIGTERM, its place saved. Output to the gone terminal would fail every write: it goes to /dev/null from then on,
# and train.log keeps the stop line. Under nohup (SIGHUP ignored) the run is meant to go on.
HANGUP = getattr(signal, "SIGHUP", None)
if HANGUP is not None:
    STOP_SIGNALS[HANGUP] = "SIGHUP"
# A write into a pipe whose reader left (`nohup train ... | tee log`, the tee gone) stops a run as a signal
# does (``output_closed``): no handler (Python ignores SIGPIPE and raises BrokenPipeError), but its name and exit code.
PIPE_CLOSED = getattr(signal, "SIGPIPE", 13)
_STOP_NAMES = {**STOP_SIGNALS, PIPE_CLOSED: "a closed output pipe"}
# Test hook: ``NAME`` or ``NAME#K`` holds the process the K-th time it reaches ``pause_point(NAME)``, after writing its
# pid to the file named by PAUSE_MARKER_ENV, until that file is deleted.
PAUSE_ENV = "FREEZETUNE_TEST_PAUSE_AT"
PAUSE_MARKER_ENV = "FREEZETUNE_TEST_PAUSE_MARKER"
_pauses_reached: dict[str, int] = {}
# Stopped at once (set-up, cache build, final test; any moment under DDP): the saved state is whatever the run dir held.
# Under torchrun a signal stops the ranks at once, in the training loop too: the ranks could not agree on a step.
AT_ONCE_UNDER_DDP = ("under torchrun, at once (last.pt, where there is one, holds the last finished epoch); --resume "
                     "continues the run, the same command restarts one that has none")  # fmt: skip
OUTSIDE_A_STEP = ("outside a training step (nothing new saved); --resume continues a run that finished an epoch, "
                  "the same command restarts one that did not")  # fmt: skip
# A second Ctrl-C while the first signal waits for the step to end (or for its save): the user does not want to wait.
SECOND_SIGNAL = ("a second time, at once, before the run saved its place (last.pt holds what it held before: the last "
                 "epoch finished or saved); --resume continues from there, the same command restarts a run that had "
                 "none")  # fmt: skip

# A stop recorded for the step's end whose signal also killed the loader's workers, their death ending the step first:
# a console's Ctrl-C on Windows reaches workers as they start, where nothing can block it (``data.workers``)
WORKERS_KILLED = ("before the run saved its place: it also ended the data loader's workers (last.pt holds what it held "
                  "before: the last epoch finished or saved); --resume continues from there, the same command "
                  "restarts a run that had none")  # fmt: skip


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGTERM or SIGINT. A ``KeyboardInterrupt``, so code that catches ``Exception`` (a sweep, a
    recipe) lets it through and a notebook shows an interrupted cell; ``exit_code`` is the shell's 128 + signal.

    >>> RunInterrupted(signal.SIGTERM, "stopped").exit_code
    143
    """

    def __init__(self, signum: int, message: str, where: str = "") -> None:
        super().__init__(message)
        self.signum = signum
        self.where = where  # where it stopped and what is saved, without the advice (a sweep gives its own)

    @classmethod
    def by(cls, signum: int, how: str) -> RunInterrupted:
        """The one line a stop prints: which signal, where it stopped and what is saved, then after "; " how to go on.

        >>> str(RunInterrupted.by(signal.SIGINT, "after epoch 2 (saved in last.pt); continue with --resume"))
        'stopped by SIGINT after epoch 2 (saved in last.pt); continue with --resume'
        """
        return cls(signum, f"stopped by {_STOP_NAMES.get(signum, str(signum))} {how}", how.split("; ", 1)[0])

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def naming(self, run_dir: str | Path) -> RunInterrupted:
        """The same stop of a run whose dir the command did not name (no ``--out``): its advice ("continue with
        --resume") needs it, and nothing had said which of runs/ it was.

        >>> str(RunInterrupted.by(signal.SIGINT, "after epoch 2; continue with --resume").naming("runs/r-1"))
        "stopped by SIGINT after epoch 2; continue with --resume (the run dir: give --out runs/r-1 (out='runs/r-1'))"
        """
        return RunInterrupted(self.signum, f"{self} (the run dir: give {setting('out', str(run_dir))})", self.where)


RESUME = setting("resume", True)  # how a stopped run goes on, in a shell and in a notebook


class StopRequest:
    """Where a run's SIGTERM and SIGINT go while ``listening``: recorded (``defer``) or raised at once.

    >>> stop = StopRequest()
    >>> with stop.listening(defer=True):
    ...     os.kill(os.getpid(), signal.SIGTERM)
    ...     time.sleep(0.01)
    >>> stop.requested, stop.name
    (True, 'SIGTERM')
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.defer = False
        self.at_once = OUTSIDE_A_STEP  # what a signal acted on at once says: where the run stood, what is saved
        self.terminal_fds: set[int] = set()  # standard output and error where they go to a terminal (listening)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return _STOP_NAMES.get(self.signum, str(self.signum))

    def interrupted(self, where: str) -> RunInterrupted:
        """The exception that ends the run after the recorded signal; ``where``: where, and what ``last.pt`` holds."""
        return RunInterrupted.by(self.signum, f"{where}; continue with {RESUME}")

    @contextmanager
    def listening(self, *, defer: bool, at_once: str = OUTSIDE_A_STEP) -> Iterator[StopRequest]:
        """Handle SIGTERM and SIGINT (and SIGHUP, see ``HANGUP``) in this block, then restore the handlers found (a
        notebook's, a caller's).

        Only the main thread may install handlers; elsewhere the block runs with the process's own.
        """
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self.defer, self.at_once = defer, at_once
        # which of the output streams are a terminal, known now: once a hangup has cut it off, isatty says no
        self.terminal_fds = _terminal_fds()
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS if s != HANGUP or _hangup_stops()}
        _listening.append(self)
        try:
            yield self
        except Exception as exc:
            stop = self._killed_workers(exc)
            if stop is None:
                raise
            raise stop from exc
        finally:
            _listening.remove(self)
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    @contextmanager
    def at_once_in(self, where: str) -> Iterator[None]:
        """In this block a stop ends the run at once, saying ``where`` (what is saved, how to go on), as outside the
        training loop: a feature cache's rebuild after an unfreeze, inside the loop, ran to its end first (minutes on
        a large set, past a cluster's grace period) and then trained a step only to save it."""
        kept = self.defer, self.at_once
        self.defer, self.at_once = False, where
        try:
            yield
        finally:
            self.defer, self.at_once = kept

    def _killed_workers(self, exc: Exception) -> RunInterrupted | None:
        """The recorded stop, where ``exc`` ending the block is a loader worker's death: the signal killed the worker
        before the step it was recorded for ended, and the stop is what the command reports (not "a data loader worker
        exited unexpectedly; try --workers 0", exit 2)."""
        if not self.defer or self.signum not in STOP_SIGNALS:  # (a closed output pipe kills no worker)
            return None
        from freezetune.data.workers import worker_death  # (that module imports this one)

        if worker_death(exc) is None:
            return None
        global _raised  # a later error of the dead workers (their loader's shutdown) is this stop's too
        _raised = RunInterrupted.by(self.signum, WORKERS_KILLED)
        return _raised

    def _handle(self, signum: int, frame) -> None:
        if signum == HANGUP:
            _leave_the_terminal(self.terminal_fds)
        if self.defer and self.signum in (None, PIPE_CLOSED):  # a closed pipe is no first signal of the user's
            self.signum = signum  # acted on at the next step boundary
            return
        if self.defer and signum != signal.SIGINT:  # a scheduler's SIGTERM sent twice (to the job, to its step), a
            return  # hangup after it: the save goes on (SIGKILL is the deadline); a second Ctrl-C is the user's
        # not in the training loop, or a second signal: a user pressing Ctrl-C twice does not want to wait (and was
        # told "outside a training step (nothing new saved)" in the middle of an epoch)
        second = self.defer and self.signum is not None
        self.signum = signum
        global _raised
        _raised = RunInterrupted.by(signum, SECOND_SIGNAL if second else self.at_once)
        raise _raised


_listening: list[StopRequest] = []  # the requests handling this process's stops now, the innermost last


def output_closed() -> bool:
    """Record that the run's output pipe lost its reader, as a stop the training loop acts on at its next step (saving
    its place there); whether it was recorded. Outside the training loop (set-up, the cache build, the final test:
    nothing new to save) it is not, and the write's BrokenPipeError ends the command (``cli.main``).

    >>> output_closed()  # no run listening
    False
    """
    stop = _listening[-1] if _listening else None
    if stop is None or not stop.defer:
        return False
    if stop.signum is None:
        stop.signum = PIPE_CLOSED
    return True


def _hangup_stops() -> bool:
    """Whether a SIGHUP stops the run here (``HANGUP``): unless it is ignored (nohup)."""
    return signal.getsignal(HANGUP) is not signal.SIG_IGN


def _terminal_fds() -> set[int]:
    """The descriptors of standard output and error that are a terminal."""
    return {fd for fd in {_fd(s) for s in (sys.__stdout__, sys.__stderr__)} - {None} if os.isatty(fd)}


def _leave_the_terminal(fds: set[int]) -> None:
    """Point the descriptors ``fds`` (standard output and error where they went to a terminal) at /dev/null: a hangup
    has closed the terminal, and a write there fails (EIO) and would end the run before it saved its place, or its stop
    line with exit code 1. Before, a run printing to its terminal was left to SIGHUP's default, killed mid-epoch with
    nothing saved and no line in train.log."""
    for fd in fds:
        to_devnull(fd)


def to_devnull(fd: int) -> None:
    """Point the descriptor ``fd`` at /dev/null: its terminal or pipe is gone, and a write there would fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _fd(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # none, or no descriptor (a notebook's)
        return None


_raised: RunInterrupted | None = None  # the stop a handler raised in this process, if any


def raised_stop() -> RunInterrupted | None:
    """The ``RunInterrupted`` a stop signal raised in this process, if one did. Under torchrun the same SIGTERM also
    kills the loader workers, whose death the DataLoader then reports over the stop (RuntimeError: worker killed):
    the CLI reports the stop instead.

    >>> raised_stop() is None
    True
    """
    return _raised


def forget_stop() -> None:
    """Forget the stop an earlier command raised in this process (``raised_stop``): a notebook or a test calling
    the CLI again had every later failure reported as that stop ("stopped by SIGINT", exit 130)."""
    global _raised
    _raised = None


def pause_point(name: str) -> None:
    """Test hook: hold here when ``FREEZETUNE_TEST_PAUSE_AT`` names this point (see ``PAUSE_ENV``); otherwise free.

    A pause is left only by deleting the marker file, or by a signal: a test kills the process at a known moment
    rather than after a guessed sleep.

    >>> pause_point("step")  # the variable is not set: returns at once
    """
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    target, _, count = wanted.partition("#")
    if target != name:
        return
    _pauses_reached[name] = _pauses_reached.get(name, 0) + 1
    if _pauses_reached[name] != int(count or 1):
        return
    marker = Path(os.environ[PAUSE_MARKER_ENV])
    marker.write_text(str(os.getpid()))
    while marker.exists():
        time.sleep(0.02)
