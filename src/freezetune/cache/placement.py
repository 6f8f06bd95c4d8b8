"""Where a feature store is put: the GPU when it fits half of the free memory, else (pinned) RAM when it fits half of
the available RAM, else a file mapped from the spill folder and removed from it at once (``allocate``)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from freezetune.cache.disk import ensure_space
from freezetune.device.hardware import available_device_memory, available_ram
from freezetune.device.precision import Precision

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
        if nbytes <= free:
            return new(shape, dtype=dtype, device=precision.device), CacheInfo("gpu", nbytes, free, *_vs(shape))
    ram = available_ram() // 2
    if place == "memory" and nbytes > ram:
        log.warning(
            "feature cache needs %d MiB, over the RAM budget of %d MiB: spilling to disk", nbytes >> 20, ram >> 20
        )
    if nbytes <= ram and place != "disk":
        pinned = precision.device.type == "cuda"
        t = new(shape, dtype=dtype, pin_memory=pinned)
        return t, CacheInfo("pinned" if pinned else "cpu", nbytes, ram, *_vs(shape))
    path = Path(spill_dir) / "feature_cache.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a rebuilt cache has another shape; an old mapping stays valid until dropped
    ensure_space(path.parent, nbytes, "train into an --out on a disk with room, or pass --cache off")
    # a new file reads as zeros, which is what ``zeroed`` asks for
    t = torch.from_file(str(path), shared=True, size=torch.Size(shape).numel(), dtype=dtype).view(shape)
    _unlink_mapped(path)
    return t, CacheInfo("disk", nbytes, ram, *_vs(shape))


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
