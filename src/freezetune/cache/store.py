"""Feature stores: the frozen prefix's outputs, computed once per input (and view), batched like images.

A 10-epoch head-only run otherwise pays ten forward passes over data that never changes. The cache stores, per
image, K augmented views of the prefix output (``cache_views``; one with ``aug none``) and each epoch samples one
view per image. Storage is the GPU when it fits half of the free memory, else pinned CPU memory when it fits half
of the available RAM, else a memory-mapped file in the run directory. ``StoreLoader`` batches them in the same
``EpochOrder`` as the uncached path: same views, same order, same function (checked in the tests on CPU in fp32).
Under DDP every rank runs the prefix over its own block of images and the ranks exchange the features, so each holds
the whole cache and samples its shard as uncached DDP does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from freezetune.cache.disk import stored_shape
from freezetune.cache.model_split import Split
from freezetune.cache.placement import CacheInfo
from freezetune.cache.placement import allocate as _allocate
from freezetune.config.options import CACHE_MODES
from freezetune.data.loaders import EpochOrder, check_batch_size
from freezetune.device.distributed import DistInfo, all_gather, shard_rows, sum_across_ranks
from freezetune.device.precision import Precision
from freezetune.errors import ConfigError, DataError, choices
from freezetune.model.tree import unwrap
from freezetune.run.interrupt import OUTSIDE_A_STEP, RunInterrupted, pause_point

PLACES = tuple(m for m in CACHE_MODES if m != "off")  # where cache_features may put its store
log = logging.getLogger(__name__)


class FeatureStore(Dataset):
    """Cached prefix outputs ``[views, N, ...]`` and targets; ``__getitem__`` takes a list of indices (a batch).

    Targets and the epoch's view choice are kept on the features' device too, so ``batch`` needs no host copy.
    """

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, seed: int) -> None:
        self.features, self.targets, self.seed = features, targets, seed
        self.device = features.device
        self._targets = targets.to(self.device)
        # the views as one [views * N, ...] table (no copy): a batch is then one index_select, half the time of
        # indexing with two tensors on a CPU (45 vs 85 us for 128 x 1280 floats)
        self._flat = features.flatten(0, 1) if features.is_contiguous() else None
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.targets)

    def set_epoch(self, epoch: int) -> None:
        """Pick this epoch's view of each image (seeded by epoch, so a resumed run picks the same)."""
        views, n = self.features.shape[0], len(self.targets)
        gen = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
        self.view = torch.randint(views, (n,), generator=gen) if views > 1 else torch.zeros(n, dtype=torch.long)
        self._view = self.view.to(self.device)  # one copy an epoch
        self._row = self._view * n + torch.arange(n, device=self.device)  # each image's row in the flat table

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and targets of ``index`` (a long tensor on the store's device)."""
        if self._flat is not None:
            return self._flat.index_select(0, self._row[index]), self._targets[index]
        return self.features[self._view[index], index], self._targets[index]

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(torch.as_tensor(idx, dtype=torch.long).to(self.device))

    def batches(self, index: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``batch`` of each ``batch_size`` slice of ``index`` in turn. The rows and targets of the whole order are
        gathered once, so a batch is one ``index_select`` and a slice: a cached step on a GPU is launch-bound, and
        two gathers a batch were two of its launches."""
        if self._flat is None:
            yield from (self.batch(part) for part in index.split(batch_size))
            return
        rows, targets = self._row[index], self._targets[index]
        for r, t in zip(rows.split(batch_size), targets.split(batch_size), strict=True):
            yield self._flat.index_select(0, r), t


class StoreLoader:
    """One epoch of ``FeatureStore`` batches in ``order`` (an ``EpochOrder``), like an image loader over the store.

    The epoch's order moves to the store's device once and each batch is a slice of it there: a per-batch index
    copied from pageable host memory would make CUDA wait for every queued kernel before each training step.
    """

    def __init__(self, store: FeatureStore, batch_size: int, order: EpochOrder, pin: bool = False,
                 first_row: int = 0) -> None:  # fmt: skip
        self.store, self.batch_size, self.order = store, check_batch_size(batch_size), order
        # page-locked batches speed a CPU store's copies to a CUDA device; a store held on the device has nothing to
        # pin (torch refuses: "cannot pin 'CUDAFloatType'", the first step of every cached run on a GPU)
        self.pin = pin and store.device.type == "cpu"
        self.first_row = first_row  # the order's rows start here (a rank's block of a sharded evaluation)

    def set_epoch(self, epoch: int) -> None:
        """The epoch's order and its choice of view per image, as the image loaders pick their augmentation."""
        self.order.set_epoch(epoch)
        self.store.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = (self.order.indices() + self.first_row).to(self.store.device)
        for features, targets in self.store.batches(index, self.batch_size):
            yield (features.pin_memory(), targets.pin_memory()) if self.pin else (features, targets)


def build_store(
    split: Split,
    n: int,
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    precision: Precision,
    *,
    views: int,
    spill_dir: str | Path,
    seed: int = 0,
    channels_last: bool = False,
    place: str = "auto",
    dist: DistInfo | None = None,
    bar: str | None = None,
) -> tuple[FeatureStore, CacheInfo]:
    """Run ``split.prefix`` over ``views`` passes of a dataset of ``n`` items and store the outputs.

    Args:
        batches: ``view -> (inputs, labels)`` batches of this rank's rows (``shard_rows``) in dataset order, each
            view augmented reproducibly: ``Loaders.views``.
        place: ``"auto"`` (GPU, else RAM, else disk, by budget), ``"memory"`` (RAM; disk, with a warning, when it
            does not fit) or ``"disk"``.
        seed: seeds each epoch's choice of view (``FeatureStore.set_epoch``).
        dist: under DDP each rank computes its block of rows and the ranks exchange them.
        bar: a progress bar's title, None for none (a large folder's cache took minutes without a word).
    """
    from freezetune.training.epoch_log import (
        progress_bar,  # (it reads reporting, which imports matplotlib: not at import)
    )

    dist = dist or DistInfo()
    rows = shard_rows(n, dist)
    if n == 0:
        raise DataError("cannot build a feature cache over an empty dataset")
    storage: torch.Tensor | None = None
    info: CacheInfo | None = None
    targets = torch.zeros(n, dtype=torch.long)
    meter = progress_bar(views * len(rows), bar or "", enabled=bar is not None, unit="img")
    try:
        for v in range(views):
            start = rows.start
            for inputs, labels in batches(v):
                feats = prefix_features(split, inputs, precision, channels_last)
                if storage is None and v == 0:
                    _check_head_hook(split, inputs, feats, precision, channels_last)
                if storage is None:
                    storage, info = _allocate((views, n, *feats.shape[1:]), feats.dtype, precision, spill_dir, place,
                                              zeroed=dist.enabled)  # fmt: skip
                storage[v, start : start + len(labels)] = feats.to(storage.device)
                targets[start : start + len(labels)] = labels
                start += len(labels)
                meter.update(len(labels))
                pause_point("cache")
    finally:  # a stop or an error too: the bar's line is cleared for the message that follows
        meter.close()
    if dist.enabled and n < dist.world:  # a rank of no rows (3 validation images, 4 GPUs) takes the store's shape
        shapes = [s for s in all_gather(None if storage is None else (storage.shape, storage.dtype), dist) if s]
        if storage is None:  # ... from one that computed features, and adds zeros to the sum below
            storage, info = _allocate(tuple(shapes[0][0]), shapes[0][1], precision, spill_dir, place, zeroed=True)
    if storage is None or info is None:
        raise DataError("cannot build a feature cache over an empty dataset")
    # every rank filled only its own rows of zeroed tensors: summing over ranks gives each the whole cache
    sum_across_ranks(storage, dist)
    sum_across_ranks(targets, dist)
    return FeatureStore(storage, targets, seed), info


def cache_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    amp: str = "auto",
    views: int = 1,
    seed: int = 0,
    place: str = "auto",
    spill_dir: str | Path | None = None,
) -> tuple[Split, FeatureStore]:
    """For your own training loop: split ``model`` at its first trainable stage and run the frozen prefix over
    ``dataset`` once (``views`` passes of its own transform) on the model's device.

    Train ``split.suffix_train`` on ``store_loader(store, ...)`` batches (call ``loader.set_epoch(epoch)`` each epoch
    when ``views > 1``); ``split.suffix_eval`` evaluates, with the model in eval mode (``model.eval()``: the suffix
    runs the model's own layers, in the mode they are in). The model must be frozen first (``freeze``), with
    BatchNorm policy ``"frozen"`` in the prefix. Features are stored in the precision of ``amp`` (bf16 on a recent
    CUDA card under ``"auto"``): run the suffix under the same ``torch.autocast``, or pass ``amp="off"``.

    ``place``: ``"auto"`` (the device if it fits, else RAM, else disk), ``"memory"`` (RAM, spilling to disk with a
    warning when it does not fit) or ``"disk"``. A store on disk is a file mapped from ``spill_dir`` (without one, a
    temporary folder) and removed from it at once, so nothing is left behind.

    Raises:
        ConfigError: the model cannot be cached (the reason is named: nothing frozen, moving BatchNorm, ...).

    >>> import torchvision, freezetune as ft
    >>> from torch.utils.data import TensorDataset
    >>> model = ft.replace_head(torchvision.models.resnet18(), 3); ft.freeze(model, "backbone")
    >>> split, store = cache_features(model, TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])))
    >>> split.suffix_eval(store.features[0]).shape
    torch.Size([4, 3])
    """
    from freezetune.cache.model_split import split_model
    from freezetune.data.loaders import Loaders, close_loader
    from freezetune.device.precision import resolve_precision
    from freezetune.model.preprocess import Preprocess

    if place not in PLACES:  # any other word ("ram") was taken for "auto"
        raise ConfigError(f"unknown place {place!r}; places are: {choices(PLACES)}")
    model = unwrap(model)  # DDP, DataParallel, torch.compile: the model inside traces and splits
    _check_pairs(dataset)
    split, why = split_model(model)
    if split is None:
        raise ConfigError(f"cannot cache features: {why}")
    device = next(model.parameters()).device
    # the dataset's own transform: the CPU loader, never a device pipeline (which would ignore it)
    loaders = Loaders(batch_size=batch_size, device=device, seed=seed, preprocess=Preprocess(), decode="cpu")
    if spill_dir is None:  # a name, not a dir: only a store that spills to disk creates it
        spill_dir = Path(tempfile.gettempdir()) / f"freezetune-cache-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # each image's transform draws from the global generators seeded for it (``SeededSamples``); the caller's torch
    # state is put back after the build, whatever else draws from it (the prefix's dropout, if it runs as built)
    batches = loaders.views(dataset, train=True)
    try:
        with torch.random.fork_rng(devices=[]):
            store, info = build_store(split, len(dataset), batches, resolve_precision(device, amp), views=views,
                                      seed=seed, spill_dir=spill_dir, place=place)  # fmt: skip
    finally:  # its workers served every view
        close_loader(batches)
    log.info("feature cache: %s", info.describe())
    split.refuse_stale_training()  # a stage opened later in the user's loop would not train on these features
    return split, store


def _check_pairs(dataset: Dataset) -> None:
    """The dataset must yield ``(input, target)`` pairs, as torchvision's do; a dict (a Hugging Face dataset's rows)
    would be unpacked into its keys and fail deep in the loader."""
    if len(dataset) == 0:
        raise DataError("cache_features got an empty dataset")
    first = dataset[0]
    if isinstance(first, (tuple, list)) and len(first) == 2:
        return
    keys = f" with keys {choices(list(first))}" if isinstance(first, dict) else ""
    raise DataError(f"cache_features takes a dataset of (input, target) pairs, as torchvision's; its first item is a "
                    f"{type(first).__name__}{keys}")  # fmt: skip


def prefix_features(split: Split, inputs, precision: Precision, channels_last: bool) -> torch.Tensor:
    """The frozen prefix's output for a batch: forward only (inference mode), under the run's autocast."""
    from freezetune.training.eval_loop import to_device

    with torch.inference_mode(), precision.autocast():
        return split.prefix(to_device(inputs, precision.device, channels_last))


def _check_head_hook(split: Split, inputs, feats: torch.Tensor, precision: Precision, channels_last: bool) -> None:
    """A split that captures the head's input by a hook (a model fx cannot trace) assumes the head's output is the
    model's: checked on the first batch, in eval mode. A forward that computes after its head (``fc(f) / T``) would
    otherwise train the cached head on another function than the model's, in silence."""
    if split.how != "head-hook":
        return
    from freezetune.training.eval_loop import logits_of, to_device

    model = split.prefix.model
    was_training = model.training
    try:
        with torch.inference_mode(), precision.autocast():
            model.eval()
            whole = logits_of(model(to_device(inputs, precision.device, channels_last))).float()  # HF: .logits
            cut = logits_of(split.suffix_eval(feats)).float()
    finally:
        model.train(was_training)
    if whole.shape != cut.shape or not torch.allclose(whole, cut, rtol=1e-4, atol=1e-5):
        gap = (whole - cut).abs().max().item() if whole.shape == cut.shape else f"shape {tuple(whole.shape)}"
        raise ConfigError(f"cannot cache features: the model's forward computes after its head {split.boundary!r} "
                          f"(its output differs from the head's by {gap}), and the cache would train the head alone; "
                          "train on images (--cache off)")  # fmt: skip


def store_loader(store: FeatureStore, *, batch_size: int, train: bool, seed: int, dist: DistInfo | None = None,
                 pin: bool = False) -> StoreLoader:  # fmt: skip
    """Batches of cached features, in the order the image loaders of the same seed use (``EpochOrder``).

    Under DDP (``dist``) a training loader yields this rank's shard of each epoch. ``pin``: page-lock batches of a
    CPU-resident store (for a CUDA run).

    >>> store = FeatureStore(torch.randn(1, 10, 8), torch.arange(10) % 2, seed=0)  # one view of 10 images' features
    >>> [tuple(x.shape) for x, y in store_loader(store, batch_size=4, train=True, seed=0)]
    [(4, 8), (4, 8), (2, 8)]
    """
    order = EpochOrder(len(store), shuffle=train, seed=seed, dist=dist if train else None,
                       batch_size=batch_size if train else None)  # fmt: skip
    return StoreLoader(store, batch_size, order, pin)


def placed_store(features: torch.Tensor | list[torch.Tensor], targets: torch.Tensor, precision: Precision, *,
                 seed: int, spill_dir: str | Path, place: str = "auto") -> tuple[FeatureStore, CacheInfo]:  # fmt: skip
    """A ``FeatureStore`` of features computed earlier (e.g. read from disk), placed as ``build_store`` places them;
    ``features`` may be parts to join along the items (dim 1), each copied into its place."""
    parts = [features] if isinstance(features, torch.Tensor) else features
    storage, info = _allocate(stored_shape(features), parts[0].dtype, precision, spill_dir, place)
    start = 0
    for part in parts:
        storage[:, start : start + part.shape[1]].copy_(part)
        start += part.shape[1]
    return FeatureStore(storage, targets.clone(), seed), info


def idle_views_note(aug: str, views: int, cache: str) -> str | None:
    """A note when ``--cache-views`` asks for several views of images that are not augmented (``--aug none``): every
    view is the same image, so the cache holds one (the log said "1 view(s)" beside a config.yaml of 2, unsaid).

    >>> print(idle_views_note("none", 2, "auto"))
    note: --cache-views 2 has no effect with --aug none: every view of an unaugmented image is the same, one is cached
    """
    if aug != "none" or views <= 1 or cache == "off":  # under cache off it is refused (config.check)
        return None
    return (f"note: --cache-views {views} has no effect with --aug none: every view of an unaugmented image is the "
            "same, one is cached")  # fmt: skip


BUILDING = "while building the feature cache"  # where a stop in a build stopped


@contextlib.contextmanager
def said_stopped_while_building():
    """A stop during a cache build says so (the run said "outside a training step", an auto run "during the trial of
    the last 3 stages" while its cache bar was all the user had seen), and that the part built is not kept."""
    try:
        yield
    except RunInterrupted as exc:
        # a stop at once outside the loop's steps alone: a second signal's, or torchrun's, says what last.pt holds
        where, _, advice = OUTSIDE_A_STEP.partition("; ")
        if exc.where != where:
            raise
        raise RunInterrupted.by(exc.signum, f"{BUILDING} (the part built is not kept); {advice}") from None
