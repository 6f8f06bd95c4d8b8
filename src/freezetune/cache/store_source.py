"""Where a run's feature store comes from: read back from the ``--cache-dir`` where one of the same key was kept, else
built once through the frozen layers (said as it starts: a build of thousands of images takes minutes) and kept
there for a resume or a later run."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from freezetune.cache import disk
from freezetune.cache.model_split import Split
from freezetune.cache.store import CacheInfo, FeatureStore, build_store, placed_store, said_stopped_while_building
from freezetune.data.gpu import should_use_device_loader
from freezetune.data.loaders import close_loader
from freezetune.data.text import noun
from freezetune.data.transforms import eval_transform

if TYPE_CHECKING:
    from freezetune.cache.path import FeaturePath

log = logging.getLogger(__name__)


def obtain(path: FeaturePath, split: Split, dataset, *, views: int, augment: bool, hows: list[str],
           train: bool = True, build: bool = True) -> tuple[FeatureStore | None, CacheInfo | None]:  # fmt: skip
    """The store of ``dataset``'s prefix features, read from ``cache_dir`` or built (unless not ``build``: then
    ``(None, None)``); ``hows`` gets which."""
    dist, loaders = path.loaders.dist, path.loaders
    spill = path.own_spill() / ("train" if train else "val")
    parts = getattr(dataset, "parts", None) if not augment else None  # a join of datasets cached one by one
    if train and not augment:  # the training images as evaluation sees them
        dataset = dataset.select(torch.arange(len(dataset)), eval_transform(loaders.preprocess))
    place = "auto" if path.cache == "auto" else path.cache
    key = None
    if path.cache_dir is not None and not dist.enabled:  # DDP ranks build their blocks together: never reused
        how = dict(preprocess=loaders.preprocess.to_dict(), views=views, aug=loaders.aug if augment else "eval",
                   # the seed draws augmented views; an evaluation view is the same whatever it is (a sweep
                   # over seeds built every validation store again)
                   seed=loaders.seed if augment else None, device=loaders.device.type,
                   device_pipeline=should_use_device_loader(dataset, loaders.device, loaders.decode),
                   dtype=str(path.precision.amp_dtype), channels_last=path.channels_last,
                   draw=loaders.view_draw(dataset) if augment else None)  # fmt: skip
        key, found = disk.lookup(path.cache_dir, split, dataset, parts, how, views,
                                 again="built again" if build else "not used")  # fmt: skip
        if found is not None:
            hows.append(f"read from {path.cache_dir}")
            features, targets, item_s = found
            if item_s is not None:  # what its build took: an evaluation of these images costs that again
                path.count_encoding(item_s * len(dataset) * views, len(dataset) * views)
            return placed_store(features, targets, path.precision, seed=loaders.seed, spill_dir=spill, place=place)
    if not build:
        return None, None
    # under DDP the ranks build their blocks together: a cache dir (given, or the auto recipe's features/) is not
    # read nor written, said where the log says how the store came to be (config.yaml still records it)
    unkept = f" (not read from nor kept in {path.cache_dir}: under torchrun each run builds its own)"
    which = "training" if train else "validation"
    # said before, not only after: at 224 px on a CPU a build of a few thousand images takes minutes, and a log
    # file (where the bar is drawn once a minute) held nothing, an auto run's plan not even, until it ended. The
    # validation store's build, just after the training store's that was said, is said with -v: an unfreeze
    # rebuilding both printed three lines
    building = (f"feature cache: building the {which} store: {len(dataset)} {which} {noun(dataset)}"
                f"{f' x {views} views' if views > 1 else ''} through the frozen layers before {split.boundary}, "
                "once")  # fmt: skip
    if train or not hows or not hows[0].startswith("built"):
        path.echo(building)
    else:
        log.info(building)
    hows.append("built" + (unkept if path.cache_dir is not None and dist.enabled else ""))
    start = time.perf_counter()
    batches = loaders.views(dataset, train=augment)
    try:
        with said_stopped_while_building():
            store, info = build_store(split, len(dataset), batches, path.precision, views=views, spill_dir=spill,
                                      seed=loaders.seed, channels_last=path.channels_last, place=place, dist=dist,
                                      bar=f"feature cache ({which})" if path.progress else None)  # fmt: skip
    finally:  # its workers served every view; none reads after the build
        close_loader(batches)
    seconds, items = time.perf_counter() - start, len(dataset) * views
    path.count_encoding(seconds, items)
    if key is not None:
        disk.save(path.cache_dir, key, store.features, store.targets, item_s=seconds / max(items, 1))
    return store, info
