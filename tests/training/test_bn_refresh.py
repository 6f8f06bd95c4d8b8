"""BatchNorm statistics recomputed after a short run's epochs (``bn_refresh``), so that what validation scores and the
checkpoints keep are the statistics of the weights trained, not mostly the pretrained ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import freezetune as ft
from _engine_fixtures import make_image_folder, run_cli, train_argv
from freezetune.data.folder import load_image
from freezetune.data.transforms import eval_transform
from freezetune.training import bn_refresh


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _batch_means(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Each BatchNorm layer's input mean per channel over ``images``, the model in train mode (as the steps ran)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].mean((0, 2, 3)))) for m in _norms(model)]
    model.train()
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return seen


def test_a_short_runs_checkpoint_keeps_the_statistics_of_its_trained_weights(tmp_path, capsys):
    # 48 images of 4 colours, 8 steps: the running averages were still 43 % ImageNet's, and best.pt scored 58 % on
    # the very images it trained to 98 % on. Here: 24 images in one batch, 2 epochs, every layer training.
    data = make_image_folder(tmp_path / "d", train=8, val=2, test=0)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_argv(data, run, "--freeze", "none", "--epochs", "2", "--aug", "none",
                                              "--batch-size", "24"))  # fmt: skip
    assert code == 0, err
    loaded = ft.load_model(run / "best.pt")
    transform = eval_transform(loaded.preprocess)  # aug none: the training images' geometry
    images = torch.stack([transform(load_image(p)) for p in sorted((data / "train").rglob("*.png"))])
    stored = [m.running_mean.clone() for m in _norms(loaded.model)]
    # the pass's one batch: every layer's input as in a forward of all 24 images
    for kept, mean in zip(stored, _batch_means(loaded.model, images), strict=True):
        torch.testing.assert_close(kept, mean, rtol=1e-3, atol=1e-4)


@pytest.fixture
def passes(monkeypatch) -> list[int]:
    """One entry a refresh pass, which still runs."""
    seen: list[int] = []
    real = bn_refresh.refresh
    monkeypatch.setattr(bn_refresh, "refresh", lambda *a: seen.append(1) or real(*a))
    return seen


def test_a_run_long_enough_to_forget_its_start_makes_no_extra_pass(tmp_path, capsys, passes):
    data = make_image_folder(tmp_path / "d", train=8, val=2, test=0)
    # 24 images at batch 8: 3 steps an epoch; the pass follows epochs 1-9 (27 steps), not epoch 10 (30 steps)
    code, _, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--freeze", "none", "--epochs", "10"))
    assert code == 0, err
    assert len(passes) == 9


@pytest.mark.parametrize("probed", [False, True])
def test_the_auto_recipes_trials_make_no_pass_and_its_run_does(tmp_path, capsys, passes, monkeypatch, probed):
    # the trials' scores compare candidates by a rule measured on them without it; the run is what is kept. A run
    # from a probed head holds its statistics: nothing to recompute (nor in the probe, every norm frozen)
    from freezetune.auto import plan as auto_plan

    monkeypatch.setattr(auto_plan, "PROBE_BELOW_STEPS", 10 if probed else 1)  # (a trial of a few steps)
    monkeypatch.setattr(auto_plan, "PROBE_MIN_RUN_STEPS", 0)  # however short the run
    data = make_image_folder(tmp_path / "d", train=8, val=2, test=0)
    code, out, err = run_cli(capsys, *train_argv(data, tmp_path / "run", "--freeze", "auto", "--epochs", "1"))
    assert code == 0 and "auto: chose" in out, (out, err)
    assert ("from the probed head" in out) is probed and len(passes) == (0 if probed else 1)


def test_norms_that_do_not_train_are_left_as_they_are(tmp_path, capsys):
    # a linear probe: every BatchNorm frozen (eval statistics), the pretrained statistics stay bit-identical
    data = make_image_folder(tmp_path / "d", train=8, val=2, test=0)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_argv(data, run, "--freeze", "backbone", "--epochs", "1"))
    assert code == 0, err
    torch.manual_seed(0)
    fresh = ft.create_model("timm:test_efficientnet", "none", img_size=32)[0]
    trained = ft.load_model(run / "best.pt").model
    for a, b in zip(_norms(fresh), _norms(trained), strict=True):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)


@pytest.mark.parametrize("hold", ["frozen stages", "held statistics"])
def test_held_statistics_are_not_reset_before_a_forward_puts_their_layers_back_in_eval(tiny_cnn, hold):
    # model.train() sets a held layer's .training; only its next Python forward undoes it. After a CUDA graph's
    # replay (no hooks run), or a resume with no step left in its epoch, the pass took such layers for training ones:
    # reset to 0 and 1, never updated (the forward puts them back in eval first)
    from freezetune.freezing.bn_policy import hold_bn_statistics, holds_stats

    model = tiny_cnn
    for bn in _norms(model):
        bn.running_mean.fill_(0.5)
    ft.freeze(model, -3) if hold == "frozen stages" else hold_bn_statistics(model)
    model.train()
    held = [bn for bn in _norms(model) if holds_stats(bn)]
    assert held and all(bn.training for bn in held)  # as model.train() left them
    batches = [(torch.randn(4, 3, 16, 16), [0] * 4)]
    bn_refresh.refresh_if_stale(model, 1, lambda: batches, lambda module, x: module(x))
    assert all(torch.equal(bn.running_mean, torch.full_like(bn.running_mean, 0.5)) for bn in held)
    trained = [bn for bn in _norms(model) if bn not in held]
    assert (hold == "frozen stages") == bool(trained)  # and those that train were refreshed
    assert not any(torch.equal(bn.running_mean, torch.full_like(bn.running_mean, 0.5)) for bn in trained)


def test_a_pass_without_batches_keeps_the_statistics():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(2.0)
    assert bn_refresh.refresh([bn], [], bn) == 0
    assert bn.running_mean.tolist() == [2.0] * 3 and bn.momentum == 0.1


def test_steps_count_from_the_latest_unfreeze():
    assert bn_refresh.steps_on(2, 5, [(0, ["block3"])]) == 10  # opened after epoch 1: epochs 2 and 3 trained it
