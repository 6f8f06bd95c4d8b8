"""Digests of a dataset's samples and labels, for two questions that want two answers.

- ``cache_fingerprint``: may the feature cache's stored features stand for these images? A wrong yes trains on
  stale features, a wrong no costs a rebuild: each file's absolute path, size, modification and change times, and
  inode.
- ``resume_digest``: is this the data a ``last.pt`` trained on? A wrong no blocks a resume: which files (their paths
  below the folder they share) and their sizes, so the data copied to a node's local disk for each job of a
  preempted run (new times and inodes) is still the same data.

Images held in memory (IDX files) are digested by their bytes for both; a text dataset has no digest (None).
"""

from __future__ import annotations

import hashlib
import os
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


def resume_digest(dataset: Dataset) -> str | None:
    """The digest a ``last.pt`` keeps of ``dataset`` (see the module docstring), or None.

    >>> ds = InMemoryImageDataset(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    >>> resume_digest(ds) == cache_fingerprint(ds)
    True
    """

    def keys(paths: list[str]):
        paths = [os.path.abspath(p) for p in paths]
        root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]) if paths else ""
        return (os.fsencode(os.path.relpath(p, root)) + f"\0{os.path.getsize(p)}\n".encode() for p in paths)

    return _digest(dataset, keys)


def _digest(dataset: Dataset, file_keys: Callable) -> str | None:
    h = hashlib.sha1()
    if isinstance(dataset, InMemoryImageDataset):
        h.update(dataset.images.contiguous().numpy().tobytes())
    elif isinstance(dataset, FileImageDataset):
        try:  # fsencode: a file name that is not UTF-8 (an old Latin-1 zip) keeps its bytes instead of failing
            for key in file_keys([path for path, _ in dataset.samples]):
                h.update(key)
        except OSError:  # a file gone since the scan: no digest rather than a wrong one
            return None
    else:
        return None
    h.update(torch.as_tensor(dataset.targets).numpy().tobytes())
    return h.hexdigest()


def data_record(train: Dataset, val: Dataset | None) -> dict:
    """What ``last.pt`` keeps of the data it trained on, for a resume to check (``restore``): each split's size and
    digest (``resume_digest``)."""
    from freezetune.data.datasets import noun

    return {name: {"n": len(ds), "digest": resume_digest(ds), "noun": noun(ds)}
            for name, ds in (("training", train), ("validation", val)) if ds is not None}  # fmt: skip
