"""Frozen-prefix feature cache: run the frozen, deterministic part of a model once per input and train the rest.

A 10-epoch head-only run otherwise pays ten forward passes over data that never changes. The cache stores, per
image, K augmented views of the prefix output (``cache_views``; one with ``aug none``) and each epoch samples one
view per image. Storage is the GPU when it fits half of the free memory, else pinned CPU memory when it fits half
of the available RAM, else a memory-mapped file in the run directory. Batches come out of a ``DataLoader`` over
batch indices, so shuffling uses the same seeded sampler as the uncached path: same views, same order, same
function (checked in the tests on CPU in fp32).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from freezetune.errors import DataError
from freezetune.precision import Precision
from freezetune.split import Split

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


class FeatureStore(Dataset):
    """Cached prefix outputs ``[views, N, ...]`` and targets; ``__getitem__`` takes a list of indices (a batch)."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, seed: int) -> None:
        self.features, self.targets, self.seed = features, targets, seed
        self.view = torch.zeros(len(targets), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def set_epoch(self, epoch: int) -> None:
        """Pick this epoch's view of each image (seeded by epoch, so a resumed run picks the same)."""
        views = self.features.shape[0]
        gen = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
        self.view = torch.randint(views, (len(self.targets),), generator=gen) if views > 1 else self.view

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(idx, dtype=torch.long)
        view = self.view[index]
        if self.features.device.type != "cpu":
            index, view = index.to(self.features.device), view.to(self.features.device)
        return self.features[view, index], self.targets[index.cpu()]


def build_store(
    split: Split,
    dataset: Dataset,
    precision: Precision,
    *,
    views: int,
    batch_size: int,
    seed: int,
    spill_dir: str | Path,
    channels_last: bool = False,
    place: str = "auto",
) -> tuple[FeatureStore, CacheInfo]:
    """Run ``split.prefix`` over ``views`` passes of ``dataset`` (its own transform) and store the outputs.

    ``place``: ``"auto"`` (GPU, else RAM, else disk, by budget), ``"memory"`` (never disk) or ``"disk"``.
    """
    from freezetune.evaluate import to_device

    n = len(dataset)
    loader = DataLoader(dataset, batch_size=batch_size * 2, shuffle=False, num_workers=_workers(precision))
    storage: torch.Tensor | None = None
    info: CacheInfo | None = None
    targets = torch.empty(n, dtype=torch.long)
    for v in range(views):
        torch.manual_seed(seed * 104_729 + v)  # each view's augmentation is reproducible
        start = 0
        for inputs, labels in loader:
            with torch.inference_mode(), precision.autocast():
                feats = split.prefix(to_device(inputs, precision.device, channels_last))
            if storage is None:
                storage, info = _allocate((views, n, *feats.shape[1:]), feats.dtype, precision, spill_dir, place)
            storage[v, start : start + len(labels)] = feats.to(storage.device)
            targets[start : start + len(labels)] = labels
            start += len(labels)
    if storage is None or info is None:
        raise DataError("cannot build a feature cache over an empty dataset")
    return FeatureStore(storage, targets, seed), info


def store_loader(store: FeatureStore, *, batch_size: int, train: bool, seed: int) -> DataLoader:
    """Batches of cached features, shuffled exactly like ``build_loader`` shuffles images (same seeded sampler)."""
    gen = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(store, generator=gen) if train else SequentialSampler(store)
    batches = BatchSampler(sampler, batch_size, drop_last=False)
    return DataLoader(store, sampler=batches, batch_size=None, generator=gen if train else None,
                      pin_memory=store.features.device.type == "cpu" and torch.cuda.is_available())  # fmt: skip


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, precision: Precision, spill_dir: str | Path, place: str):
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if precision.device.type == "cuda" and place != "disk":
        free = torch.cuda.mem_get_info(precision.device)[0] // 2
        if nbytes <= free:
            return torch.empty(shape, dtype=dtype, device=precision.device), CacheInfo("gpu", nbytes, free, *_vs(shape))
    ram = _available_ram() // 2
    if place == "memory" and nbytes > ram:
        log.warning(
            "feature cache needs %d MiB, over the RAM budget of %d MiB: spilling to disk", nbytes >> 20, ram >> 20
        )
    if nbytes <= ram and place != "disk":
        pinned = precision.device.type == "cuda"
        t = torch.empty(shape, dtype=dtype, pin_memory=pinned)
        return t, CacheInfo("pinned" if pinned else "cpu", nbytes, ram, *_vs(shape))
    path = Path(spill_dir) / "feature_cache.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a rebuilt cache has another shape; an old mapping stays valid until dropped
    t = torch.from_file(str(path), shared=True, size=torch.Size(shape).numel(), dtype=dtype).view(shape)
    return t, CacheInfo("disk", nbytes, ram, *_vs(shape))


def _vs(shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    return shape[0], tuple(shape[2:])


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 * 2**30


def _workers(precision: Precision) -> int:
    return min(4, os.cpu_count() or 1) if precision.device.type == "cuda" else 0
