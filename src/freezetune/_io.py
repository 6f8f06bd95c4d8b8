"""Atomic file writes: a crash or an exception mid-write never leaves a truncated checkpoint, CSV or plot behind.

Every writer goes to a temporary file in the *same directory* as the target (so ``os.replace`` is a rename on one
filesystem, which POSIX and Windows make atomic), fsyncs it, then replaces the target. On failure the temporary
file is removed and the old target is left untouched. A process killed outright (SIGKILL, power cut) runs no cleanup:
its temporary files are removed by ``remove_stale_temps`` when the run directory is next prepared.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from freezetune.run.interrupt import pause_point

# ``.NAME.PID.RANDOM.tmp``: the writer's pid tells a leftover of a dead process from a file being written now.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it replaces ``path``, on an exception it is deleted.

    For writers that want a file name rather than a file object (``Figure.savefig``). Parent directories are created.

    Args:
        path: The final destination.

    Yields:
        An empty, already-created temporary file in the same directory.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_output(target) as tmp:
    ...     _ = tmp.write_text("hello")
    >>> target.read_text()
    'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of our own (not mkstemp) so the file is created with the normal umask-derived mode: mkstemp's 0600
    # would make checkpoints unreadable to the rest of a team after the rename.
    tmp = path.parent / f".{_temp_stem(path.name)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb"):
            pass
        yield tmp
        _fsync_path(tmp)
        pause_point(f"rename:{path.name}")
        _replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # on a read-only mount the unlink fails too, and its error named the tmp
            tmp.unlink(missing_ok=True)
        # a failed write names no file ("No space left on device", said of nothing), the hidden temporary one
        # names a file the user never sees: name the user's path instead
        if exc.errno is not None and exc.filename in (None, str(tmp)):
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


_NAME_MAX = 255  # bytes of a file name on Linux's, macOS's and Windows' file systems
_TEMP_EXTRA = len(f".{2**22}.01234567.tmp") + 1  # what a temporary name adds, the dot before it too


def _temp_stem(name: str) -> str:
    """``name`` as its temporary file's name holds it: cut, with a digest of the whole, where the temporary name would
    pass the file system's limit (an export named 240 characters failed in "File name too long", naming a file the
    user had not named).

    >>> _temp_stem("best.pt"), len(_temp_stem("m" * 250).encode())
    ('best.pt', 233)
    """
    room = _NAME_MAX - _TEMP_EXTRA
    if len(name.encode()) <= room:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    cut = name.encode()[: room - len(digest) - 1].decode(errors="ignore")
    return f"{cut}~{digest}"


# Windows refuses to replace a file another process has open (a user's eval reading best.pt, TensorBoard, a virus
# scanner or the search indexer looking at the new file) with a PermissionError; such holds last milliseconds to a
# second, so the rename is tried again for a while before the error stands.
_REPLACE_RETRY_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def _replace(tmp: Path, path: Path) -> None:
    for wait in (*_REPLACE_RETRY_S, None) if sys.platform == "win32" else (None,):
        try:
            os.replace(tmp, path)
            return
        except PermissionError:
            if wait is None:
                raise
            time.sleep(wait)


def remove_stale_temps(directory: str | Path, *, min_age_s: float = 0.0) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left anywhere under ``directory``.

    Only files named as ``atomic_output`` names them, and only those of processes that no longer run: another live
    process may be writing its file now. (Off POSIX, where liveness cannot be probed safely, nothing is removed.)
    ``min_age_s``: only files untouched that long (a folder shared with other machines or containers, whose pids
    mean nothing here).

    Returns:
        The files removed.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / ".last.pt.999999999.0123abcd.tmp").write_text("half")
    >>> [p.name for p in remove_stale_temps(d)]
    ['.last.pt.999999999.0123abcd.tmp']
    """
    return _remove_dead(sorted(Path(directory).rglob(".*.tmp")), min_age_s)


def remove_stale_temps_of(paths: Iterable[str | Path]) -> list[Path]:
    """``remove_stale_temps`` of the files ``paths`` alone, beside each (an export's target folder is the user's: its
    other files, and the folders below it, are not looked at): a killed export left a hidden copy of its weights
    (45 MB for a ResNet-18) that no later export removed.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / ".m.onnx.999999999.0123abcd.tmp").write_text("half")
    >>> _ = (d / ".m.onnx.bak.999999999.0123abcd.tmp").write_text("another file's")
    >>> [p.name for p in remove_stale_temps_of([d / "m.onnx"])]
    ['.m.onnx.999999999.0123abcd.tmp']
    """
    found = []
    for path in map(Path, paths):
        stem = _temp_stem(path.name)
        temps = sorted(path.parent.glob(f".{glob.escape(stem)}.*.tmp"))  # .m.onnx.bak's too: named apart below
        found += [t for t in temps if (m := _TEMP_NAME.match(t.name)) and m["name"] == stem]
    return _remove_dead(found, 0.0)


def _remove_dead(paths: list[Path], min_age_s: float) -> list[Path]:
    """Delete those of ``paths`` named as ``atomic_output`` names its files whose writer no longer runs."""
    removed, now = [], time.time()
    for path in paths:
        match = _TEMP_NAME.match(path.name)
        if not (match and path.is_file()) or (min_age_s > 0 and _age(path, now) < min_age_s):
            continue
        if not process_running(int(match["pid"])):
            try:  # another user's, in a shared folder, or a read-only one: left, not a reason to stop the writer
                path.unlink(missing_ok=True)
            except OSError:
                continue
            removed.append(path)
    return removed


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs here (True off POSIX, where it cannot be probed safely, and for this process)."""
    if os.name != "posix" or pid == os.getpid():
        return True  # Windows' os.kill(pid, 0) would terminate the process, not probe it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines kept as given) to ``path`` atomically.

    Args:
        path: Destination file; parent directories are created.
        text: The full new content.

    Returns:
        ``path`` as a ``Path``.

    >>> import tempfile
    >>> p = atomic_write_text(Path(tempfile.mkdtemp()) / "a.txt", "x,y\\n1,2\\n")
    >>> p.read_text()
    'x,y\\n1,2\\n'
    """
    # surrogateescape: a file name that is not UTF-8 (listed in skipped.txt) is written back as its own bytes
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write(text)
    return Path(path)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: the old file survives if pickling or the disk write fails.

    Args:
        obj: Anything ``torch.save`` accepts (a checkpoint dict, a state dict, a tensor).
        path: Destination file; parent directories are created.

    Returns:
        ``path`` as a ``Path``.

    >>> import tempfile
    >>> p = atomic_save({"step": 3}, Path(tempfile.mkdtemp()) / "ckpt.pt")
    >>> torch.load(p)["step"]
    3
    """
    try:
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as exc:  # torch's zip writer turns a failed write (a full disk) into its own RuntimeError:
        failed = exc.__cause__ or exc.__context__  # the CLI printed a 40-line traceback with exit code 1
        if isinstance(failed, OSError) and failed.errno is not None:
            raise OSError(failed.errno, failed.strerror, str(path)) from exc
        raise
    return Path(path)


def _fsync_path(path: Path) -> None:
    # Flush the data to disk before the rename; otherwise a power cut can leave a renamed but empty file.
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    # Persist the rename itself. Directories cannot be opened for fsync on Windows; the rename is still atomic there.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
