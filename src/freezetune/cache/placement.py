"""Where a feature store is put: the GPU when it fits half of the free memory, else (pinned) RAM when it fits half of
the available RAM, else a file mapped from the spill folder and removed from it at once (``allocate``)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from freezetune.cache.disk import ensure_space
from freezetune.device.hardware import available_device_memory, available_ram
from freezetune.device.memory import ran_out_of_ram
from freezetune.device.precision import Precision
from freezetune.errors import ResourceError

log = logging.getLogger(__name__)


@dataclass
class CacheInfo:
    """Where and how big a built cache is (printed at build time)."""

    place: str  # "gpu" | "pinned" | "cpu" | "disk"
    bytes: int
    budget: int
    views: int
    shape: tuple[int, ...]

    def describe(self) -> str:
        mib = 2**20
        return (f"{self.views} view(s) x {tuple(self.shape)} features, {self.bytes / mib:,.0f} MiB on {self.place} "
                f"(budget {self.budget / mib:,.0f} MiB)")  # fmt: skip


def allocate(shape: tuple[int, ...], dtype: torch.dtype, precision: Precision, spill_dir: str | Path, place: str,
             zeroed: bool = False) -> tuple[torch.Tensor, CacheInfo]:  # fmt: skip
    """An uninitialised (``zeroed``: zero) store of ``shape``, where ``place`` (``store.PLACES``) puts it."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    new = torch.zeros if zeroed else torch.empty
    if precision.device.type == "cuda" and place == "auto":  # "memory" is RAM: the GPU's stays for the batches
        free = available_device_memory(precision.device) // 2
        gpu = _if_it_fits(lambda: new(shape, dtype=dtype, device=precision.device), nbytes, "the GPU", place) \
            if nbytes <= free else None  # fmt: skip
        if gpu is not None:
            return gpu, CacheInfo("gpu", nbytes, free, *_vs(shape))
    ram = available_ram() // 2
    if place == "memory" and nbytes > ram:
        log.warning(
            "feature cache needs %d MiB, over the RAM budget of %d MiB: spilling to disk", nbytes >> 20, ram >> 20
        )
    if nbytes <= ram and place != "disk":
        pinned = precision.device.type == "cuda"
        t = _if_it_fits(lambda: new(shape, dtype=dtype, pin_memory=pinned), nbytes, "RAM", place)
        if t is not None:
            return t, CacheInfo("pinned" if pinned else "cpu", nbytes, ram, *_vs(shape))
    return _map_file(shape, dtype, nbytes, Path(spill_dir)), CacheInfo("disk", nbytes, ram, *_vs(shape))


def _if_it_fits(make: Callable[[], torch.Tensor], nbytes: int, where: str, place: str) -> torch.Tensor | None:
    """``make()``, or None where the memory runs out though the budget had room (a limit on the process's memory,
    ulimit -v; another process took it): the store goes to the next place, as a store over the budget does. It
    ended the run in the out-of-memory line of a training step ("try --batch-size 16"), which the store's size does
    not depend on."""
    try:
        return make()
    except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not (isinstance(exc, torch.cuda.OutOfMemoryError) or ran_out_of_ram(exc) or "out of memory" in str(exc)):
            raise
    # asked for by --cache memory, a spill is a warning (as over the budget); under auto, the next place is the plan
    (log.warning if place == "memory" else log.info)(
        "feature cache needs %d MiB, which %s could not allocate: %s", nbytes >> 20, where,
        "trying RAM" if where == "the GPU" else "spilling to disk",
    )  # fmt: skip
    return None


def _map_file(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int, folder: Path) -> torch.Tensor:
    """A store of ``shape`` in a file of ``folder`` with its blocks reserved (zeros), mapped, then unlinked.

    Raises:
        ResourceError: the disk (or a file-size limit) has no room for it.
    """
    path = folder / "feature_cache.bin"
    folder.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a rebuilt cache has another shape; an old mapping stays valid until dropped
    ensure_space(folder, nbytes, _DISK_HINT)
    try:
        _reserve(path, nbytes)
        # a new file reads as zeros, reserved blocks too: what ``zeroed`` asks for
        t = torch.from_file(str(path), shared=True, size=torch.Size(shape).numel(), dtype=dtype).view(shape)
    except (OSError, RuntimeError) as exc:
        path.unlink(missing_ok=True)  # blocks reserved before the disk filled go back
        with contextlib.suppress(OSError):
            folder.rmdir()
        code = _errno_of(exc)
        if code == errno.ENOMEM:  # a limit on the process's memory (ulimit -v) counts a mapping too
            raise ResourceError(f"the feature cache ({nbytes / 2**20:,.1f} MiB) does not fit in this process's "
                                f"memory, not even mapped from a file in '{folder}': {os.strerror(code)}; pass "
                                "--cache off") from exc  # fmt: skip
        if code not in _NO_ROOM:
            raise
        raise ResourceError(f"no room for the feature cache's file ({nbytes / 2**20:,.1f} MiB) in '{folder}': "
                            f"{os.strerror(code)}; {_DISK_HINT}") from exc  # fmt: skip
    except BaseException:  # a stop (SIGTERM, Ctrl-C) while the blocks were reserved left the whole file behind
        path.unlink(missing_ok=True)
        raise
    _unlink_mapped(path)
    return t


_DISK_HINT = "train into an --out on a disk with room, or pass --cache off"
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a full quota, a file-size limit (ulimit -f)


def _reserve(path: Path, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` of blocks allocated. A mapped file is otherwise sparse: its pages take blocks
    as the store is written, and a disk another job filled meanwhile killed the run with SIGBUS, without a word (a
    file-size limit: torch's traceback). Reserved, either is an ``OSError`` here, before anything is written.
    Where the file system cannot reserve (``EOPNOTSUPP``), the file stays sparse, its room checked beforehand."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if nbytes > 0 and hasattr(os, "posix_fallocate"):  # not on macOS or Windows
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
    finally:
        os.close(fd)


def _errno_of(exc: BaseException) -> int | None:
    """The error number of an ``OSError``, or of torch's ``RuntimeError`` for a file it could not size or map.

    >>> _errno_of(RuntimeError("unable to resize file <a.bin> to the right size: File too large (27)"))
    27
    """
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r": [^:]+ \((\d+)\)$", str(exc))
    return int(found[1]) if found else None


def _vs(shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    return shape[0], tuple(shape[2:])


def _unlink_mapped(path: Path) -> None:
    """Remove the file a store has just mapped, and its folder if that is then empty: on POSIX the mapping stays
    valid and the disk space returns when the store is freed, so nothing is left behind, after the process, a stop
    during the build or a crash (a notebook that caches many times filled the temp dir; a run left gigabytes in its
    run dir that no resume reads). Where a mapped file cannot be removed (Windows) it stays."""
    try:
        path.unlink()
    except OSError:
        log.info("feature cache file left in %s (it is mapped)", path)
        return
    with contextlib.suppress(OSError):  # not empty, or removed by another rank's store: either is fine
        path.parent.rmdir()
