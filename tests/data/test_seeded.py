"""Tests for freezetune.data.seeded: each training image's augmentation drawn from its own seed, so a run draws the
same whatever its loader workers, and those workers start once a run."""

from __future__ import annotations

import csv
import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from _engine_fixtures import make_image_folder, run_cli, train_argv
from freezetune.data import Loaders, build_loader
from freezetune.data.idx import InMemoryImageDataset
from freezetune.data.transforms import train_transform
from freezetune.model.preprocess import Preprocess
from freezetune.run import checkpoint

pytestmark = pytest.mark.usefixtures("single_thread_module")

PRE = Preprocess(input_size=16)


def _augmented(n: int = 20) -> InMemoryImageDataset:
    images = torch.randint(0, 256, (n, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return InMemoryImageDataset(images, torch.arange(n), [str(i) for i in range(n)], train_transform(PRE, "standard"))


def _epochs(loader, epochs: int = 2) -> list[torch.Tensor]:
    batches = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        batches += [x for x, _ in loader]
    return batches


@pytest.mark.multiprocess
def test_build_loader_gives_the_same_augmented_batches_with_any_number_of_workers():
    # each worker drew from its own seed: --workers 0 and --workers 2 trained on other crops
    with_none, with_two = (_epochs(build_loader(_augmented(), batch_size=4, train=True, workers=w, seed=3))
                           for w in (0, 2))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(with_none, with_two, strict=True))
    assert not torch.equal(with_none[0], _epochs(build_loader(_augmented(), batch_size=4, train=True, seed=4))[0])


def test_reading_augmented_batches_in_the_training_process_leaves_its_random_draws_as_they_were():
    # --workers 0: the transforms drew from the training's own generators, so its dropout depended on the data read
    loader = build_loader(_augmented(), batch_size=4, train=True, workers=0)
    draws = []
    for read in (True, False):
        torch.manual_seed(0), random.seed(0), np.random.seed(0)
        if read:
            next(iter(loader))
        draws.append((torch.rand(3).tolist(), random.random(), np.random.rand()))
    assert draws[0] == draws[1]


def test_each_rank_of_a_padded_shard_augments_an_image_as_one_process_does():
    # ranks drew from seeds of their own; a sample's seed is its image's now: a rank needs none
    from freezetune.device.distributed import DistInfo

    def images(dist: DistInfo) -> dict[int, torch.Tensor]:
        loaders = Loaders(batch_size=3, device=torch.device("cpu"), seed=1, preprocess=PRE, aug="standard",
                          workers=0, dist=dist)  # fmt: skip
        loader = loaders.train(_augmented(5))  # (targets: each image's index) 5 images on 2 ranks: one read twice
        loader.set_epoch(2)
        return {int(i): x for xs, ys in loader for x, i in zip(xs, ys, strict=True)}

    alone, ranks = images(DistInfo()), [images(DistInfo(rank=r, world=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3 and {*ranks[0], *ranks[1]} == set(alone)
    assert all(torch.equal(x, alone[i]) for shard in ranks for i, x in shard.items())


class _Pids(Dataset):
    """Which process read each item."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[int, int]:
        return os.getpid(), i % 2


@pytest.mark.multiprocess
def test_a_training_loaders_workers_start_once_and_serve_every_epoch():
    # under the spawn start method (macOS, Windows) each start imports torch afresh: seconds an epoch
    loaders = Loaders(batch_size=2, device=torch.device("cpu"), seed=0, preprocess=PRE, aug="light", workers=2)
    loader = loaders.train(_Pids())
    try:
        pids = {int(p) for epoch in range(3) for p in _epoch_pids(loader, epoch)}
    finally:
        loader.close()
    assert len(pids) == 2 and os.getpid() not in pids


def _epoch_pids(loader, epoch: int) -> torch.Tensor:
    loader.set_epoch(epoch)
    return torch.cat([p for p, _ in loader])


@pytest.mark.multiprocess
def test_a_run_trains_the_same_with_no_loader_workers_as_with_two(tmp_path, capsys):
    # the default count depends on the host (its CPUs, its /dev/shm): the same command trained otherwise elsewhere
    data = make_image_folder(tmp_path / "images", train=6, val=2, test=2)
    runs = []
    for workers in ("0", "2"):
        out = tmp_path / f"workers{workers}"
        code, _, err = run_cli(capsys, *train_argv(data, out, "--workers", workers, "--aug", "standard", "--freeze",
                                                   "-2", "--epochs", "2", "--batch-size", "4"))  # fmt: skip
        assert code == 0, err
        runs.append(out)
    rows = [list(csv.DictReader(open(out / "metrics.csv", newline=""))) for out in runs]
    columns = [k for k in rows[0][0] if k.startswith(("train_", "val_"))]
    assert [[r[k] for k in columns] for r in rows[0]] == [[r[k] for k in columns] for r in rows[1]]
    weights = [checkpoint.load(out / "last.pt")["state_dict"] for out in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
