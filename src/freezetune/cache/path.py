"""The feature path of a run: what each training step runs, and on what batches.

With the feature cache on and the model split at its first trainable stage, a step runs the trainable suffix on
stored prefix features. With the cache off (``--cache off``: every epoch augments afresh) a model that splits still
trains only its suffix: each batch of images goes through the frozen prefix first, forward only, as a cache build
runs it (``step_inputs``), so the step is the cached one (on CUDA a graph's replay) and the prefix costs what an
inference pass does. A model that does not split runs whole on images. ``FeaturePath`` owns that choice, the batch
sources of training and validation, and the modules that consume them. After an unfreeze the frozen prefix is
shorter: ``build()`` again rebuilds the cache at the new boundary (or falls back to images) and re-prepares the
module (DDP fixes its parameter set when it wraps, so the wrap follows every change of the trainable set).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from freezetune.cache import disk, store_source
from freezetune.cache.model_split import Split, split_model
from freezetune.cache.store import (
    CacheInfo,
    FeatureStore,
    StoreLoader,
    prefix_features,
)
from freezetune.data.datasets import DataBundle
from freezetune.data.loaders import EpochOrder, Loaders, close_loader
from freezetune.data.text import noun
from freezetune.data.transforms import eval_transform
from freezetune.device.distributed import batch_block
from freezetune.device.precision import Precision
from freezetune.errors import ResourceError
from freezetune.model.stages import stages
from freezetune.run.log import first_time
from freezetune.training.eval_loop import evaluate

log = logging.getLogger(__name__)

SLOW_BUILD_S = 60.0  # a cache build this long is worth keeping: the note suggests --cache-dir


class FeaturePath:
    """Images through the whole model, or cached prefix features through the trainable suffix.

    Args:
        model: the model being trained (frozen parts already frozen).
        data: the run's datasets.
        loaders: the run's loader factory.
        precision: device and autocast of the run (the cache is built under it).
        cache: ``auto`` | ``off`` | ``memory`` | ``disk`` (where a cache may live; ``off`` never caches).
        views: augmented views per training image in the cache.
        spill_dir: where a disk cache lives.
        cache_dir: where stores are kept between runs and found again (``cache/disk.py``); None keeps none.
        cache_at: cut at this (frozen) stage rather than the first trainable one (``split_model``'s ``at``).
        channels_last: feed convolutions NHWC.
        stream: where no training store is built (the cache off, or one that would not pay), run a model that splits
            as prefix (forward only) and suffix (``step_inputs``); False: the whole model on images, or a store
            (``--compile`` compiles the whole model's step).
        prepare: wraps the module a step runs (DDP, ``torch.compile``); called on every build.
        echo: receives the log lines (why a cache is or is not used, what it holds).
        later_epochs: epochs of this run's length that later runs train on the stores this one keeps in
            ``cache_dir`` (the auto recipe's run on its trials'; 0: none); None: unknown (a sweep's other recipes, a
            later ``train`` of the user's, a budget's plan). Without a ``cache_dir``, or under torchrun, where none is
            kept, no later run reads them.

    Under ``cache="auto"`` a store of the plain training images is built only if it pays for itself: when the epochs
    left (and ``later_epochs``) draw more training images than it holds. A run that draws fewer (``--epoch-images``
    far below the set, a single epoch) streams them instead: each batch runs the frozen prefix forward only, on the
    plain images the store would have held, so it trains as the store would have, the same numbers (a 20 000-image
    store took 139 s on a CPU for a run that drew 5 000). Augmented afresh, one epoch of 1 000 Fashion-MNIST images
    scored 76.9 and 77.1 % where the store's plain images scored 79.3 and 78.6 % (64 px, seeds 0 and 1). A store of
    augmented views (``views`` > 1) is always built: its views are seeded, and a resume must see them again. A store
    already kept in ``cache_dir`` is read all the same, and the validation set is cached as before: every epoch reads
    all of it.
    """

    def __init__(self, model: nn.Module, data: DataBundle, loaders: Loaders, precision: Precision, *, cache: str,
                 views: int, spill_dir: Path, cache_dir: Path | None = None, cache_at: str | None = None,
                 channels_last: bool = False, stream: bool = True,
                 prepare: Callable[[nn.Module], nn.Module] = lambda m: m,
                 echo: Callable[[str], None] = print, progress: bool = False,
                 later_epochs: float | None = None) -> None:  # fmt: skip
        self.model, self.data, self.loaders, self.precision = model, data, loaders, precision
        self.later_epochs = later_epochs
        self.cache, self.views, self.spill_dir, self.channels_last = cache, views, spill_dir, channels_last
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_at, self.stream = cache_at, stream
        self.prepare, self.echo, self.progress = prepare, echo, progress  # progress: a bar while a store builds
        self.split: Split | None = None
        self.train_store: FeatureStore | None = None
        self.val_store: FeatureStore | None = None
        self._images = None  # the training image loader, built on first use and kept (its workers start once)
        self._plain = False  # whether it reads the plain images a store would have held (``_build_cache``)
        self._val_images = None
        self.train_module: nn.Module = model
        self.build_seconds = 0.0  # all cache builds so far
        self._encoded = (0.0, 0)  # the seconds and images of this process's store builds: the prefix's pace
        # the last validation's seconds an item, and whether it read a store's features
        self._val_pace: tuple[float, bool] | None = None
        self._told_unaugmented = False
        self._told_streamed = self._told_unpinned = False

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per epoch, the same cached or not (what an LR schedule is sized for)."""
        return -(-len(self.loaders.order(len(self.data.train), train=True)) // self.loaders.batch_size)

    @property
    def cached(self) -> bool:
        """Whether a step trains the suffix on prefix features (stored, or computed from each batch by
        ``step_inputs``) rather than the whole model on images."""
        return self.split is not None

    @property
    def streamed(self) -> bool:
        """Whether the prefix features are computed batch by batch (the model split, and no training store: the cache
        off, or a store that would not pay)."""
        return self.split is not None and self.train_store is None

    def build(self, epochs_left: int | None = None) -> None:
        """Decide the path for the model's current trainable set: (re)build the cache, or read images.
        ``epochs_left``: the epochs the run still trains on it (None: unknown; a training store is then built)."""
        self.split, self.train_store, self.val_store = None, None, None  # an old cache is stale: free it first
        if self.cache != "off":
            self._read_plain(self._build_cache(epochs_left))
            # a disk store's file is unlinked once mapped; its folders stayed. This rank's alone: under torchrun the
            # other's, empty for a moment, vanished as it was about to write there ("No such file or directory")
            disk.remove_empty_dirs(self.own_spill())
        else:
            self._read_plain(False)
            self._stream()
        self._close_idle_loaders()
        self.train_module = self.prepare(self.split.suffix_train if self.split is not None else self.model)

    def step_inputs(self, inputs):
        """What a training step takes for a batch of ``train_batches``: the batch itself, or, streamed, its prefix
        features (forward only, under the run's autocast, as a cache build computes them; a copy outside inference
        mode, which the suffix's backward may keep)."""
        if not self.streamed:
            return inputs
        return prefix_features(self.split, inputs, self.precision, self.channels_last).clone()

    def train_batches(self, epoch: int):
        """The epoch's training batches (its order, augmentation and cached views are fixed by ``epoch``)."""
        if self.train_store is not None:
            batches = StoreLoader(self.train_store, self.loaders.batch_size, self.loaders.order(len(self.train_store),
                                  train=True), pin=self._pin)  # fmt: skip
        else:
            if self._images is None:
                self._images = self._image_loader()
            batches = self._images
        batches.set_epoch(epoch)
        return batches

    def evaluate_val(self, precision: Precision, *, num_classes: int, bar: str | None = None) -> dict | None:
        """``evaluate``'s metrics on the validation set (on its cached features when there are), or None without one;
        ``bar``: the label of its progress bar (None: none).

        Under DDP each rank scores its block of whole batches and every rank gets the merged metrics, one process's
        numbers exactly (as the final test): the ranks share the work instead of each scoring all of it.
        """
        if self.data.val is None:
            return None
        start = time.perf_counter()
        metrics = self._evaluate_val(precision, num_classes=num_classes, bar=bar)
        self._val_pace = ((time.perf_counter() - start) / len(self.data.val), self.val_store is not None)
        return metrics

    @property
    def eval_item_s(self) -> float | None:
        """Seconds an image (or text) of an evaluation of the whole model took, as measured in this run (a budget
        leaves time for the final test by it): the last validation's, plus the pace of the store builds (image loading
        and the frozen prefix: this process's, or those a store read from disk recorded) where it read a store's
        features; None where unmeasured (no validation yet, or a store read from disk that recorded no pace)."""
        if self._val_pace is None:
            return None
        item_s, stored = self._val_pace
        if not stored:
            return item_s
        seconds, items = self._encoded
        return item_s + seconds / items if items else None

    def _evaluate_val(self, precision: Precision, *, num_classes: int, bar: str | None) -> dict:
        dist = self.loaders.dist
        if self.val_store is not None:
            size = self.loaders.inference_batch
            rows = batch_block(len(self.val_store), size, dist)
            batches = StoreLoader(self.val_store, size, EpochOrder(len(rows), shuffle=False), self._pin,
                                  first_row=rows.start)  # fmt: skip
            module = self.split.suffix_eval
        else:
            if self._val_images is None:  # built once: a device loader copies the whole set over, workers take time
                self._val_images = self.loaders.eval(self.data.val, shard=True)
            # the ranks' blocks may differ by a batch: not through DDP's wrapper, whose forward can wait on the others;
            # streamed, the training module is the suffix, and images go through the whole model
            module = self.model if dist.enabled or self.streamed else self.train_module
            batches = self._val_images
        return evaluate(module, batches, precision, num_classes=num_classes, channels_last=self.channels_last,
                        dist=dist, bar=bar)  # fmt: skip

    def _image_loader(self):
        """The training image loader: augmented (``aug``), or, streaming what a store would have held, the plain
        images in the same order (as a store's build sees them)."""
        if not self._plain:
            return self.loaders.train(self.data.train)
        plain = copy.copy(self.data.train)  # another transform, the same images: a select copied them for the run
        plain.transform = eval_transform(self.loaders.preprocess)
        return dataclasses.replace(self.loaders, aug="none").train(plain)

    def _close_idle_loaders(self) -> None:
        """Stop the workers of an image loader a store now serves in its place (a rebuild after an unfreeze): they
        would wait, idle, for the rest of the run (the loaders keep their workers between epochs)."""
        if self.train_store is not None:
            close_loader(self._images)
            self._images = None
        if self.val_store is not None:
            close_loader(self._val_images)
            self._val_images = None

    def close(self) -> None:
        """After the epochs: stop the image loaders' worker processes (each keeps its own between epochs) and drop the
        stores, freed now (the run object sits in reference cycles torch.fx's tracer left around the model: a
        collector's full pass, perhaps runs later, would free what it holds; an auto recipe's trials' stores were all
        held through its run)."""
        for batches in (self._images, self._val_images):
            close_loader(batches)
        self._images = self._val_images = None
        self.train_store = self.val_store = None

    @property
    def _pin(self) -> bool:
        return self.loaders.device.type == "cuda"

    def _stream(self) -> None:
        """The cache off: split the model all the same where it can be (the same rules as a cache's), so each batch's
        frozen prefix runs forward only and the step trains the suffix on its output."""
        if not self.stream or self.loaders.preprocess.is_text:
            return
        split, _ = split_model(self.model)
        # a split by the head's hook (a model fx cannot trace) is checked on a batch, in eval mode, before a cache is
        # trusted; one that fails it names --cache off as the way out: that stays the whole model on images
        if split is None or split.how == "head-hook":
            return
        self.split = split
        if not self._told_streamed:  # once a run: each unfreeze splits again
            self._told_streamed = True
            self.echo(f"feature cache off: each batch runs the frozen layers before {split.boundary} forward only, "
                      "and the rest trains on their output")  # fmt: skip

    def _cut(self) -> str | None:
        """Where the cache cuts: ``cache_at``, until an unfreeze opens a stage before it (the auto recipe's run pins
        its trials' cut), then at the first trainable stage (the cut pinned there turned the cache off for the rest of
        the run). Said once: stages stay open."""
        if self.cache_at is None or not _trains_before(self.model, self.cache_at):
            return self.cache_at
        if not self._told_unpinned:
            self._told_unpinned = True
            self.echo(f"feature cache: a stage before {self.cache_at!r} trains now; cut at the first trainable stage")
        return None

    def _build_cache(self, epochs_left: int | None) -> bool:
        """Build (or read) the stores at the cut; returns whether the training images stream instead of a store's
        plain images (``_read_plain``)."""
        if self.loaders.preprocess.is_text:
            self.echo("feature cache off: text batches are tokenized and padded per batch, not cached")
            return False
        split, why = split_model(self.model, at=self._cut())
        if split is None:
            self.echo(f"feature cache off: {why}")
            return False
        # One cached view of a random augmentation is one fixed distortion per image, seen every epoch: it trained
        # 3.4 points worse than the plain image (Fashion-MNIST, 100/class, 64 px, 2026-11-30). Augmented views are
        # cached only when there are several to sample from.
        augment = self.loaders.aug != "none" and self.views > 1
        views = self.views if augment else 1
        start, hows = time.perf_counter(), []
        # never streamed: a split by the head's hook (a build checks it on a batch before it is trusted), augmented
        # views (seeded: a resume, whose epochs left are fewer, must see the same ones)
        streams = self.cache == "auto" and self.stream and split.how != "head-hook" and not augment
        draws = self._draws(epochs_left) if streams else None
        build, no_room = draws is None or draws > len(self.data.train), None
        try:
            self.train_store, info = self._store(split, self.data.train, views=views, augment=augment, hows=hows,
                                                 build=build)  # fmt: skip
        except ResourceError as exc:  # neither RAM nor disk holds it: under --cache auto the batches stream instead
            if not (streams and build):
                raise
            self.train_store, info, no_room = None, None, str(exc).split("; ")[0]
            hows.clear()
        val = ""
        if self.data.val is not None:
            self.val_store, val_info = self._store(split, self.data.val, views=1, augment=False, train=False,
                                                   hows=hows)  # fmt: skip
            val = f"{val_info.bytes / 2**20:,.0f} MiB on {val_info.place}"
        self.split = split
        seconds = time.perf_counter() - start
        self.build_seconds += seconds
        if no_room is not None or info is None:
            if no_room is not None:
                self.echo(f"feature cache: no training store: {no_room}; each batch runs the frozen layers before "
                          f"{split.boundary} forward only instead")  # fmt: skip
            else:
                self._say_streamed(split, draws, epochs_left)
            if val:  # a line of its own: beside the reason, the line ran to 330 characters
                self.echo(f"feature cache: validation store {val}, {hows[0]} in {seconds:.1f}s")
            return True
        self._say_cached(why, info, val, hows, seconds)
        note = (f"note: training images are cached without augmentation (aug {self.loaders.aug!r} needs "
                "--cache-views 2 or more: one fixed random view per image trains worse than the plain image)")  # fmt: skip
        # once a run: each rebuild at an unfreeze said it again, and each of the auto recipe's trials and its final run
        if not augment and self.loaders.aug != "none" and not self._told_unaugmented and \
                first_time(note, each_recipe=True):  # fmt: skip
            self._told_unaugmented = True
            self.echo(note)
        # a resume, or the next run, would build it again (under DDP the ranks build their blocks together: no reuse)
        if self.cache_dir is None and not self.loaders.dist.enabled and seconds >= SLOW_BUILD_S:
            self.echo(f"note: the cache took {seconds:.0f}s to build; --cache-dir DIR keeps it for a resume or a later "
                      "run on the same data (the auto recipe keeps its own in the run dir's features/)")  # fmt: skip
        return False

    def _say_cached(self, why: str, info: CacheInfo, val: str, hows: list[str], seconds: float) -> None:
        """Say what the stores hold, once a run: the auto recipe's trials and its final run read the same stores
        from its features/, and the same line came four times; the same cut again is said with -v."""
        # each store by what happened to it: "read from DIR" when one of two was read said the other was too
        how = hows[0] if len(set(hows)) == 1 else f"training store {hows[0]}, validation store {hows[1]}"
        line = f"feature cache: {why}; {info.describe()}{f'; validation {val}' if val else ''}; {how} in {seconds:.1f}s"
        if first_time(
            f"feature cache: {why}; {info.views} {tuple(info.shape)} on {info.place}; {val}", each_recipe=True
        ):
            self.echo(line)
        else:
            log.info(line)

    def _read_plain(self, plain: bool) -> None:
        """Whether the image loader reads the plain images (streaming a store's); a change rebuilds it."""
        if plain != self._plain:
            close_loader(self._images)
            self._images, self._plain = None, plain

    def _draws(self, epochs_left: int | None) -> int | None:
        """The training images a store built now would serve: the epochs left and later runs' (None: unknown)."""
        later = self.later_epochs if self._kept else 0.0
        if epochs_left is None or later is None:
            return None
        return round((epochs_left + later) * self.loaders.epoch_items(len(self.data.train)))

    @property
    def _kept(self) -> bool:
        """Whether the stores built are kept for later runs (in ``cache_dir``; under torchrun none is)."""
        return self.cache_dir is not None and not self.loaders.dist.enabled

    def _say_streamed(self, split: Split, draws: int, epochs_left: int) -> None:
        things = noun(self.data.train)
        later = " (and the run that reads this one's cache)" if self._kept and self.later_epochs else ""
        # the why on a line of its own, indented: in one, 280 characters wrapped to four lines of a terminal pane
        self.echo(f"feature cache: no training store: each batch runs the frozen layers before {split.boundary} "
                  f"forward only, on the plain {things}, and the rest trains on their output\n"
                  f"  the {epochs_left} epoch(s) left{later} draw {draws} training {things}, no more than the "
                  f"{len(self.data.train)} a store would hold (--cache memory builds it all the same)")  # fmt: skip

    def remove_empty_spill(self) -> None:
        """Remove the run's ``cache/`` folder when nothing is left in it: under torchrun each rank removes only its
        own folder as it goes (another's, empty for a moment, vanished as that rank was about to write), so the
        first rank removes the shared one once every rank has finished (it stayed, empty, in the run dir)."""
        disk.remove_empty_dirs(self.spill_dir)

    def own_spill(self) -> Path:
        """Where this process spills its disk stores: the run's ``cache/``, under torchrun a folder a rank."""
        dist = self.loaders.dist
        return self.spill_dir / f"rank{dist.rank}" if dist.enabled else self.spill_dir

    def count_encoding(self, seconds: float, items: int) -> None:
        """A store's build (this process's, or one a store read from disk recorded) joins the prefix's pace."""
        self._encoded = (self._encoded[0] + seconds, self._encoded[1] + items)

    def _store(self, split: Split, dataset, *, views: int, augment: bool, hows: list[str], train: bool = True,
               build: bool = True) -> tuple[FeatureStore | None, CacheInfo | None]:  # fmt: skip
        """The store of ``dataset``'s prefix features (``store_source.obtain``); ``hows`` gets how it came."""
        return store_source.obtain(self, split, dataset, views=views, augment=augment, hows=hows, train=train,
                                   build=build)  # fmt: skip


def _trains_before(model, stage: str) -> bool:
    """Whether a stage of ``model`` before ``stage`` has a trainable parameter (an unfreeze opened it)."""
    found = stages(model)  # once: each call walks the model again
    names = [s.name for s in found]
    return stage in names and any(p.requires_grad for s in found[: names.index(stage)] for p in s.params)
