"""One run directory, one process: a second freezetune process that would write into a run directory in use is
refused.

Two runs started on one ``--out`` (two tmux panes, a shell loop's ``&``, a ``--resume`` typed twice) both passed the
run-dir checks, wrote each other's ``metrics.csv`` rows and checkpoints, and both exited 0: one scored the other's
``best.pt`` under its own name. A run stopped before its first epoch looks like one still in its first epoch, so no
check of the files can tell them apart; a lock held by the live process can.

The lock is an ``flock`` on a file named after the directory's absolute path (``_identity``: its names casefolded in a
folder that finds names whatever their case, as macOS's do) in a per-user folder under ``/tmp`` (``LOCK_ROOT``,
whatever ``TMPDIR`` says; the temp dir where there is no ``/tmp`` to write in), not in the run directory itself: a
refused command leaves the user's folder as it was, and a run not yet set up creates nothing (the run dir is made once
the model and data are ready). The kernel drops an ``flock`` when its process dies, even by SIGKILL: no stale lock is
left to clear. It guards the processes of one machine, batch jobs with a ``TMPDIR`` of their own included; a job
given a ``/tmp`` of its own (a container, a scheduler's private ``/tmp``), or another machine on a network folder, is
not seen. Only a private folder of the user's is used (another user's could hold links to this user's files); without
one, or without ``fcntl`` (Windows), nothing is locked.

Claims are re-entrant within the process (the auto recipe claims its directory, then its final run claims it again)
and are released when the ``scope`` they were made in ends: the outermost ``train`` or ``sweep`` call.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import itertools
import logging
import multiprocessing
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from freezetune.errors import ConfigError, setting
from freezetune.run.log import warn_once

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

_held: dict[str, tuple[int, Path]] = {}  # directory (_identity) -> its lock file's descriptor and path, held here
# a scope's claims: the directories (for people) and their identities (for release)
_scope: ContextVar[tuple[list[Path], list[str]] | None] = ContextVar("freezetune_run_lock_scope", default=None)


class RunDirInUse(ConfigError):
    """Another process is running in the run directory."""


def claim(run_dir: str | Path) -> None:
    """Hold ``run_dir`` for this process until the enclosing ``scope`` ends (the process's end without one).

    Raises:
        RunDirInUse: another process holds it (its pid named).

    >>> import tempfile
    >>> with scope():
    ...     claim(tempfile.mkdtemp())
    """
    _refuse_in_a_starting_worker()
    if fcntl is None:
        return
    run_dir = Path(run_dir).resolve()  # one directory, whichever path (a link, a relative one) names it
    key = _identity(run_dir)
    if key in _held:  # claimed by this process already: its outermost claim releases it
        return
    try:
        _held[key] = _lock(run_dir, key)
    except OSError as exc:  # no private lock folder to be had: the run goes on unguarded, said once
        warn_once(log, "run dirs are not locked against a second process: %s (%s)", exc.strerror or exc, exc.filename)
        return
    claims = _scope.get()
    if claims is not None:
        claims[0].append(run_dir)
        claims[1].append(key)


def _identity(run_dir: Path) -> str:
    """``run_dir`` (resolved) as its lock names it: each name casefolded where the folder holding it finds names
    whatever their case (macOS's file systems by default), so that ``--out runs/A`` and ``--out runs/a``, one folder
    there, are one lock (they were two, and two runs wrote into it). A folder not made yet, or with no name to try,
    is taken to be as the one holding it: the name is the same before and after the run makes its folders."""
    names, folds, folder = [], False, Path(run_dir.anchor)
    for name in run_dir.parts[1:]:
        found = _folds_case(folder) if folder.is_dir() else None
        folds = folds if found is None else found
        names.append(name.casefold() if folds else name)
        folder = folder / name
    return str(Path(run_dir.anchor, *names))


def _folds_case(folder: Path) -> bool | None:
    """Whether ``folder`` finds its entries whatever the case of their names: one of them is the same file under its
    name in the other case. None where it has no entry to try (or cannot be listed)."""
    try:
        with os.scandir(folder) as entries:  # (the first few: a folder of many files is not read through)
            probe = next((folder / e.name for e in itertools.islice(entries, 64) if _swappable(e.name)), None)
    except OSError:
        return None
    try:
        found = os.lstat(probe) if probe is not None else None
    except OSError:  # gone since it was listed
        found = None
    if found is None:
        return None
    try:
        return os.path.samestat(found, os.lstat(probe.with_name(probe.name.swapcase())))
    except OSError:  # not found in the other case: a folder that tells names apart by case
        return False


def _swappable(name: str) -> bool:
    return name.isascii() and name.swapcase() != name


def _refuse_in_a_starting_worker() -> None:
    """Refuse a run started by a worker process (a data loader's) as it imports the user's script.

    A spawned process (macOS's and Windows' start method) starts by running the script that started the run, as
    ``__mp_main__``: a script that calls ``train`` outside ``if __name__ == "__main__":`` then starts the run again
    in each loader worker. Each was refused as "in use by another freezetune process" (the user's own, by pid), or,
    without ``out``, left a new run directory of its own, and Python's hint came after three runs' output. The flag
    is the one multiprocessing itself checks before a process starts another (``_check_not_importing_main``).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        script = sys.argv[0] if sys.argv and sys.argv[0] else "your script"  # (the parent's argv, handed over)
        raise ConfigError(f"a freezetune run was started in a worker process while it imported {script}: on macOS "
                          "and Windows each loader worker starts by importing the script, so the code that trains "
                          "must sit under `if __name__ == \"__main__\":`")  # fmt: skip


@contextmanager
def scope() -> Iterator[list[Path]]:
    """Release the claims made inside at its end (a nested scope's own claims at the nested scope's end); yields
    them, in the order made (a run's own dir first)."""
    claims: tuple[list[Path], list[str]] = ([], [])
    token = _scope.set(claims)
    try:
        yield claims[0]
    finally:
        _scope.reset(token)
        for key in reversed(claims[1]):
            _release(key)


# the machine's temp dir, whatever TMPDIR says: a batch job's TMPDIR of its own (a scheduler's per-job folder) hid
# one job's lock from the other's, and two jobs wrote one --out
LOCK_ROOT = "/tmp"


def _lock_root() -> str:
    """Where the lock folder is made: ``LOCK_ROOT`` where it is a folder this process may write in, else the temp
    dir."""
    return LOCK_ROOT if os.path.isdir(LOCK_ROOT) and os.access(LOCK_ROOT, os.W_OK | os.X_OK) else tempfile.gettempdir()


def _lock_file(key: str) -> Path:
    folder = Path(_lock_root()) / f"freezetune-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    # a folder another user made first (the temp dir is shared) could hold links to this user's files, which the
    # pid would be written into: only a private folder of this user's is used
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(errno.EPERM, "the lock folder is not a private folder of this user's", str(folder))
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.lock"


def _lock(run_dir: Path, key: str) -> tuple[int, Path]:
    """An open descriptor holding ``run_dir``'s lock (named by ``key``, its ``_identity``), and its file. The file is
    unlinked on release; a descriptor locked on a file just unlinked (a release raced the open) is retried on the file
    now there."""
    path = _lock_file(key)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirInUse(f"'{run_dir}' is in use by another freezetune process (pid {holder}): wait for it to "
                              f"end, or give another {setting('out')}") from None  # fmt: skip
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, path


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies: a lock lasts while any copy is open, and a run killed
    by SIGKILL kept its directory locked for the seconds its workers took to notice (the same command, re-run at
    once, was refused). Closing a copy leaves the parent's lock in place."""
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _release_all() -> None:  # the claims made outside a scope (a Trainer built directly): their files go too
    for key in list(_held):
        _release(key)


def _release(key: str) -> None:
    fd, path = _held.pop(key, (None, None))
    if fd is None:
        return
    try:
        os.unlink(path)  # while still locked: a process that opened this file retries on the one now there
    except FileNotFoundError:
        pass
    os.close(fd)
