"""How a ``freezetune`` command ends when it does not finish: a stop signal's line and exit code, a closed output
pipe (``predict ... | head``), and what a stopped command has kept; and how a torchrun rank's process ends.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import signal
import stat
import sys
import time

from freezetune.run.interrupt import PIPE_CLOSED, RunInterrupted, StopRequest, output_closed, to_devnull
from freezetune.run.log import first_process

# what a command that stops before its end has kept (Ctrl-C, its output pipe closed)
SAVED = {
    "train": "last.pt, where there is one, holds the last finished epoch (--resume continues; the same command "
    "restarts a run that has none)",
    "sweep": "--resume continues the sweep",
}


# A train or sweep command stopped outside its runs' own handling (importing torch, reading the config, between a
# sweep's runs): the default SIGTERM ended it with 143 and nothing said.
OUTSIDE_A_RUN = {
    "train": "before the run started (nothing new saved); the same command runs it again",
    "sweep": "outside its recipes' runs; --resume continues the sweep (the same command starts one that recorded "
    "nothing yet)",
}


def stops(command: str):
    """SIGTERM, SIGINT (and SIGHUP, as a run takes it) end ``eval``, ``predict``, ``export`` and ``inspect`` with one
    line and 128 + the signal, through the writers' cleanup: killed by the default SIGTERM, an export left its hidden
    temporary file and said nothing. A run handles its own, to save its place first; outside it, a ``train`` or
    ``sweep`` command says where it stopped (``OUTSIDE_A_RUN``)."""
    where = OUTSIDE_A_RUN.get(command, f"before {command} finished (no file is left half-written)")
    return StopRequest().listening(defer=False, at_once=where)


class _PipeGuard:
    """A run's standard output or error: a write into a pipe whose reader left (``nohup train ... | tee log``, the
    tee gone; a log reader that died) is a stop the training loop acts on at its next step, saving its place first
    (``interrupt.output_closed``); the stream goes to /dev/null from then on. Its BrokenPipeError ended the run at
    once: between an epoch's line and its save, the finished epoch was lost. Outside the loop the error stands."""

    def __init__(self, stream) -> None:
        self.wrapped = stream  # what a check of the stream's kind looks at (a notebook's, epoch_log.progress_bar)
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError as exc:
            self._closed(exc)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError as exc:
            self._closed(exc)

    def _closed(self, exc: BrokenPipeError) -> None:
        if not (reader_gone(self._stream) and output_closed()):
            raise exc
        _to_devnull(self._stream)

    def __getattr__(self, name: str):  # fileno, isatty, encoding, reconfigure
        return getattr(self._stream, name)


def guard_output(command: str) -> tuple:
    """Put a run's (train, sweep) standard output and error behind ``_PipeGuard``; the streams found, to put back.
    Before logging's handler takes standard error, and before a progress bar does."""
    found = sys.stdout, sys.stderr
    if command in ("train", "sweep"):
        sys.stdout, sys.stderr = (_PipeGuard(s) if _pipe(s) else s for s in found)
    return found


def _pipe(stream) -> bool:
    """Whether ``stream`` writes into a pipe or a socket, whose reader can go (a file, a terminal, a notebook's
    stream cannot)."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # no file descriptor: a notebook's, a test's capture
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def reader_gone(stream) -> bool:
    """Whether ``stream`` is a pipe whose reader has closed it (``predict ... | head``); a broken pipe elsewhere (a
    DataLoader worker's) is an error of the run."""
    try:
        poll = select.poll()
        poll.register(stream.fileno(), select.POLLOUT)
        # Linux says POLLERR of a pipe's writing end without a reader; BSD and macOS say POLLHUP
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor (a notebook's stream)
        return False


def pipe_closed(saved: str | None) -> int:
    """Stop as a command the shell's SIGPIPE ends does (exit 141): quietly where the reader took what it wanted
    (``predict ... | head``); a run stopped that way says so on stderr, with what it ``saved``. Standard output goes to
    /dev/null, or the interpreter's last flush fails again on the way out; so does standard error when it went into
    the same closed pipe (``train ... 2>&1 | head``), where that line had no reader either and ended the command with
    a second broken pipe and exit code 1."""
    _to_devnull(sys.stdout)
    if reader_gone(sys.stderr):
        _to_devnull(sys.stderr)
    if saved:
        print(f"freezetune: stopped: its output pipe was closed; {saved}", file=sys.stderr)
    return 128 + signal.SIGPIPE


def _to_devnull(stream) -> None:
    to_devnull(stream.fileno())


def stopped(stop: RunInterrupted) -> int:
    """The stop's one line (under torchrun, rank 0's alone: every rank got the same signal); 128 + the signal. A run
    stopped by its closed output pipe says it on standard error unless that went into the same pipe (then its
    ``train.log`` says it)."""
    if stop.signum == PIPE_CLOSED:
        for stream in (sys.stdout, sys.stderr):
            if reader_gone(stream):
                _to_devnull(stream)
    if first_process():
        # torchrun ends every process of the job with SIGTERM once one of them ends (a signal to it alone, killed
        # for memory, an error of its own): rank 0 then said "stopped by SIGTERM" of a signal nobody had sent
        sent = (" (under torchrun: sent to the job, or by torchrun to every process once another one of them ended)"
                if stop.signum == signal.SIGTERM and under_torchrun() else "")  # fmt: skip
        print(f"freezetune: {stop}{sent}", file=sys.stderr)
    return stop.exit_code


# rank 0's line when another process of the job ended under it (a signal to that process alone, an error of its own)
PEER_GONE = ("freezetune: stopped: another process of this torchrun job ended (a signal to it, or its own error); "
             "last.pt, where there is one, holds the last epoch saved (--resume continues)")  # fmt: skip


def peer_gone(exc: BaseException, *, remote_only: bool = False) -> bool:
    """Whether ``exc`` is this rank's torchrun connection broken by another process of the job ending (rank 0
    stopped on a user error and said why): gloo's "Connection closed by peer", NCCL's remote error. Only under
    torchrun (``WORLD_SIZE`` above 1): a single process's reset connection (a download) is an error of its own.
    ``remote_only`` (rank 0's test): the words of a remote end alone, not any NCCL error (an out-of-memory inside
    NCCL is rank 0's own, and its traceback the only place it is said).

    >>> closed = RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1234")
    >>> peer_gone(closed)  # one process: not a torchrun peer's
    False
    >>> os.environ["WORLD_SIZE"] = "2"; peer_gone(closed); del os.environ["WORLD_SIZE"]
    True
    """
    import torch.distributed as dist

    if not under_torchrun():
        return False
    backend_error = getattr(dist, "DistBackendError", ())
    text = str(exc)
    remote = isinstance(exc, RuntimeError) and any(words in text for words in _REMOTE_END)
    return remote or (not remote_only and isinstance(exc, backend_error))


# how gloo and NCCL say that the other end of a connection went away
_REMOTE_END = ("Connection closed by peer", "Connection reset by peer", "remote process exited", "ncclRemoteError")


LATER_RANK_WAITS_S = 3.0  # how long a later rank holds its error line back for the first rank's (see ``later_rank``)


def later_rank(line: str, code: int) -> int:
    """End a process of a torchrun job other than the first (of its machine) on an error: the first process says the
    same line, and torchrun ends the others as soon as one exits, so this one waits for it to, then says its own line
    only if nobody ended it meanwhile (an error of this rank alone: a path missing on its node). Exiting at once, a
    rank 1 faster than rank 0 had the job killed before any line was said."""
    time.sleep(LATER_RANK_WAITS_S)
    if line:
        print(f"[rank {os.environ.get('RANK', '?')}] {line}", file=sys.stderr)
    return code


def under_torchrun() -> bool:
    """Whether this process is one of a torchrun job's (``WORLD_SIZE`` above 1, as ``distributed.init_from_env``
    reads it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def end_torchrun_process(code: int) -> None:
    """End a torchrun rank's process with ``code`` now that its command has returned: flush the output, run the
    ``atexit`` functions (run.lock's, logging's), then leave without the interpreter's teardown.

    That teardown (freeing what torch, Gloo and DDP left behind, after the process group was destroyed) aborted a
    rank that had finished its run: "terminate called without an active exception", SIGABRT with no Python frame,
    in 2 of about 340 two-process CPU runs on a loaded 2-core machine, and torchrun then reported the whole job as
    failed (exit 1) after its test accuracy was printed and its files written. Nothing is left to save by then.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more can be said there
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(code)
