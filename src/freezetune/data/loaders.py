"""From datasets to batches: the one place that decides how a run reads its data.

``Loaders`` is the run's loader factory. One call per purpose (``train``, ``eval``, ``views`` for the feature-cache
build, ``order`` for a cached store) decides CPU ``DataLoader`` vs device loader (``data/gpu.py``), DDP sharding,
the worker default and seeding. Every loader kind draws its epoch order from one ``EpochOrder``, so for the same
seed and epoch the CPU loader, the device loaders and the feature cache visit the same images in the same batches,
by construction.

Seeds, all derived from the run's ``seed``:
- ``epoch_seed(seed, epoch)``: the epoch's order (the same on every DDP rank, which then takes its shard), and through
  it each sample's augmentation on the CPU (``data/seeded.py``: a seed a sample, whichever process reads it);
- ``epoch_seed(seed, epoch, rank)``: the epoch's dropout and the device loaders' augmentation (ranks differ);
- ``view_seed(seed, v)``: the augmentation of the feature cache's view ``v``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler, Subset

from freezetune.config.options import AUG_DEFAULT, check, non_negative_int_problem, positive_int_problem
from freezetune.data.idx import InMemoryImageDataset
from freezetune.data.seeded import SampleKeys, SeededSamples
from freezetune.data.text import TextDataset, TokenizeBatch
from freezetune.data.workers import dataloader, note_no_workers, shared_memory_short, shut_down, usable_cpus
from freezetune.device.distributed import DistInfo, batch_block, shard_rows
from freezetune.model.preprocess import Preprocess

log = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch: its order (``rank=0`` on every rank) or a rank's random draws.

    >>> epoch_seed(0, 2), epoch_seed(0, 2, rank=1) != epoch_seed(0, 2)
    (2, True)
    """
    return seed * 100_003 + epoch + rank * 1_000_000_007


def view_seed(seed: int, view: int) -> int:
    """The seed of the feature cache's augmented view ``view`` (one pass over the data each).

    >>> view_seed(1, 0)
    104729
    """
    return seed * 104_729 + view


def default_workers(dataset: Dataset, cuda: bool) -> int:
    """Loader processes when the user sets none: ``min(4, cpus)`` for a CUDA run; on the CPU, 0 for in-memory
    datasets and ``min(2, cpus)`` for image files, none on a single CPU; none where ``/dev/shm`` is short of the room
    workers pass their batches through (``data.workers.shared_memory_short``).

    >>> default_workers(InMemoryImageDataset(torch.zeros(1, 2, 2, dtype=torch.uint8), torch.zeros(1), ["a"]), False)
    0
    """
    cpus = usable_cpus()
    if cuda:
        return _with_shared_memory(min(4, cpus))
    # On CPU, in-memory uint8 samples are cheap to transform and worker start-up plus IPC costs more than it saves;
    # decoding files (JPEG/PNG) is the slow part and does gain from a couple of processes.
    # Tokenizers (Rust, threaded) must not be forked into workers; tokenizing a batch in-process is cheap anyway.
    # On one CPU a worker only shares the core with the training process, plus the copies between them: the final
    # test of 10 000 PNGs took 26 s with one and 21 s without (taskset -c 1, 2026-12-02).
    if isinstance(dataset, (InMemoryImageDataset, TextDataset)) or cpus < 2:
        return 0
    return _with_shared_memory(min(2, cpus))


def _with_shared_memory(workers: int) -> int:
    """``workers``, or none where ``/dev/shm`` lacks the room to pass their batches (a container's 64 MB)."""
    free = shared_memory_short()
    if free is None:
        return workers
    note_no_workers(free)
    return 0


def check_batch_size(batch_size: object) -> int:
    check(positive_int_problem("batch_size", batch_size))
    return batch_size


class EpochOrder(Sampler[int]):
    """The order of ``n`` items in an epoch: shuffled by ``epoch_seed(seed, epoch)``, or ``0..n-1``.

    Under DDP (``dist``) a shuffled order is this rank's shard: the same permutation on every rank, padded by
    repetition to a multiple of the world size, every ``world``-th item from ``rank``. ``set_epoch`` picks the epoch;
    without it each pass continues the random stream (a new order per pass, reproducible from ``seed``).

    Each pass's generator first draws the pass's seed (once the draw a ``DataLoader`` made for its workers' base seed),
    then shuffles: the order is the same whichever loader kind iterates it. ``keyed``: the order yields
    ``(pass_seed, index)`` keys, from which ``SeededSamples`` seeds each sample's augmentation (the same on every DDP
    rank: a sample's index is its own there too).

    >>> o = EpochOrder(5, shuffle=True, seed=0); o.set_epoch(1); sorted(o) == [0, 1, 2, 3, 4]
    True
    >>> o.keyed = True; o.set_epoch(1); keys = list(o); o.set_epoch(1); list(o) == keys, len({s for s, _ in keys})
    (True, 1)
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, dist: DistInfo | None = None,
                 batch_size: int | None = None, fraction: float = 1.0, keyed: bool = False) -> None:  # fmt: skip
        self.n, self.shuffle, self.seed, self.dist, self.keyed = n, shuffle, seed, dist or DistInfo(), keyed
        self.fraction = fraction  # a shuffled epoch visits only this share of the items (--epoch-fraction/-images)
        # A training batch of one image cannot train BatchNorm ("expected more than 1 value per channel"): with
        # ``batch_size`` given, an epoch whose last batch would hold one image leaves that image out (a different
        # one each epoch, the same on every loader kind and rank).
        self.batch_size = batch_size
        self.generator = torch.Generator()
        self.pass_seed = 0  # the last pass's (``indices``)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        n = -(-self.n // self.dist.world) if self.shuffle and self.dist.enabled else self.n
        n = max(1, round(n * self.fraction)) if self.shuffle and self.fraction < 1 else n
        return n - 1 if self.batch_size and n > 1 and n % self.batch_size == 1 else n

    def indices(self) -> torch.Tensor:
        """This pass's order as a tensor (advances the random stream like one iteration, and draws ``pass_seed``: a
        pass without ``set_epoch`` before it augments anew)."""
        self.pass_seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator))
        if not self.shuffle:
            return torch.arange(self.n)[: len(self)]
        order = torch.randperm(self.n, generator=self.generator)
        if self.dist.enabled:
            share = -(-self.n // self.dist.world)
            padded = order.repeat(-(-share * self.dist.world // max(self.n, 1)))[: share * self.dist.world]
            order = padded[self.dist.rank :: self.dist.world]
        return order[: len(self)]

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        order = self.indices().tolist()
        return ((self.pass_seed, i) for i in order) if self.keyed else iter(order)


class CpuLoader:
    """A ``DataLoader`` (per-sample transforms, worker processes) driven by an ``EpochOrder`` (``set_epoch`` picks the
    epoch), or by the ``SampleKeys`` of a feature cache's view.

    An order that yields keys (``keyed``) reads ``SeededSamples``: each sample's augmentation is drawn from its own
    seed in whichever process reads it, so what a pass draws depends on neither the workers nor the batch, and the
    workers start once, on the first pass, and serve every later one (``persistent``: a spawned worker, macOS's and
    Windows', imports torch afresh, seconds each). ``seed`` seeds what the workers draw outside a sample's read.
    """

    def __init__(self, dataset: Dataset, order: EpochOrder | SampleKeys, *, batch_size: int, workers: int, pin: bool,
                 seed: int = 0, persistent: bool = True, collate: Callable | None = None):  # fmt: skip
        self.order = order
        if order.keyed:
            dataset = SeededSamples(dataset)
        self.loader = dataloader(dataset, order, batch_size=batch_size, workers=workers, pin=pin,
                                  generator=torch.Generator().manual_seed(seed), persistent=persistent,
                                  collate=collate)  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        return iter(self.loader)

    def close(self) -> None:
        """Stop the worker processes now; a later pass starts new ones (drawing what they would have drawn).

        A persistent ``DataLoader`` keeps its iterator, and with it its workers, until the loader itself is freed: a
        reference cycle or a kept traceback puts that off until the garbage collector runs, which then waits 5 s on
        each worker before killing it. torch has no public call for this; its iterator's own shutdown is the one it
        runs when freed.
        """
        iterator, self.loader._iterator = self.loader._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            shut_down(iterator)


class CpuViews:
    """``view -> batches`` of a feature-cache build on the CPU: one loader for every view (its workers start once),
    each view's images seeded by ``view_seed`` and their rows (``SampleKeys``); ``close`` stops its workers."""

    def __init__(self, loader: CpuLoader, seed: int) -> None:
        self.loader, self.seed = loader, seed

    def __call__(self, view: int) -> CpuLoader:
        self.loader.order.pass_seed = view_seed(self.seed, view)
        return self.loader

    def close(self) -> None:
        self.loader.close()


def close_loader(batches: Iterable | Callable) -> None:
    """Stop the worker processes of a loader from ``Loaders``, or of a cache build's views (a device loader or a cached
    store has none)."""
    if isinstance(batches, (CpuLoader, CpuViews)):
        batches.close()


def build_loader(dataset: Dataset, *, batch_size: int, train: bool, workers: int | None = None, device: str = "cpu",
                 seed: int = 0) -> CpuLoader:  # fmt: skip
    """A reproducible CPU loader for your own loop: shuffled for training (``set_epoch`` to pick an epoch), in order
    for evaluation. Same seed, same batches, whatever ``workers``: for training, each sample's transform draws from a
    seed of its own (the seed, the epoch, the sample: ``data/seeded.py``), torch's, numpy's and ``random``'s global
    generators seeded for it; read in this process (``workers=0``), their states are put back after each batch, so
    your loop's own draws stay as they were. A pass without ``set_epoch`` before it draws a new order and new
    augmentations. Workers start on the first pass and stay for the next ones: ``close()`` stops them.

    Args:
        dataset: any map-style dataset.
        batch_size: samples per batch (>= 1).
        train: shuffle if True.
        workers: loader processes; default ``default_workers``.
        device: the training device; "cuda..." turns on pinned memory.
        seed: seeds shuffling and augmentation.

    >>> ds = InMemoryImageDataset(torch.zeros(10, 4, 4, dtype=torch.uint8), torch.arange(10), [str(i) for i in range(10)])
    >>> [len(y) for _, y in build_loader(ds, batch_size=4, train=True)]
    [4, 4, 2]
    """
    check_batch_size(batch_size)
    if workers is not None:
        check(non_negative_int_problem("workers", workers))
    cuda = str(device).startswith("cuda")
    workers = default_workers(dataset, cuda) if workers is None else workers
    order = EpochOrder(len(dataset), shuffle=train, seed=seed, batch_size=batch_size if train else None, keyed=train)
    loader = CpuLoader(dataset, order, batch_size=batch_size, workers=workers, pin=cuda, seed=seed)
    loader.set_epoch(0)
    return loader


def epoch_share(n: int, fraction: float, images: int | None) -> float:
    """The share of a training set of ``n`` items an epoch visits: ``fraction`` of it (``epoch_fraction``), at most
    ``images`` items (``epoch_images``; None: no limit).

    A share of one item is a batch of one, which BatchNorm cannot train: a ``fraction`` draws two where the set has
    them (the auto recipe's half-epoch trial of 2 training images drew 1, and ended in "give more --epoch-images", a
    flag never given); ``images`` below two is the user's to ask.

    >>> epoch_share(1000, 0.5, 100), epoch_share(50, 0.5, 100), epoch_share(2, 0.5, None), epoch_share(4, 0.5, 1)
    (0.1, 0.5, 1.0, 0.25)
    """
    share = fraction if images is None or n <= images else min(fraction, images / n)
    floor = min(2, n, 2 if images is None else images)
    return max(share, floor / n) if n and share < 1 else share


@dataclass(frozen=True)
class Loaders:
    """How one run reads data: every loader of the run (training, evaluation, the feature-cache build) comes from here.

    Args:
        batch_size: training and evaluation batch size (cache builds read twice as many at once).
        device: the training device.
        seed: the run's seed (see the module docstring for what derives from it).
        preprocess: the model's input size, normalisation and interpolation (device pipelines use it).
        aug: training augmentation preset.
        decode: ``auto`` | ``gpu`` | ``cpu``: where images are decoded and augmented (see ``should_use_device_loader``).
        workers: CPU loader processes (None: ``default_workers``).
        dist: this process's place in a torchrun job; training reads this rank's shard of each epoch.
        epoch_fraction: a training epoch visits this share of the (shuffled) training set ...
        epoch_images: ... and at most this many of its items (None: no limit).
    """

    batch_size: int
    device: torch.device
    seed: int
    preprocess: Preprocess
    aug: str = AUG_DEFAULT
    decode: str = "auto"
    workers: int | None = None
    dist: DistInfo = DistInfo()
    epoch_fraction: float = 1.0
    epoch_images: int | None = None

    def order(self, n: int, *, train: bool, keyed: bool = False) -> EpochOrder:
        """The epoch order every training loader of this run uses (this rank's shard under DDP; never a last
        training batch of one image); ``keyed``: yielding the keys that seed each sample's augmentation."""
        return EpochOrder(n, shuffle=train, seed=self.seed, dist=self.dist if train else None,
                          batch_size=self.batch_size if train else None,
                          fraction=self.fraction(n) if train else 1.0, keyed=keyed)  # fmt: skip

    def fraction(self, n: int) -> float:
        """The share of a training set of ``n`` items a training epoch visits.

        >>> Loaders(batch_size=8, device=torch.device("cpu"), seed=0, preprocess=None, epoch_fraction=0.5,
        ...         epoch_images=100).fraction(1000)
        0.1
        """
        return epoch_share(n, self.epoch_fraction, self.epoch_images)

    def epoch_items(self, n: int) -> int:
        """How many of a training set of ``n`` items an epoch visits (on all ranks together: each rank's share of
        the epoch, rounded, times the ranks; under torchrun ``--epoch-images 5`` on 2 ranks visits 4, and the log said
        5).

        >>> loaders = Loaders(batch_size=8, device=torch.device("cpu"), seed=0, preprocess=None, epoch_images=100)
        >>> loaders.epoch_items(1000)
        100
        """
        return len(EpochOrder(n, shuffle=True, fraction=self.fraction(n), dist=self.dist)) * self.dist.world

    def train(self, dataset: Dataset):
        """Shuffled, augmented batches of this rank's shard of each epoch; call ``set_epoch`` before each epoch. On the
        CPU each image's augmentation is seeded by the epoch and the image (``SeededSamples``)."""
        order = self.order(len(dataset), train=True, keyed=self.aug != "none" and not self.preprocess.is_text)
        return self._loader(dataset, order, train=True, batch_size=self.batch_size)

    def eval(self, dataset: Dataset, *, shard: bool = False):
        """All of ``dataset`` in order, with the eval transform; ``shard``: only this rank's block of whole batches
        (``batch_block``), for an evaluation whose metrics are merged across ranks (``evaluate(dist=...)``)."""
        if not shard or not self.dist.enabled:
            return self._loader(dataset, self.order(len(dataset), train=False), train=False, batch_size=self.batch_size)
        rows = batch_block(len(dataset), self.batch_size, self.dist)
        if not rows:  # fewer batches than ranks: this one scores none
            return []
        in_order = EpochOrder(len(rows), shuffle=False)
        return self._loader(dataset, in_order, train=False, batch_size=self.batch_size, rows=rows)

    @property
    def inference_batch(self) -> int:
        """The batch of a pass without a backward (a feature store's build, a validation on stored features): twice
        the training batch on an accelerator; the training batch on a CPU, where twice as many images a batch left the
        CPU's caches and ran the frozen layers at twice the time an image (EfficientNet-Lite0 before blocks.3, 2
        threads: at 64 px 1.38 ms an image at batch 64 against 0.61 ms at 32; at 128 px 10.4 against 5.7 ms)."""
        return self.batch_size if self.device.type == "cpu" else 2 * self.batch_size

    def views(self, dataset: Dataset, *, train: bool) -> Callable[[int], Iterable]:
        """For the feature-cache build: ``view -> batches`` of this rank's block of rows (``shard_rows``) in dataset
        order, augmented (``train``) reproducibly per view. ``close_loader`` stops its workers after the build."""
        rows = shard_rows(len(dataset), self.dist)
        in_order = EpochOrder(len(rows), shuffle=False)
        device = self._device_loader(dataset, rows=rows, order=in_order, train=train, batch_size=self.inference_batch)
        if device is not None:

            def device_view(v: int):
                device.generator.manual_seed(view_seed(self.seed, v))
                return device

            return device_view
        # each image of a view seeded by the view and the image's row: the same crops whatever the workers, the
        # batch or the ranks; the workers start once for all the views
        loader = CpuLoader(dataset, SampleKeys(rows, keyed=train), batch_size=self.inference_batch,
                           workers=self.workers_for(dataset), pin=self.device.type == "cuda",
                           seed=self.seed)  # fmt: skip
        return CpuViews(loader, self.seed)

    def view_draw(self, dataset: Dataset) -> dict[str, int]:
        """What an augmented view's random draws depend on besides its seed: on the device, its batches (drawn a batch
        at once). A view built under other settings holds other crops: the feature cache keys it. On the CPU each
        image's draws are its own (``SeededSamples``): the workers and the batch change nothing."""
        from freezetune.data.gpu import should_use_device_loader

        on_device = should_use_device_loader(dataset, self.device, self.decode)
        return {"batch_size": self.inference_batch} if on_device else {}

    def workers_for(self, dataset: Dataset) -> int:
        """The loader processes ``dataset`` is read with on the CPU: ``--workers``, else ``default_workers``. The
        run's log says how many (they change its speed, not what it draws)."""
        return self.workers if self.workers is not None else default_workers(dataset, self.device.type == "cuda")

    def _loader(self, dataset: Dataset, order: EpochOrder, *, train: bool, batch_size: int, rows: range | None = None):
        """``rows``: read only these rows of ``dataset`` (``order`` then indexes them)."""
        device = self._device_loader(dataset, order=order, train=train, batch_size=batch_size, rows=rows)
        if device is not None:
            return device
        pre = self.preprocess
        collate = TokenizeBatch(pre.tokenizer, pre.max_length) if pre.is_text else None
        part = dataset if rows is None else Subset(dataset, rows)
        return CpuLoader(part, order, batch_size=batch_size, workers=self.workers_for(dataset),
                         pin=self.device.type == "cuda", seed=epoch_seed(self.seed, 0, self.dist.rank),
                         collate=collate)  # fmt: skip

    def _device_loader(self, dataset: Dataset, *, train: bool, batch_size: int, **where):
        from freezetune.data.gpu import build_device_loader, should_use_device_loader

        if not should_use_device_loader(dataset, self.device, self.decode):
            return None
        return build_device_loader(dataset, batch_size=batch_size, train=train, device=self.device, seed=self.seed,
                                   preprocess=self.preprocess, aug=self.aug if train else "none", rank=self.dist.rank,
                                   **where)  # fmt: skip
