"""Feature stores kept on disk between runs, so a sweep or a later ``train`` does not run the same prefix twice.

A stored store is found again by a key over everything its features depend on: the frozen prefix's weights and
buffers (not the model's name: a prefix fine-tuned in an earlier phase computes other features) and its computation
(its traced code and layers: timm's efficientnet_b0 and tf_efficientnet_b0 hold the same weights), the cut, the
images and labels (``data.fingerprint.cache_fingerprint``), how images become inputs (the model's preprocessing, the
augmentation preset, the decode path), the number of views, the seed, the dtype and, for augmented views the
device pipeline draws, the batches it draws them in (on the CPU each image's draws are its own: the loader workers and
the batch change nothing). Anything that changes one of these misses the cache; a file
damaged on disk, cut short or not, is a miss too. Nothing stale is ever read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import zipfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

from freezetune._io import atomic_save, remove_stale_temps
from freezetune.cache.model_split import Split
from freezetune.data.fingerprint import cache_fingerprint
from freezetune.errors import ResourceError
from freezetune.run.directory import read_only_folder
from freezetune.run.log import warn_once

log = logging.getLogger(__name__)

STALE_TEMP_S = 3600  # a temporary store file untouched this long, of a process not running here, is an orphan
VERSION = 7  # bump when the stored layout or what a key covers changes (2: photos turned upright by their EXIF tag;
# 3: a file's change time and inode; 4: a large JPEG decoded at a reduced scale, Preprocess.decode_side; 5: the
# prefix's computation, augmented views' batches and workers; 6: the seed for augmented views alone; 7: augmented views
# on the CPU seeded an image at a time, keyed without the workers and the batch)
_MARGIN = 64 << 20  # left free for the file system and the run's own small files


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def space_problem(folder: str | Path, nbytes: int) -> str | None:
    """Why ``nbytes`` will not fit in ``folder``'s file system (needed and free, in words), or None when they fit.

    A memory-mapped file is sparse: it is created at any size and fails only when a page is written to a full disk,
    with SIGBUS, killing the process without a word. Hence this check before it is allocated.

    >>> space_problem("/", 0) is None
    True
    >>> space_problem("/", 2**70).startswith("needs 1,125,899,906,842,624.0 MiB and 64.0 MiB to spare in '/'")
    True
    """
    free = shutil.disk_usage(folder).free
    if nbytes + _MARGIN <= free:
        return None
    return f"needs {_mib(nbytes)} and {_mib(_MARGIN)} to spare in '{folder}', {_mib(free)} free"


def ensure_space(folder: str | Path, nbytes: int, hint: str) -> None:
    """Refuse, in one line, to write ``nbytes`` of feature cache into ``folder`` when its disk lacks the room.

    Raises:
        ResourceError: not enough free space; ``hint`` says what to change.

    >>> ensure_space("/", 0, "")
    """
    problem = space_problem(folder, nbytes)
    if problem is not None:
        raise ResourceError(f"not enough disk space for the feature cache: it {problem}; {hint}")


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, shapes, dtypes, values)."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def computation_fingerprint(module: torch.nn.Module) -> str:
    """A digest of what a module computes besides its weights: its traced code (an ``fx.GraphModule``'s) and its
    layers with their settings and classes (``Conv2dSame``, a BatchNorm's eps)."""
    layers = [f"{type(m).__module__}.{type(m).__qualname__}" for m in module.modules()]
    described = "\n".join([str(getattr(module, "code", "")), repr(module), *layers])
    return hashlib.sha1(described.encode()).hexdigest()


def store_key(split: Split, dataset: Dataset, **inputs: object) -> str | None:
    """The key of the features ``split.prefix`` computes over ``dataset``; ``inputs`` describe how images become
    inputs (preprocessing, augmentation, decode path, views, seed, dtype). None: this dataset cannot be keyed."""
    data = cache_fingerprint(dataset)
    if data is None:
        return None
    described = json.dumps({"v": VERSION, "boundary": split.boundary, "how": split.how, "data": data,
                            "prefix": weights_fingerprint(split.prefix),
                            "computes": computation_fingerprint(split.prefix), **inputs}, sort_keys=True,
                           default=str)  # fmt: skip
    return hashlib.sha1(described.encode()).hexdigest()[:24]


def load(cache_dir: Path, key: str, *, with_pace: bool = False) -> tuple | None:
    """Stored ``(features, targets)`` under ``key``, memory-mapped, or None; ``with_pace``: and the seconds an item
    of its build took (through the frozen layers, its loading included), None where the store did not record it."""
    path = Path(cache_dir) / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        # torch.load never checks the zip's CRCs: bytes overwritten in place (the size unchanged) were read as features
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise ValueError(f"{damaged} fails its CRC check")
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        found = record["features"], record["targets"]
        return (*found, record.get("item_s")) if with_pace else found
    except Exception as exc:  # a damaged file is a miss, never an error: it is rebuilt and rewritten
        why = f"{type(exc).__name__}: {exc}" if isinstance(exc, ValueError) else type(exc).__name__
        log.warning("ignoring unreadable feature cache %s (%s)", path, why)
        return None


def save(cache_dir: Path, key: str, features: torch.Tensor, targets: torch.Tensor, *,
         item_s: float | None = None) -> Path | None:  # fmt: skip
    """Store ``(features, targets)`` under ``key`` (written atomically), with ``item_s``, the seconds an item of the
    build took: a run that reads the store knows what an evaluation of its images costs without building it (a budget
    keeps time for the final test by it); None when the disk lacks the room.

    The run does not need the stored copy (it trains from the store it holds), so a full cache disk costs a warning,
    not the features just computed.
    """
    if read_only_folder(cache_dir):  # shared read-only: its stores were read; nothing may be added or swept there
        warn_once(log, "feature cache not kept for later runs: --cache-dir %s is read-only (its stores are read, "
                  "new ones are not added)", cache_dir)  # fmt: skip
        return None
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # a run killed while it saved left a temporary file as large as the store: in a cache dir, outside any run dir,
    # nothing else would ever remove it. Those of live processes are kept (another run may be writing one), and any
    # younger than an hour: a cache dir may be shared with other machines, whose writers' pids mean nothing here
    remove_stale_temps(cache_dir, min_age_s=STALE_TEMP_S)
    problem = space_problem(cache_dir, features.nbytes + targets.nbytes)
    if problem is not None:
        log.warning("feature cache not kept for later runs: it %s (choose another --cache-dir)", problem)
        return None
    if features.device.type != "cpu":  # a store held on the device is written through a whole copy in host RAM
        from freezetune.device.hardware import available_ram

        ram = available_ram()
        if features.nbytes > ram // 2:
            log.warning("feature cache not kept for later runs: copying it off the %s device needs %d MiB of "
                        "RAM, over half the %d MiB free", features.device.type, features.nbytes >> 20,
                        ram >> 20)  # fmt: skip
            return None
    record = {"features": features.detach().cpu().contiguous(), "targets": targets.cpu(), "item_s": item_s}
    try:
        return atomic_save(record, Path(cache_dir) / f"{key}.pt")
    except OSError as exc:  # the room checked above taken meanwhile, a file-size limit: the run goes on without it
        log.warning("feature cache not kept for later runs: %s (%s); choose another --cache-dir", exc.strerror or exc,
                    exc.filename)  # fmt: skip
        return None


def lookup(cache_dir: Path, split: Split, dataset: Dataset, parts: list[Dataset] | None, how: dict, views: int, *,
           again: str) -> tuple[str | None, tuple | None]:  # fmt: skip
    """``dataset``'s store key under ``how`` (``store_key``'s inputs), and its stored features, targets and build
    pace (``load``'s ``with_pace``) where
    ``cache_dir`` holds them and they ``fits`` it (else None): stored whole, or as the stores of its ``parts`` (a
    joined dataset's, one after the other: the auto recipe's refit reads the trials' training and validation stores
    this way). ``again``: what the run does where they do not fit."""
    key = store_key(split, dataset, **how)
    found = load(cache_dir, key, with_pace=True) if key is not None else None
    if found is None and parts:
        each = [load(cache_dir, k, with_pace=True) if (k := store_key(split, part, **how)) is not None else None
                for part in parts]  # fmt: skip
        if all(f is not None for f in each):
            paces = [f[2] for f in each]  # the joined store's: its parts' builds, item for item
            pace = None if None in paces else sum(p * len(f[1]) for p, f in zip(paces, each, strict=True)) / max(
                sum(len(f[1]) for f in each), 1)  # fmt: skip
            # the parts as they are, one after the other: ``placed_store`` copies each into the run's store (a
            # torch.cat first held the whole store twice in RAM, and sized the store's place with half the room)
            found = [f[0] for f in each], torch.cat([f[1] for f in each]), pace
    if found is not None and not fits(found[:2], dataset, views, cache_dir, again=again):
        found = None
    return key, found


def fits(found: tuple, dataset, views: int, cache_dir: Path, *, again: str = "built again") -> bool:
    """Whether stored features are of ``dataset``: a view per ``views``, a row per item, its targets in its order.
    A file renamed or copied by hand under another store's key read 500 rows for 300 images, and its run ended in the
    LR scheduler's traceback; one of the right size would have trained on another dataset's features. ``again``:
    what the run does instead, as the warning says it."""
    features, targets = found
    shape = stored_shape(features)
    sized = shape[:2] == (views, len(dataset))
    if sized and torch.equal(targets.long(), dataset.targets.long()):
        return True
    log.warning("ignoring a stored feature cache in %s: it holds %d view(s) of %d rows, this data %d of %d items%s (a "
                "file renamed or copied there by hand?); it is %s", cache_dir, shape[0], shape[1],
                views, len(dataset), ", with other labels" if sized else "", again)  # fmt: skip
    return False


def stored_shape(features: torch.Tensor | list[torch.Tensor]) -> tuple[int, ...]:
    """The shape of stored features: a tensor's, or that of the parts ``lookup`` joins (one after the other along
    the items, dim 1).

    >>> stored_shape([torch.zeros(2, 3, 4), torch.zeros(2, 5, 4)])
    (2, 8, 4)
    """
    if isinstance(features, torch.Tensor):
        return tuple(features.shape)
    first = tuple(features[0].shape)
    return (first[0], sum(f.shape[1] for f in features), *first[2:])


def remove_empty_dirs(root: Path) -> None:
    """``root`` and the folders below it that are empty, deepest first (a folder in use stays)."""
    try:
        folders = [p for p in root.rglob("*") if p.is_dir()] if root.is_dir() else []
    except OSError:  # a folder gone while it was walked
        return
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()
