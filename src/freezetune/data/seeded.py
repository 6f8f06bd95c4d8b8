"""Each training sample's random draws from a seed of its own, so that what a sample's augmentation draws depends on
the run's seed, the epoch (or the feature cache's view) and the sample alone: not on which loader process reads it,
how many there are, or the batch it falls in.

A loader that augments iterates keys, ``(pass_seed, index)`` (``EpochOrder(keyed=True)``: the epoch's seed; a cache
view's, ``view_seed``); ``SeededSamples`` seeds torch's, Python's and numpy's global generators from the two, mixed,
then reads the sample. Global, because torchvision's transforms draw from torch's global generator (and other
libraries' from numpy's or ``random``). In the main process (``--workers 0``) those generators are the training's own
(dropout, a user's draws): their states are put back after each read, so reading data draws nothing of the
training's, as a worker process's reads do not.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    """splitmix64's step: a bijection of 64-bit integers that spreads every input bit over the output."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def sample_seed(pass_seed: int, index: int) -> int:
    """The 64-bit seed of sample ``index``'s draws in the pass (an epoch, a cache view) seeded ``pass_seed``: the two
    mixed, so neighbouring passes and indices draw unrelated streams.

    >>> sample_seed(0, 1) == sample_seed(0, 1), sample_seed(0, 1) != sample_seed(1, 0), sample_seed(-3, 5) < 2**64
    (True, True, True)
    """
    return _mix((_mix(pass_seed & _MASK) + index) & _MASK)


def seed_globals(seed: int) -> None:
    """Seed the generators a transform draws from: torch's CPU generator (not ``torch.manual_seed``, which seeds every
    CUDA device's too: in the main process, the training's dropout there), ``random`` and numpy's global one."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed >> 32)  # (numpy takes 32 bits)


class SampleKeys(Sampler):
    """``rows`` in order, as the keys ``(pass_seed, row)`` of one pass (``keyed``; else the rows alone): a feature
    cache's view, whose ``pass_seed`` is set before each pass.

    >>> keys = SampleKeys(range(2, 4)); keys.pass_seed = 9; list(keys), list(SampleKeys(range(2), keyed=False))
    ([(9, 2), (9, 3)], [0, 1])
    """

    def __init__(self, rows: Sequence[int], *, keyed: bool = True) -> None:
        self.rows, self.keyed, self.pass_seed = rows, keyed, 0

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        return ((self.pass_seed, r) for r in self.rows) if self.keyed else iter(self.rows)


class SeededSamples(Dataset):
    """``dataset`` read by key: ``samples[(pass_seed, index)]`` is ``dataset[index]`` with the global generators seeded
    by ``sample_seed(pass_seed, index)`` first; in the main process their states are put back after.

    A loader reads a batch at once (``__getitems__``): the states are kept aside once a batch, not once a sample
    (numpy's takes 95 us to save and put back, an image's read and light augmentation at 32 px 530 us).

    >>> class Noise(Dataset):
    ...     def __getitem__(self, i): return torch.rand(()).item()
    >>> samples = SeededSamples(Noise())
    >>> _ = torch.manual_seed(0); read = samples[(7, 3)]; after_read = torch.rand(()).item()
    >>> _ = torch.manual_seed(0); untouched = torch.rand(()).item()
    >>> read == samples.__getitems__([(7, 3)])[0], after_read == untouched
    (True, True)
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        with _draws_kept():
            return [self._read(pass_seed, index) for pass_seed, index in keys]

    def _read(self, pass_seed: int, index: int):
        seed_globals(sample_seed(pass_seed, index))
        return self.dataset[index]


@contextlib.contextmanager
def _draws_kept() -> Iterator[None]:
    """In the main process, the global generators' states as they were before: the training's (dropout, a user's
    draws). A loader worker's are its own."""
    if get_worker_info() is not None:
        yield
        return
    saved = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.default_generator.set_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])
