"""The frozen-prefix feature cache: training from it computes the same function as training without it."""

import dataclasses
import logging
import os
import sys
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from conftest import Terminal
from freezetune.cache import FeatureStore, build_store, store_loader
from freezetune.cache.model_split import split_model
from freezetune.cache.path import FeaturePath
from freezetune.config.train_config import TrainConfig
from freezetune.data import Loaders, build_loader
from freezetune.data.loaders import close_loader
from freezetune.device.precision import resolve_precision
from freezetune.training.trainer import Trainer


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes x 10 train / 4 val images with class-specific colour and texture."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 4)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.zeros((20, 20, 3), np.uint8)
                base[..., c] = 160
                noise = rng.integers(0, 90, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"{i}.png")
    return root


def _config(root, tmp_path, name, **kw) -> TrainConfig:
    base = dict(
        model="timm:test_efficientnet", weights="none", data=str(root), img_size=32, epochs=3, batch_size=8,
        aug="none", device="cpu", workers=0, progress=False, tensorboard=False, out=str(tmp_path / name),
        freeze="backbone", seed=3,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _losses(trainer: Trainer) -> list[tuple[float, float]]:
    result = trainer.fit()
    return [(row["train_loss"], row["val_loss"]) for row in result.history]


def _cache_lines(lines: list[str]) -> list[str]:
    """The lines that say what a cache build made (``feature cache: ...; built in 1.2s``), not that one starts."""
    building = "feature cache: building"
    return [line for line in lines if line.startswith("feature cache:") and not line.startswith(building)]


def _whole_model(monkeypatch) -> None:
    """Runs with the cache off train the whole model on images, as before they streamed the frozen prefix."""
    monkeypatch.setattr(FeaturePath, "_stream", lambda self: None)


def test_cached_training_matches_uncached(image_folder, tmp_path, monkeypatch):
    cached = Trainer(_config(image_folder, tmp_path, "cached", cache="memory"), echo=lambda *_: None)
    _whole_model(monkeypatch)
    plain = Trainer(_config(image_folder, tmp_path, "plain", cache="off"), echo=lambda *_: None)
    assert cached.features.cached and not plain.features.cached
    got, want = _losses(cached), _losses(plain)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    head_c = cached.model.get_classifier().weight
    head_p = plain.model.get_classifier().weight
    torch.testing.assert_close(head_c, head_p, rtol=1e-4, atol=1e-5)


def test_a_run_that_draws_fewer_images_than_a_store_holds_streams_them_and_builds_none(image_folder, tmp_path):
    # --epoch-images far below the set: a 20 000-image store took 139 s on a CPU for a run that drew 5 000 of them
    lines = []
    few = Trainer(_config(image_folder, tmp_path, "few", epochs=2, epoch_images=12, aug="light"), echo=lines.append)
    assert few.features.train_store is None and few.features.streamed and few.features.val_store is not None
    assert not any("building the training store" in line for line in lines)
    (said,) = [line for line in lines if line.startswith("feature cache: no training store")]
    # what happens, then why on an indented line: in one, 280 characters wrapped to four lines of a terminal pane
    assert said.split("\n") == [
        "feature cache: no training store: each batch runs the frozen layers before classifier forward only, on the "
        "plain images, and the rest trains on their output",
        "  the 2 epoch(s) left draw 24 training images, no more than the 30 a store would hold (--cache memory builds "
        "it all the same)"]  # fmt: skip
    assert lines[lines.index(said) + 1].startswith("feature cache: validation store 0 MiB on cpu, built in ")
    # it trains what the store would have (the plain images, not augmented afresh: one epoch of 1 000 Fashion-MNIST
    # images scored 1.5-2.4 points lower so), in the same order
    stored = Trainer(_config(image_folder, tmp_path, "stored", epochs=2, epoch_images=12, aug="light",
                             cache="memory"), echo=lambda *_: None)  # fmt: skip
    assert stored.features.train_store is not None
    np.testing.assert_allclose(_losses(few), _losses(stored), rtol=1e-4, atol=1e-5)
    # a store that serves more draws than it holds is built: more epochs; later runs' (the auto recipe's run reads its
    # trials' cache) or runs of unknown number (a sweep's recipes, a cache dir given) where it is kept; one asked for;
    # augmented views (seeded: a resume, with fewer epochs left, must see the same ones)
    kept = {"cache_dir": str(tmp_path / "fc")}
    built = ((dict(epochs=3), 0.0), (kept, 1.0), (kept, None), (dict(cache="memory"), 0.0), (dict(cache_views=2), 0.0))
    streamed = (({}, 1.0), ({}, None), (kept, 0.0))  # nothing kept, no later run can read it; or nothing reads it
    for i, (kw, later) in enumerate((*built, *streamed)):
        kw = {**kw, "cache_dir": f"{kw['cache_dir']}{i}"} if "cache_dir" in kw else kw  # (no store read from another)
        cfg = _config(image_folder, tmp_path, f"run{i}", epoch_images=12, aug="light", **{"epochs": 2, **kw})
        lines.clear()
        run = Trainer(cfg, echo=lines.append, later_epochs=later)
        assert (run.features.train_store is not None) is (i < len(built)), (kw, later)
        assert any("building the training store" in line for line in lines) is (i < len(built)), (kw, later)


def test_a_store_counts_only_the_epochs_before_the_schedule_next_moves_its_cut(image_folder, tmp_path):
    # --epochs 3 --unfreeze epoch:1 built a store of the 30 images for the one epoch before the cut moved (30 draws)
    def store(unfreeze: str) -> bool:
        cfg = _config(image_folder, tmp_path, unfreeze.replace(":", ""), unfreeze=unfreeze, aug="light")
        return Trainer(cfg, echo=lambda *_: None).features.train_store is not None

    assert not store("epoch:1") and store("epoch:2")  # 1 epoch (30 draws) on the first cut; 2 (60)
    assert store("plateau:patience=1")  # when it opens depends on the metric: the run's 3 epochs count


def test_unfreeze_rebuilds_cache_at_new_boundary_and_still_matches(image_folder, tmp_path, monkeypatch):
    lines = []  # (--cache memory: under auto a cut that serves one epoch streams, no store)
    cached = Trainer(_config(image_folder, tmp_path, "c", cache="memory", unfreeze="epoch:1"), echo=lines.append)
    _whole_model(monkeypatch)
    plain = Trainer(_config(image_folder, tmp_path, "p", cache="off", unfreeze="epoch:1"), echo=lambda *_: None)
    np.testing.assert_allclose(_losses(cached), _losses(plain), rtol=1e-4, atol=1e-5)
    boundaries = _cache_lines(lines)
    # built at the head, then rebuilt after each of the two unfreezes (none after the last epoch)
    assert len(boundaries) == 3, boundaries
    assert len({line.split(";")[0] for line in boundaries}) == 3  # three different boundaries


def test_the_unaugmented_cache_is_said_once_a_run_not_at_each_rebuild(image_folder, tmp_path):
    lines = []  # (--cache memory: under auto a cut that serves one epoch streams, no store)
    Trainer(_config(image_folder, tmp_path, "c", cache="memory", aug="light", unfreeze="epoch:1"),
            echo=lines.append).fit()  # fmt: skip
    # built, then rebuilt at each of two unfreezes
    assert len(_cache_lines(lines)) == 3
    assert sum("cached without augmentation" in line for line in lines) == 1, lines
    # a build's line before it, the training store's: each unfreeze said three feature cache lines
    assert [line.split(":")[1] for line in lines if line.startswith("feature cache: building")] == [
        " building the training store"] * 3, lines  # fmt: skip


def test_cache_turns_off_when_boundary_is_no_longer_cacheable(image_folder, tmp_path):
    lines = []
    trainer = Trainer(
        _config(image_folder, tmp_path, "x", cache="auto", unfreeze={1: "all"}, epochs=2),
        echo=lines.append,
    )
    assert trainer.features.cached
    trainer.fit()
    assert not trainer.features.cached
    assert any("feature cache off" in line for line in lines)


def test_disk_cache_spills_to_run_dir_and_matches_and_leaves_no_file(image_folder, tmp_path):
    # a spilled store is a file mapped from the run dir, unlinked as soon as it is mapped: it stayed there after the
    # run, or a stop during the build (gigabytes with big data, which no resume reads: it rebuilds)
    lines = []
    disk = Trainer(_config(image_folder, tmp_path, "d", cache="disk", epochs=2), echo=lines.append)
    assert any(line.startswith("feature cache:") and " on disk" in line for line in lines), lines
    assert disk.features.train_store.features.untyped_storage().filename is not None  # mapped from a file
    assert not (tmp_path / "d" / "cache").exists()  # no file, nor the empty folders that held them
    mem = Trainer(_config(image_folder, tmp_path, "m", cache="memory", epochs=2), echo=lambda *_: None)
    np.testing.assert_allclose(_losses(disk), _losses(mem), rtol=1e-6, atol=1e-7)


def test_a_rank_clears_its_own_spill_folders_only(image_folder, tmp_path, monkeypatch):
    # under torchrun each rank cleared the whole cache/ after its build: the other rank's folder, empty for a moment,
    # vanished as it was about to write its store ("No such file or directory"), in 3 of 5 runs with an unfreeze
    from freezetune.cache.path import FeaturePath
    from freezetune.device.distributed import DistInfo

    trainer = Trainer(_config(image_folder, tmp_path, "d", cache="disk", epochs=1), echo=lambda *_: None)
    features = trainer.features
    monkeypatch.setattr(features, "loaders", dataclasses.replace(features.loaders, dist=DistInfo(rank=0, world=2)))
    monkeypatch.setattr(FeaturePath, "_build_cache", lambda self, left: (self.spill_dir / "rank0" / "train").mkdir(
        parents=True, exist_ok=True))  # fmt: skip
    other = features.spill_dir / "rank1" / "train"
    other.mkdir(parents=True)  # rank 1's, about to hold its store
    features.build()
    assert other.is_dir() and not (features.spill_dir / "rank0").exists()


def test_views_are_sampled_per_epoch_reproducibly(image_folder, tmp_path):
    trainer = Trainer(
        _config(image_folder, tmp_path, "v", cache="memory", aug="light", cache_views=3, epochs=1),
        echo=lambda *_: None,
    )
    store = trainer.features.train_store
    assert store.features.shape[0] == 3
    assert not torch.equal(store.features[0], store.features[1])  # distinct augmented views were stored
    store.set_epoch(4)
    first = store.view.clone()
    store.set_epoch(5)
    assert not torch.equal(first, store.view)
    store.set_epoch(4)
    assert torch.equal(first, store.view)
    assert set(first.tolist()) <= {0, 1, 2}


def test_a_batch_holds_each_images_view_of_the_epoch():
    views, n = 3, 10
    feats = torch.randn(views, n, 4, 2)
    index = torch.tensor([7, 0, 3, 3, 9])
    for features in (feats, feats.transpose(2, 3)):  # contiguous (one index_select) and not (indexed per view)
        store = FeatureStore(features, torch.arange(n) % 4, seed=1)
        for epoch in range(3):
            store.set_epoch(epoch)
            got, targets = store.batch(index)
            assert torch.equal(got, torch.stack([features[store.view[i], i] for i in index]))
            assert torch.equal(targets, index % 4)
            # an epoch's batches, its rows gathered once: the same as each slice's batch, the short last one too
            for (a, ya), (b, yb) in zip(store.batches(index, 2), map(store.batch, index.split(2)), strict=True):
                assert torch.equal(a, b) and torch.equal(ya, yb)


def test_store_loader_shuffles_like_the_image_loader():
    n = 37
    feats = torch.arange(n, dtype=torch.float32).view(1, n, 1)
    store = FeatureStore(feats, torch.arange(n), seed=0)
    cached = store_loader(store, batch_size=8, train=True, seed=5)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return torch.tensor([float(i)]), i

    images = build_loader(Items(), batch_size=8, train=True, workers=0, seed=5)
    for epoch in range(2):
        for loader in (cached, images):
            loader.set_epoch(100 + epoch)
        got = [y.tolist() for _, y in cached]
        want = [y.tolist() for _, y in images]
        assert got == want
        assert sorted(sum(got, [])) == list(range(n))


def test_build_store_rejects_nothing_and_reports_placement(image_folder, tmp_path):
    trainer = Trainer(_config(image_folder, tmp_path, "s", cache="off", epochs=1), echo=lambda *_: None)
    split, _ = split_model(trainer.model)
    train = trainer.data.train

    def views(workers: int):
        loaders = Loaders(batch_size=2, device=torch.device("cpu"), seed=0, preprocess=trainer.preprocess,
                          decode="cpu", workers=workers)  # fmt: skip
        return loaders.views(train, train=True)

    precision = resolve_precision(torch.device("cpu"), "off")
    store, info = build_store(split, len(train), views(0), precision, views=1, spill_dir=tmp_path / "spill")
    assert len(store) == len(trainer.data.train) == 30
    assert info.place == "cpu" and info.bytes == store.features.numel() * 4
    assert "MiB on cpu" in info.describe()
    # image files decode in loader processes (as build_loader's default); the features do not depend on it
    parallel, _ = build_store(split, len(train), views(2), precision, views=1, spill_dir=tmp_path / "spill")
    torch.testing.assert_close(parallel.features, store.features, rtol=0, atol=0)
    assert torch.equal(parallel.targets, store.targets)


def test_cache_is_built_through_the_device_loader_and_matches_uncached(image_folder, tmp_path, monkeypatch):
    # decode="gpu" runs the device pipeline on the CPU: the cache must read images the way training does
    from freezetune.data import gpu

    calls = []
    real = gpu.build_device_loader

    def spy(dataset, **kw):
        calls.append(kw)
        return real(dataset, **kw)

    monkeypatch.setattr(gpu, "build_device_loader", spy)
    cached = Trainer(_config(image_folder, tmp_path, "gc", cache="memory", decode="gpu"), echo=lambda *_: None)
    assert cached.features.cached
    builds = [kw for kw in calls if kw.get("rows") is not None and not kw["order"].shuffle]
    # the train and the val cache (30 and 12 images), each in dataset order, with the eval geometry (aug none)
    assert [len(kw["rows"]) for kw in builds] == [30, 12] and not any(kw["train"] for kw in builds)
    plain = Trainer(_config(image_folder, tmp_path, "gp", cache="off", decode="gpu"), echo=lambda *_: None)
    np.testing.assert_allclose(_losses(cached), _losses(plain), rtol=1e-4, atol=1e-5)


def test_cache_features_for_your_own_loop(image_folder, tmp_path):
    # the public API: freeze, cache once, train the suffix on cached batches; the suffix on cached features must
    # compute what the whole model computes on the images
    import freezetune as ft

    trainer = Trainer(_config(image_folder, tmp_path, "own", cache="off", epochs=1), echo=lambda *_: None)
    model, dataset = trainer.model, trainer.data.train
    torch.manual_seed(123)
    state = torch.get_rng_state()
    split, store = ft.cache_features(model, dataset, batch_size=8, spill_dir=tmp_path / "spill")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's seed is the caller's: it was reseeded per view
    model.eval()
    images = torch.stack([dataset[i][0] for i in range(6)])
    with torch.no_grad():
        torch.testing.assert_close(split.suffix_eval(store.features[0, :6]), model(images), rtol=1e-4, atol=1e-5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    head = model.get_classifier().weight.detach().clone()
    for feats, y in ft.store_loader(store, batch_size=8, train=True, seed=0):
        loss = torch.nn.functional.cross_entropy(split.suffix_train(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(head, model.get_classifier().weight)  # the suffix shares the model's parameters
    # a stage the cache computed, opened later (an Unfreezer's step): it sat in the optimizer and never trained
    cached = ft.stages(model)[1].name
    ft.unfreeze(model, cached)
    with pytest.raises(ft.FreezetuneError, match=r"parameter\(s\) of the cached prefix train now .* cache them again"):
        split.suffix_train(feats)
    with torch.no_grad():  # scoring reads the same weights: nothing to refuse
        split.suffix_eval(feats)
    ft.unfreeze(model, "all")
    with pytest.raises(ft.FreezetuneError, match="cannot cache features"):
        ft.cache_features(model, dataset)


@pytest.mark.parametrize("place", ["memory", "disk"])
def test_cache_features_without_a_spill_dir_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch, place):
    # a notebook caching again and again must not fill /tmp: in memory nothing is created, on disk the temporary
    # file is removed at once while the store keeps reading it
    import tempfile

    import torchvision

    import freezetune as ft

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = ft.replace_head(torchvision.models.resnet18(), 3)
    ft.freeze(model, "backbone")
    images = torch.randn(6, 3, 32, 32)
    split, store = ft.cache_features(model, torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 2] * 2)),
                                     batch_size=4, place=place)  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(split.suffix_eval(store.features[0]), model(images), rtol=1e-4, atol=1e-5)


def test_one_cached_view_holds_the_plain_images_not_one_random_augmentation(image_folder, tmp_path):
    # one fixed random crop per image, seen every epoch, trained 3.4 points worse than the plain image: with a single
    # view the cache stores what evaluation sees; augmented views are cached only when there are several
    lines = []
    light = Trainer(_config(image_folder, tmp_path, "l", cache="memory", aug="light", epochs=1), echo=lines.append)
    plain = Trainer(_config(image_folder, tmp_path, "n", cache="memory", aug="none", epochs=1), echo=lambda *_: None)
    torch.testing.assert_close(light.features.train_store.features, plain.features.train_store.features)
    assert any("cached without augmentation" in line for line in lines)
    views = Trainer(_config(image_folder, tmp_path, "v", cache="memory", aug="light", cache_views=2, epochs=1),
                    echo=lambda *_: None)  # fmt: skip
    assert not torch.equal(views.features.train_store.features[0], plain.features.train_store.features[0])


def test_a_full_cache_dir_keeps_no_copy_and_says_so(tmp_path, monkeypatch, caplog):
    import shutil

    from freezetune.cache import disk

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda _: usage._replace(free=3 * 2**20))
    with caplog.at_level("WARNING"):
        assert disk.save(tmp_path / "c", "k", torch.zeros(4, 8), torch.zeros(4, dtype=torch.long)) is None
    assert not list((tmp_path / "c").iterdir())
    assert (
        "needs 0.0 MiB and 64.0 MiB to spare in" in caplog.text
        and "3.0 MiB free" in caplog.text
        and "--cache-dir" in caplog.text
    )
    monkeypatch.undo()
    assert disk.save(tmp_path / "c", "k", torch.zeros(4, 8), torch.zeros(4, dtype=torch.long)).is_file()


def test_a_cache_write_that_fails_midway_keeps_no_copy_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    # the room checked, then a file-size limit (or a disk another job filled meanwhile): the run stopped on an error
    # before epoch 1, though it trains from the store it holds
    import errno

    from freezetune.cache import disk

    def full(record, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(disk, "atomic_save", full)
    with caplog.at_level("WARNING"):
        assert disk.save(tmp_path / "c", "k", torch.zeros(4, 8), torch.zeros(4, dtype=torch.long)) is None
    assert "not kept for later runs: No space left on device" in caplog.text and "k.pt" in caplog.text


def test_a_cache_dir_loses_the_temporary_files_of_killed_writers_not_of_live_ones(tmp_path):
    # a run killed while it saved a store left a temporary file as large as the store in the cache dir, for good
    import os

    from freezetune.cache import disk

    cache = tmp_path / "c"
    cache.mkdir()
    dead, live = cache / ".k0.pt.999999999.0123abcd.tmp", cache / f".k1.pt.{os.getppid()}.0123abcd.tmp"
    recent = cache / ".k2.pt.999999998.0123abcd.tmp"  # perhaps another machine's writer, whose pid means nothing here
    for path in (dead, live, recent):
        path.write_bytes(b"half a store")
    for path in (dead, live):
        os.utime(path, (time.time() - 2 * disk.STALE_TEMP_S,) * 2)
    assert disk.save(cache, "k", torch.zeros(4, 8), torch.zeros(4, dtype=torch.long)).is_file()
    assert not dead.exists() and live.exists() and recent.exists()


def test_cache_features_names_what_a_dataset_of_other_items_yields():
    import freezetune as ft
    from conftest import TinyCNN
    from freezetune.errors import DataError

    model = TinyCNN()
    ft.freeze(model, "backbone")
    with pytest.raises(DataError, match=r"\(input, target\) pairs.*first item is a dict with keys 'image', 'label'"):
        ft.cache_features(model, [{"image": torch.zeros(3, 32, 32), "label": 0}] * 2)
    with pytest.raises(DataError, match="empty dataset"):
        ft.cache_features(model, [])


@pytest.mark.parametrize(("place", "where"), [("auto", "gpu"), ("memory", "pinned"), ("disk", "disk")])
def test_a_cuda_runs_cache_goes_where_its_place_says(tmp_path, monkeypatch, place, where):
    # --cache memory put the features on the GPU when they fitted there, as auto does; memory means RAM
    from types import SimpleNamespace

    from freezetune.cache import store

    real_empty, asked = torch.empty, []

    def empty(*args, device=None, pin_memory=False, **kw):  # no CUDA here: record where the store was asked for
        asked.append("gpu" if device is not None else "pinned" if pin_memory else "cpu")
        return real_empty(*args, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))
    cuda = SimpleNamespace(device=torch.device("cuda"))
    _, info = store._allocate((1, 4, 8), torch.float32, cuda, tmp_path / "spill", place)
    assert info.place == where and [p for p in asked if p != "cpu"] == ([] if place == "disk" else [where])


def test_a_cuda_store_counts_the_memory_torch_holds_unused_as_free(tmp_path, monkeypatch):
    # a store dropped (an unfreeze's rebuild, the auto recipe's trials, a notebook's last run) leaves its blocks
    # reserved by torch's allocator, which the driver's free figure counts as taken: the next store, which fitted in
    # them, went to pinned RAM
    from types import SimpleNamespace

    from freezetune.cache import store

    real_empty, asked = torch.empty, []

    def empty(*args, device=None, pin_memory=False, **kw):  # no CUDA here: record where the store was asked for
        asked.append("gpu" if device is not None else "pinned" if pin_memory else "cpu")
        return real_empty(*args, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 80 << 30))  # 1 MiB free
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 30)  # 2 GiB held, unused
    cuda = SimpleNamespace(device=torch.device("cuda"))
    _, info = store._allocate((1, 1024, 1024), torch.float32, cuda, tmp_path / "spill", "auto")  # 4 MiB
    assert info.place == "gpu" and asked[-1] == "gpu"


def test_cache_features_refuses_an_unknown_place():
    # "ram" was taken for "auto"
    import torchvision
    from torch.utils.data import TensorDataset

    import freezetune as ft

    model = ft.replace_head(torchvision.models.resnet18(), 3)
    ft.freeze(model, "backbone")
    with pytest.raises(ft.FreezetuneError, match=r"unknown place 'ram'; places are: 'auto', 'memory', 'disk'"):
        ft.cache_features(model, TensorDataset(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])), place="ram")


class _ScaledAfterHead(nn.Module):
    """A model fx cannot trace (a branch on the batch) whose forward divides the head's output by a temperature."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc, self.temperature = nn.Linear(4, 2), temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(0, 2)
        return self.fc(self.body(x)) / self.temperature


def test_a_cache_that_would_drop_what_the_model_computes_after_its_head_is_refused():
    # the head-hook split trained fc alone on the cache: the /temperature was lost, silently
    from torch.utils.data import TensorDataset

    import freezetune as ft

    data = TensorDataset(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    for temperature, ok in ((1.0, True), (3.0, False)):
        model = _ScaledAfterHead(temperature)
        ft.freeze(model, "backbone")
        if ok:
            split, _ = ft.cache_features(model, data)
            assert split.how == "head-hook"
            continue
        with pytest.raises(ft.FreezetuneError, match=r"computes after its head .* train on images \(--cache off\)"):
            ft.cache_features(model, data)


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile])
def test_cache_features_splits_the_model_inside_a_wrapper(wrap):
    # a wrapped model did not trace ("the model does not trace with torch.fx") or had no `fc`
    import torchvision
    from torch.utils.data import TensorDataset

    import freezetune as ft

    model = ft.replace_head(torchvision.models.resnet18(), 2)
    ft.freeze_to(model, -2)
    split, store = ft.cache_features(wrap(model), TensorDataset(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])))
    assert split.boundary == "layer4" and split.how == "fx"


def test_a_hugging_face_image_model_caches_through_its_head_hook():
    # the head-hook check read the model's output as a tensor: a Hugging Face model returns .logits in an object
    from torch.utils.data import TensorDataset
    from transformers import ViTConfig, ViTForImageClassification

    import freezetune as ft

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)  # fmt: skip
    model = ViTForImageClassification(config)
    ft.freeze(model, "backbone")
    split, store = ft.cache_features(model, TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])))
    assert split.how == "head-hook" and store.features.shape[1] == 4


def test_a_folders_fingerprint_is_the_same_however_its_path_is_spelled(image_folder, monkeypatch):
    # a resume reads --data from config.yaml (absolute): a run started with a relative --data rebuilt its whole cache
    # on resume and stored it in the cache dir a second time
    from freezetune.data import build_datasets
    from freezetune.data.fingerprint import cache_fingerprint
    from freezetune.model.preprocess import Preprocess

    absolute = build_datasets(str(image_folder), preprocess=Preprocess(input_size=32)).train
    monkeypatch.chdir(image_folder.parent)
    relative = build_datasets(image_folder.name, preprocess=Preprocess(input_size=32)).train
    assert relative.samples[0][0] != absolute.samples[0][0]  # the spelling differs ...
    assert cache_fingerprint(relative) == cache_fingerprint(absolute)  # ... the files do not


def test_an_image_rewritten_with_its_size_and_mtime_put_back_is_new_data(tmp_path):
    # tar, rsync -a, cp -p or touch -r keep a modification time: the key (path, size, mtime) read the old features
    # of images whose pixels had changed (test accuracy 95.8 % from the stale cache, 58.3 % without it)
    from freezetune.data.fingerprint import cache_fingerprint
    from freezetune.data.folder import FileImageDataset

    image = tmp_path / "a.png"
    image.write_bytes(b"old pixels")
    dataset = FileImageDataset([(str(image), 0)], ["a"])
    before, st = cache_fingerprint(dataset), image.stat()
    image.write_bytes(b"new pixels")  # the same size
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert cache_fingerprint(dataset) != before


def test_the_cache_line_says_which_store_was_read_and_which_built_and_where_each_lies(image_folder, tmp_path):
    # "read from DIR" was printed when any store was read: the training store, built over minutes, included; and
    # the validation store's size and place were never shown
    def cache_line(name: str) -> str:
        lines = []
        Trainer(_config(image_folder, tmp_path, name, cache_dir=str(tmp_path / "fc")), echo=lines.append)
        return _cache_lines(lines)[0]

    first = cache_line("a")
    assert "; validation 0 MiB on cpu; built in" in first
    again = cache_line("b")
    assert f"; read from {tmp_path / 'fc'} in " in again and "built" not in again
    largest = max((tmp_path / "fc").rglob("*.pt"), key=lambda p: p.stat().st_size)  # the training store's
    largest.unlink()
    assert f"; training store built, validation store read from {tmp_path / 'fc'} in " in cache_line("c")


def test_a_read_only_cache_dir_is_read_and_what_it_lacks_is_built_without_writing_there(image_folder, tmp_path,
                                                                                       monkeypatch, capsys, caplog):  # fmt: skip
    # a team's features on a read-only mount: the run was refused ("is not writable") before reading any of them
    import freezetune as ft

    fc = tmp_path / "fc"
    Trainer(_config(image_folder, tmp_path, "a", cache_dir=str(fc)), echo=print)
    min(fc.rglob("*.pt"), key=lambda p: p.stat().st_size).unlink()  # the validation store: one it lacks
    kept = sorted((p, p.stat().st_mtime_ns) for p in fc.rglob("*"))
    real = os.access  # root may write anywhere: a read-only mount is stood in for
    monkeypatch.setattr(os, "access", lambda path, mode: not (mode & os.W_OK and os.path.samefile(path, fc))
                        and real(path, mode))  # fmt: skip
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        result = ft.train(_config(image_folder, tmp_path, "b", cache_dir=str(fc), epochs=1))
    out = capsys.readouterr().out
    assert f"training store read from {fc}" in out and "validation store built" in out, out
    assert f"feature cache not kept for later runs: --cache-dir {fc} is read-only" in caplog.text
    assert sorted((p, p.stat().st_mtime_ns) for p in fc.rglob("*")) == kept and result.history


def test_a_stored_cache_of_other_rows_under_a_stores_key_is_built_again(image_folder, tmp_path, caplog):
    # two stores swapped by name: 500 rows read for 300 images, and the run ended in the LR scheduler's traceback
    def run(name: str) -> list[str]:
        lines = []
        trainer = Trainer(_config(image_folder, tmp_path, name, cache_dir=str(tmp_path / "fc"), epochs=2),
                          echo=lines.append)  # fmt: skip
        trainer.fit()
        return lines

    run("a")
    train_store, val_store = sorted((tmp_path / "fc").rglob("*.pt"), key=lambda p: p.stat().st_size, reverse=True)
    train_bytes = train_store.read_bytes()
    train_store.write_bytes(val_store.read_bytes())
    val_store.write_bytes(train_bytes)
    with caplog.at_level(logging.WARNING):
        lines = run("b")
    assert caplog.text.count("ignoring a stored feature cache in") == 2, caplog.text
    assert any(line.startswith("feature cache:") and "built in" in line and "read from" not in line for line in lines)
    # the right size, other labels (a store of the same images labelled otherwise): built again too
    from freezetune.cache import disk

    key = max((tmp_path / "fc").rglob("*.pt"), key=lambda p: p.stat().st_size).stem
    features, targets = (t.clone() for t in disk.load(tmp_path / "fc", key))
    disk.save(tmp_path / "fc", key, features, torch.roll(targets, 1))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        lines = run("c")
    assert "of 30 items, with other labels (a file renamed or copied there by hand?)" in caplog.text, caplog.text
    assert "training store built, validation store read from" in _cache_lines(lines)[0]


def test_a_cache_build_shows_a_progress_bar_when_the_run_does(image_folder, tmp_path, monkeypatch):
    # a large folder's cache built for minutes without a word (6 min of silence before the first line on 55 000);
    # in a terminal the bar is drawn at once (written to a file, after a minute: epoch_log.progress_bar)
    for name, progress in (("bar", True), ("quiet", False)):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        Trainer(_config(image_folder, tmp_path, name, progress=progress), echo=lambda *_: None)
        err = terminal.getvalue()
        if progress:
            assert "feature cache (training)" in err and "feature cache (validation)" in err and "img" in err
        else:
            assert "feature cache (" not in err


def test_a_store_stopped_while_it_builds_leaves_no_spill_file(tmp_path):
    from freezetune.cache import store as store_mod

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    model[0].requires_grad_(False)
    split, _ = split_model(model)

    def batches(view):  # the first batch is stored, then the run is stopped
        yield torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store_mod.build_store(split, 4, batches, resolve_precision(torch.device("cpu"), "off"), views=1,
                              spill_dir=tmp_path / "spill", place="disk")  # fmt: skip
    assert not list(tmp_path.rglob("feature_cache.bin"))


def test_a_slow_cache_build_without_a_cache_dir_suggests_one(image_folder, tmp_path, monkeypatch):
    # a resume or a plateau unfreeze rebuilt a cache of minutes again, and nothing said --cache-dir keeps it
    from freezetune.cache import path

    monkeypatch.setattr(path, "SLOW_BUILD_S", 0.0)  # every build is slow here
    lines = []
    Trainer(_config(image_folder, tmp_path, "slow"), echo=lines.append)
    assert any(line.startswith("note: the cache took") and "--cache-dir DIR keeps it" in line for line in lines)
    lines.clear()
    Trainer(_config(image_folder, tmp_path, "kept", cache_dir=str(tmp_path / "fc")), echo=lines.append)
    assert not any("--cache-dir DIR keeps it" in line for line in lines)  # it has one


def test_a_store_held_on_the_device_is_not_pinned_whoever_builds_its_loader():
    # a CUDA run's FeaturePath asked every store's batches pinned: a store placed on the GPU (--cache auto when it
    # fits) failed at the first step, "cannot pin 'CUDAFloatType' only dense CPU tensors can be pinned". A meta
    # store stands in for a CUDA one: torch refuses to pin both alike
    from freezetune.cache.store import EpochOrder, StoreLoader

    store = FeatureStore(torch.empty(1, 4, 3, device="meta"), torch.tensor([0, 1, 0, 1]), seed=0)
    with pytest.raises(RuntimeError, match="cannot pin"):
        torch.empty(2, device="meta").pin_memory()
    for loader in (StoreLoader(store, 2, EpochOrder(4, shuffle=False), pin=True),
                   store_loader(store, batch_size=2, train=False, seed=0, pin=True)):  # fmt: skip
        assert not loader.pin and [f.shape for f, _ in loader] == [(2, 3), (2, 3)]


def test_a_store_on_the_device_too_large_for_the_ram_keeps_no_copy_and_says_so(tmp_path, monkeypatch, caplog):
    # its copy to the cache dir went through host RAM whole (.cpu()): a GPU store may be half an H200's 139 GiB
    from freezetune.cache import disk
    from freezetune.device import hardware

    monkeypatch.setattr(hardware, "available_ram", lambda: 1 << 20)
    features = torch.empty(1, 1024, 512, device="meta")  # a device's store of 2 MiB, never copied
    with caplog.at_level("WARNING"):
        assert disk.save(tmp_path / "c", "k", features, torch.zeros(1024, dtype=torch.long)) is None
    assert "not kept for later runs: copying it off the meta device needs 2 MiB of RAM" in caplog.text
    assert "over half the 1 MiB" in caplog.text and not list((tmp_path / "c").iterdir())


def test_augmented_views_are_read_again_whatever_the_cpu_workers_and_built_again_for_other_device_batches(
    image_folder, tmp_path
):
    # the device pipeline draws a batch's crops at once: a run with other batches read views it would not have drawn.
    # On the CPU each image's crops are its own, whatever the workers and the batch (they were keyed by both)
    def cache_line(name: str, **kw) -> str:
        lines = []
        cfg = _config(image_folder, tmp_path, name, cache_dir=str(tmp_path / "fc"), aug="light", cache_views=2, **kw)
        Trainer(cfg, echo=lines.append)
        return _cache_lines(lines)[0]

    assert "; built in" in cache_line("a")
    for name, kw in [("b", {}), ("c", dict(batch_size=4)), ("d", dict(workers=1))]:
        again = cache_line(name, **kw)  # both stores read
        assert "; read from" in again and "built" not in again, name
    device = cache_line("e", decode="gpu")  # (its images are other inputs: both built)
    assert "; built in" in device and "read" not in device
    assert "training store built, validation store read" in cache_line("f", decode="gpu", batch_size=4)


def test_an_augmented_cache_view_holds_the_same_features_whatever_the_loader_workers_and_batch(image_folder, tmp_path):
    # each worker drew from a seed of its own: the cache's crops, and the run trained on them, changed with --workers
    trainer = Trainer(_config(image_folder, tmp_path, "s", cache="off", epochs=1, aug="light"), echo=lambda *_: None)
    split, _ = split_model(trainer.model)
    train, precision = trainer.data.train, resolve_precision(torch.device("cpu"), "off")

    def features(workers: int, batch: int) -> torch.Tensor:
        loaders = Loaders(batch_size=batch, device=torch.device("cpu"), seed=0, preprocess=trainer.preprocess,
                          aug="light", decode="cpu", workers=workers)  # fmt: skip
        views = loaders.views(train, train=True)
        try:
            return build_store(split, len(train), views, precision, views=2, spill_dir=tmp_path / "spill")[0].features
        finally:
            close_loader(views)

    in_process = features(0, 2)
    assert torch.equal(features(2, 2), in_process) and not torch.equal(in_process[0], in_process[1])
    # the same crops at another batch (the frozen layers' sums, batched otherwise, may differ in the last digits)
    torch.testing.assert_close(features(1, 4), in_process, rtol=1e-4, atol=1e-5)


def test_another_seed_reads_the_stores_it_cannot_change_and_builds_the_augmented_views_anew(image_folder, tmp_path):
    # the seed draws augmented views alone: an evaluation store (validation, and training with one unaugmented view)
    # was built and kept again for each seed of a sweep
    from freezetune.model.create import create_model

    weights = tmp_path / "w.pt"  # (random weights would be drawn by the seed: another prefix)
    torch.save(create_model("timm:test_efficientnet", "none")[0].state_dict(), weights)

    def cache_line(name: str, **kw) -> str:
        lines = []
        cfg = _config(image_folder, tmp_path, name, cache_dir=str(tmp_path / "fc"), weights=str(weights), **kw)
        Trainer(cfg, echo=lines.append)
        return _cache_lines(lines)[0]

    assert "; built in" in cache_line("a", seed=0)
    again = cache_line("b", seed=1)
    assert "; read from" in again and "built" not in again
    views = dict(aug="light", cache_views=2)
    assert "training store built, validation store read" in cache_line("c", seed=0, **views)
    assert "training store built, validation store read" in cache_line("d", seed=1, **views)
    assert "built" not in cache_line("e", seed=1, **views)  # the seed's own views, read


def test_a_prefix_with_the_same_weights_that_computes_otherwise_is_another_store():
    # timm's efficientnet_b0 and tf_efficientnet_b0 hold the same weights (random init, one seed); the tf one pads
    # "same" and its BatchNorm eps is 1e-3: they shared one key, and the second read the first's features
    from freezetune.cache.disk import computation_fingerprint, weights_fingerprint

    def prefix(eps: float) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=eps)).eval()

    a, b = prefix(1e-5), prefix(1e-3)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert computation_fingerprint(a) != computation_fingerprint(b)
    assert computation_fingerprint(a) == computation_fingerprint(prefix(1e-5))  # found again by the next run


def test_a_prefix_whose_weights_differ_in_one_value_is_another_store():
    # the key's weights part: a digest of names and shapes alone gave a second run with other weights on the same
    # --cache-dir the first run's features
    import copy

    from freezetune.cache.disk import weights_fingerprint

    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    weight, statistic = copy.deepcopy(a), copy.deepcopy(a)
    with torch.no_grad():
        weight[0].weight[0, 0, 0, 0] += 1e-3
    statistic[1].running_mean[0] += 1.0  # BatchNorm's statistics shape the features as much as a weight
    assert len({weights_fingerprint(m) for m in (a, weight, statistic)}) == 3
    assert weights_fingerprint(a) == weights_fingerprint(copy.deepcopy(a))


def test_a_store_is_read_again_only_by_a_run_of_the_same_weights_precision_and_seed(image_folder, tmp_path):
    # each of these computes other features (or draws other augmented views) from the same images: read under
    # the first run's key, a bf16 run trained on fp32 features, a seed sweep on one seed's views
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3)
    same, other = tmp_path / "same.pt", tmp_path / "other.pt"
    torch.save(model.state_dict(), same)
    with torch.no_grad():
        model.conv_stem.weight.mul_(1.01)
    torch.save(model.state_dict(), other)

    def cache_line(name: str, **kw) -> str:
        lines = []
        cfg = _config(image_folder, tmp_path, name, cache_dir=str(tmp_path / "fc"), aug="light", cache_views=2,
                      freeze="-3", **{"weights": str(same), **kw})  # fmt: skip
        Trainer(cfg, echo=lines.append)
        return _cache_lines(lines)[0]

    assert "; built in" in cache_line("a")
    assert "; read from" in cache_line("b") and "built" not in cache_line("c")  # the same run: both stores read
    for name, changed in (("w", {"weights": str(other)}), ("p", {"amp": "bf16"})):
        assert "; built in" in cache_line(name, **changed), changed  # neither store read
    # another seed draws other views; the validation store is one evaluation view, which no seed changes
    assert "; training store built, validation store read from" in cache_line("s", seed=4)


def test_a_store_overwritten_in_place_is_a_miss_not_features(tmp_path, caplog):
    # bytes overwritten with the size unchanged: torch.load does not check the zip's CRCs and read them as features
    from freezetune.cache import disk

    disk.save(tmp_path, "k", torch.arange(40_000, dtype=torch.float32).reshape(1, 100, 400), torch.zeros(100).long())
    path = tmp_path / "k.pt"
    data = bytearray(path.read_bytes())
    assert disk.load(tmp_path, "k") is not None
    middle = len(data) // 2
    data[middle : middle + 5000] = b"G" * 5000
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert disk.load(tmp_path, "k") is None
    assert "ignoring unreadable feature cache" in caplog.text and "CRC" in caplog.text


def test_stochastic_depth_of_the_frozen_stages_is_cached_with_them(image_folder, tmp_path):
    # torchvision's EfficientNet ships with stochastic depth 0.2 in its blocks: drawn in the frozen stages (the
    # default), the cache cuts before the first that draws and every later frozen block runs each step, said with the
    # flag that changes it. Run as at inference (--frozen-dropout off), the whole frozen prefix is cached (that the
    # cached path trains the whole model's numbers: test_model_split's test of the held layers), and the run says so
    kw = dict(model="torchvision:efficientnet_b0", freeze="-3", epochs=1)
    lines: list[str] = []
    cached = Trainer(_config(image_folder, tmp_path, "off", cache="memory", frozen_dropout="off", **kw),
                     echo=lines.append)  # fmt: skip
    assert _cache_lines(lines)[0].startswith("feature cache: cached at the input of features.7 (fx);"), lines
    cached.fit()
    assert "frozen stages: 14 stochastic depth layers run as at inference (--frozen-dropout off; keep draws" in "".join(
        lines
    )
    kept: list[str] = []
    Trainer(_config(image_folder, tmp_path, "kept", cache="memory", **kw), echo=kept.append)
    assert "cached at the input of features.2 (fx), not of features.7: frozen layers" in _cache_lines(kept)[0], kept
    assert "--frozen-dropout off runs them as at inference" in _cache_lines(kept)[0]


def test_stored_parts_are_joined_into_one_store_without_a_whole_copy_between(tmp_path, monkeypatch):
    # the auto recipe's refit reads the trials' training and validation stores as one: a torch.cat of them held the
    # whole store twice in RAM (2.27 GB peak for a 581 MiB store) and sized its place with half the room
    from freezetune.cache import disk
    from freezetune.cache.store import placed_store

    parts = [torch.randn(2, 5, 3), torch.randn(2, 4, 3)]
    for i, part in enumerate(parts):
        disk.save(tmp_path / "fc", f"k{i}", part, torch.full((part.shape[1],), i), item_s=0.01 * (i + 1))
    monkeypatch.setattr(disk, "store_key", lambda split, dataset, **how: f"k{dataset}" if dataset != "all" else "none")
    joined = type("Joined", (), {"__len__": lambda self: 9, "targets": torch.tensor([0] * 5 + [1] * 4)})()
    key, found = disk.lookup(tmp_path / "fc", None, joined, [0, 1], {}, 2, again="built again")
    features, targets, pace = found
    assert isinstance(features, list) and pace == pytest.approx((0.01 * 5 + 0.02 * 4) / 9)
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("a whole copy of the features"))
    store, _ = placed_store(features, targets, resolve_precision(torch.device("cpu"), "off"), seed=0,
                            spill_dir=tmp_path / "spill")  # fmt: skip
    assert torch.equal(store.features, cat(parts, dim=1)) and torch.equal(store.targets, targets)


def test_a_training_store_no_ram_nor_disk_holds_streams_its_batches_under_cache_auto(image_folder, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    # the run stopped at its start ("not enough disk space ... or pass --cache off") where --cache auto streams what
    # the store would have held; --cache memory, asked for, still refuses
    import freezetune.cache.store as store_module
    from freezetune.errors import ResourceError

    real = store_module._allocate

    def no_room(shape, *args, **kwargs):  # the training store (30 images) alone: the validation's (12) fits
        if shape[1] == 30:
            raise ResourceError("not enough disk space for the feature cache: it needs 9 MiB, 1 MiB free; train into "
                                "an --out on a disk with room, or pass --cache off")  # fmt: skip
        return real(shape, *args, **kwargs)

    monkeypatch.setattr(store_module, "_allocate", no_room)
    lines = []
    run = Trainer(_config(image_folder, tmp_path, "auto", epochs=2), echo=lines.append)
    assert run.features.train_store is None and run.features.streamed and run.features.val_store is not None
    (said,) = [line for line in lines if line.startswith("feature cache: no training store")]
    assert said == ("feature cache: no training store: not enough disk space for the feature cache: it needs 9 MiB, 1 "
                    "MiB free; each batch runs the frozen layers before classifier forward only instead")  # fmt: skip
    assert lines[lines.index(said) + 1].startswith("feature cache: validation store 0 MiB on cpu, built in ")
    assert len(run.fit().history) == 2
    with pytest.raises(ResourceError, match="or pass --cache off"):
        Trainer(_config(image_folder, tmp_path, "memory", epochs=2, cache="memory"), echo=lambda *_: None)


def test_a_store_is_built_at_the_training_batch_on_a_cpu_and_twice_it_on_an_accelerator(image_folder):
    # twice the training batch left a CPU's caches: EfficientNet-Lite0's frozen layers took 2.2x the time an image
    # (64 px, batch 64 against 32), and the store's build twice what streaming them per batch took
    from freezetune.data.datasets import build_datasets
    from freezetune.model.create import create_model

    _, pre = create_model("timm:test_efficientnet", "none", img_size=32)
    data = build_datasets(str(image_folder), preprocess=pre)
    cpu = Loaders(batch_size=4, device=torch.device("cpu"), seed=0, preprocess=pre, aug="none", workers=0)
    assert cpu.inference_batch == 4 and [len(y) for _, y in cpu.views(data.train, train=False)(0)][:2] == [4, 4]
    assert dataclasses.replace(cpu, device=torch.device("cuda")).inference_batch == 8
    # an augmented view's key names the batch the device pipeline draws it in; on the CPU each image draws its own
    assert cpu.view_draw(data.train) == {} and dataclasses.replace(cpu, decode="gpu").view_draw(data.train) == {
        "batch_size": 4
    }
