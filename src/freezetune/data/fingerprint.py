"""Digests of a dataset's samples and labels, for two questions that want two answers.

- ``cache_fingerprint``: may the feature cache's stored features stand for these images? A wrong yes trains on
  stale features, a wrong no costs a rebuild: each file's absolute path, size, modification and change times, and
  inode.
- ``resume_digest``: is this the data a ``last.pt`` trained on? A wrong no blocks a resume: which files (their paths
  below the folder they share) and their sizes, so the data copied to a node's local disk for each job of a
  preempted run (new times and inodes) is still the same data.

Images held in memory (IDX files) are digested by their bytes for both; a text dataset's resume digest is its texts
and labels (it has no cache fingerprint: None).
A ``last.pt`` also keeps its image files' list (``data_record``), so a refused resume names the files that changed
(``files_changed``).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from freezetune.data.folder import FileImageDataset
from freezetune.data.idx import InMemoryImageDataset


def cache_fingerprint(dataset: Dataset) -> str | None:
    """The feature cache's digest of ``dataset`` (see the module docstring), or None when it cannot be had cheaply.

    >>> ds = InMemoryImageDataset(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    >>> len(cache_fingerprint(ds))
    40
    """

    # absolute: a resume reads --data from config.yaml, where it is absolute; a run given a relative --data never
    # found its stores again (rebuilt and stored twice). The change time and inode: an image rewritten in place with
    # its size and modification time put back (tar, rsync -a, cp -p, touch -r) read the old features; nothing sets
    # a change time back
    def key(path: str) -> bytes:
        st = os.stat(path)
        return os.fsencode(os.path.abspath(path)) + \
            f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode()  # fmt: skip

    return _digest(dataset, lambda paths: map(key, paths))


def resume_digest(dataset: Dataset, sized: list[tuple[str, int]] | None = None) -> str | None:
    """The digest a ``last.pt`` keeps of ``dataset`` (see the module docstring), or None. ``sized``: its files'
    absolute paths and sizes, when the caller has read them (``data_record``).

    >>> ds = InMemoryImageDataset(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    >>> resume_digest(ds) == cache_fingerprint(ds)
    True
    """

    from freezetune.data.text import TextDataset

    if isinstance(dataset, TextDataset):  # (a text CSV changed in place, its row count kept, resumed in silence)
        h = hashlib.sha1()
        for text in dataset.texts:
            h.update(text.encode("utf-8", "surrogatepass") + b"\0")
        h.update(dataset.targets.numpy().tobytes())
        return h.hexdigest()

    def keys(paths: list[str]):
        entries = sized if sized is not None else _sized(paths)
        names = _names([p for p, _ in entries])
        return (os.fsencode(name) + f"\0{size}\n".encode() for name, (_, size) in zip(names, entries, strict=True))

    return _digest(dataset, keys)


def _sized(paths: list[str]) -> list[tuple[str, int]]:
    return [(path, os.path.getsize(path)) for path in map(os.path.abspath, paths)]


def _names(paths: list[str]) -> list[str]:
    """Absolute ``paths`` named below the folder they share (one file: below its folder), as ``os.path.relpath``
    names them: what follows that folder (relpath took 5 us a file). Raises ValueError for paths on two drives."""
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]) if paths else ""
    return [p[len(root) :].lstrip(os.sep) or "." for p in paths]


def _digest(dataset: Dataset, file_keys: Callable) -> str | None:
    h = hashlib.sha1()
    if isinstance(dataset, InMemoryImageDataset):
        h.update(dataset.images.contiguous().numpy().tobytes())
    elif isinstance(dataset, FileImageDataset):
        try:  # fsencode: a file name that is not UTF-8 (an old Latin-1 zip) keeps its bytes instead of failing
            for key in file_keys([path for path, _ in dataset.samples]):
                h.update(key)
        except (OSError, ValueError):  # a file gone since the scan, paths on two drives: no digest, not a wrong one
            return None
    else:
        return None
    h.update(torch.as_tensor(dataset.targets).numpy().tobytes())
    return h.hexdigest()


def data_record(train: Dataset, val: Dataset | None, per_class: int | None = None) -> dict:
    """What ``last.pt`` keeps of the data it trained on, for a resume to check (``restore``): each split's size and
    digest (``resume_digest``), and an image folder's or CSV's file list (``files_changed`` names what changed).
    Each file's size is read once for both. ``per_class``: the training images were drawn, that many a class, from
    more (``--per-class``), which the refusal of other data then explains."""
    from freezetune.data.text import noun

    splits = {name: ds for name, ds in (("training", train), ("validation", val)) if ds is not None}
    try:
        sized = {name: _sized([p for p, _ in ds.samples]) for name, ds in splits.items()
                 if isinstance(ds, FileImageDataset)}  # fmt: skip
    except OSError:  # a file gone since the scan: the digests say so (None), and no list is kept
        sized = {}
    lists = _file_lists(splits, sized)
    drawn = {"per_class": per_class} if per_class is not None else {}
    return {name: {"n": len(ds), "digest": resume_digest(ds, sized.get(name)), "noun": noun(ds),
                   **({"files": lists[name]} if name in lists else {}), **(drawn if name == "training" else {})}
            for name, ds in splits.items()}  # fmt: skip


MAX_LISTED_FILES = 200_000  # a larger dataset's last.pt keeps no list (some MB at every epoch's save)


def _file_lists(splits: dict[str, Dataset], sized: dict[str, list[tuple[str, int]]]) -> dict[str, bytes]:
    """Each file split's ``[name, size, class]`` entries (JSON, compressed), named below the folder all the splits
    share: the validation split held out of the training folder moves files between splits, not out of the data."""
    paths = [p for entries in sized.values() for p, _ in entries]
    if not paths or len(paths) > MAX_LISTED_FILES:
        return {}
    try:
        names = iter(_names(paths))
    except ValueError:  # splits on two drives (Windows): nothing they share to name files below
        return {}
    lists = {}
    for split, entries in sized.items():
        classes, labels = splits[split].classes, splits[split].targets.tolist()
        rows = [[next(names), size, classes[label]] for (_, size), label in zip(entries, labels, strict=True)]
        lists[split] = zlib.compress(json.dumps(rows).encode())  # a name may hold any character, a newline too
    return lists


def files_changed(saved: dict, now: dict) -> str | None:
    r"""What differs between two ``data_record``'s file lists, all splits together, with examples: files gone, new,
    of another size or of another class. None when either record has no list (an older ``last.pt``, IDX data).

    >>> def rec(*rows): return {"training": {"files": zlib.compress(json.dumps(rows).encode())}}
    >>> files_changed(rec(["a/1.png", 10, "a"], ["a/2.png", 10, "a"]), rec(["a/1.png", 12, "a"]))
    "files: 1 gone ('a/2.png'), 1 of another size ('a/1.png')"
    """
    old, new = _listed(saved), _listed(now)
    if old is None or new is None:
        return None
    common = old.keys() & new.keys()
    groups = (("gone", old.keys() - new.keys()), ("new", new.keys() - old.keys()),
              ("of another size", {p for p in common if old[p][0] != new[p][0]}),
              ("of another class", {p for p in common if old[p][1] != new[p][1]}))  # fmt: skip
    parts = [f"{len(paths)} {what} ({_examples(paths)})" for what, paths in groups if paths]
    if not parts:
        return None
    drawn = (saved.get("training") or {}).get("per_class")
    if drawn is None or old.keys() == new.keys():
        return "files: " + ", ".join(parts)
    # one file added to a class drew another set of its files: the list names the drawn files, not the one added
    return (
        f"files drawn by --per-class {drawn}: {', '.join(parts)} (each class's are drawn from all of its files: "
        "one file added to or removed from a class changes the draw)"
    )


def _listed(record: dict) -> dict[str, tuple[int, str]] | None:
    files: dict[str, tuple[int, str]] = {}
    for split in record.values():
        if "files" not in split:
            return None
        for path, size, name in json.loads(zlib.decompress(split["files"])):
            files[path] = (size, name)
    return files


def _examples(paths: set[str], shown: int = 3) -> str:
    first = sorted(paths)[:shown]
    return ", ".join(repr(p) for p in first) + (", ..." if len(paths) > shown else "")
