"""The collector during a run: the objects made before it are left out of its full passes, and only during it."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import freezetune as ft
from _engine_fixtures import make_image_folder
from freezetune.config.train_config import TrainConfig
from freezetune.run.collector import older_objects_frozen

pytestmark = pytest.mark.usefixtures("single_thread_module")


class _Node:
    self: _Node


def test_older_objects_are_frozen_within_the_block_and_collected_again_after_it():
    assert gc.get_freeze_count() == 0
    made_before = [object() for _ in range(10)]
    with older_objects_frozen():
        assert gc.get_freeze_count() >= len(made_before)
        made_during = _Node()
        made_during.self = made_during  # a cycle: only the collector frees it
        alive = weakref.ref(made_during)
        del made_during
        gc.collect()
        assert alive() is None  # the run's own garbage is still collected
    assert gc.get_freeze_count() == 0


def test_the_garbage_the_block_made_is_freed_as_it_ends_without_a_pass_of_its_own():
    # a run's model and optimizer state sit in reference cycles: they waited for a full pass, often during the next run
    with older_objects_frozen():
        made_during = _Node()
        made_during.self = made_during
        alive = weakref.ref(made_during)
        del made_during
        gc.disable()  # no automatic pass frees it before the block ends
    gc.enable()
    assert alive() is None


def test_a_callers_own_freeze_is_left_as_it_was():
    callers = ["frozen by the caller"]  # tracked by the collector: listed by gc.get_objects() unless frozen
    gc.freeze()
    try:
        with older_objects_frozen():
            pass
        # not unfrozen by the run's end (the count itself moves: a frozen object freed by its refcount leaves it)
        assert gc.get_freeze_count() > 0 and not any(o is callers for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is callers for o in gc.get_objects())  # (what the check above tells apart)


def test_a_run_trains_with_older_objects_frozen_and_leaves_the_collector_as_it_found_it(tmp_path):
    # the default command (the auto recipe: a trial, then the run, each a train() within the first)
    data = make_image_folder(tmp_path / "images", train=12, val=3, test=0)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="timm:test_efficientnet", weights="none",
                      img_size=32, device="cpu", workers=0, progress=False, batch_size=8, epochs=1,
                      tensorboard=False)  # fmt: skip
    frozen_when_said = []
    gc.collect()
    gc.disable()  # no automatic pass after the run: what it left is there for the pass below to find
    try:
        ft.train(cfg, echo=lambda line: frozen_when_said.append(gc.get_freeze_count()))
        assert frozen_when_said and min(frozen_when_said) > 0
        assert gc.get_freeze_count() == 0
        assert (tmp_path / "run" / "recipe.json").is_file()  # the auto recipe ran, its trial's train() inside the run's
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, (torch.Tensor, torch.nn.Module))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not left, f"{len(left)} tensors and modules of the run were still waiting for the collector"


def test_collect_first_frees_the_garbage_made_before_the_block():
    # a dropped model in a reference cycle holds GPU memory: frozen unfreed, it stayed held through the run
    made_before = _Node()
    made_before.self = made_before
    alive = weakref.ref(made_before)
    del made_before
    with older_objects_frozen(collect_first=True):
        assert alive() is None
