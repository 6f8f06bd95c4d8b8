"""One training step (``freezetune.training.step.Step``): what it trains, what it skips, which LR it reports."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from freezetune.device.precision import resolve_precision
from freezetune.run.checkpoint import TrainingState
from freezetune.training.epoch_log import TrainProgress
from freezetune.training.step import Step

CPU = torch.device("cpu")


def _step(model, *, lr=0.5, halve_each_step=False, **kwargs) -> Step:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5**i) if halve_each_step else None
    precision = resolve_precision(CPU, "off")
    state = TrainingState(model, optimizer, scheduler, precision.scaler(), None)
    return Step(state, nn.CrossEntropyLoss(), precision, **kwargs)


def _meter(total=4) -> TrainProgress:
    return TrainProgress(total, "epoch 1/1", enabled=False, device=CPU)


def _batch(n=8):
    torch.manual_seed(0)
    return torch.randn(n, 4), torch.randint(0, 2, (n,))


def test_a_step_trains_the_module_and_reports_the_lr_it_used_not_the_next_one():
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    step, meter = _step(model, halve_each_step=True), _meter()
    assert step(model, *_batch(), meter)
    assert step(model, *_batch(), meter)
    assert not torch.equal(model.weight, before)
    # the second step used 0.25; the scheduler has since moved the optimizer to 0.125 (a metrics row names 0.25)
    assert step.lrs == [pytest.approx(0.25)]
    assert step.state.optimizer.param_groups[0]["lr"] == pytest.approx(0.125)
    assert meter.step == 2 and meter.skipped == 0


def test_a_non_finite_batch_is_skipped_without_touching_the_weights_and_the_schedule_keeps_its_length():
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    step, meter = _step(model, halve_each_step=True, skip_nonfinite=3), _meter()
    inputs, targets = _batch()
    inputs[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "scheduler before optimizer" warning is meant here, and not shown
        assert not step(model, inputs, targets, meter)
    assert torch.equal(model.weight, before)
    assert meter.skipped == 1 and meter.step == 1
    assert step.state.optimizer.param_groups[0]["lr"] == pytest.approx(0.25)  # the scheduler stepped
    assert step.lrs is None  # no optimizer step ran


def test_without_skip_nonfinite_a_nan_batch_trains_and_the_meter_reports_it():
    # the check then stays on the device: one read an epoch, no host sync a step
    model = nn.Linear(4, 2)
    step, meter = _step(model), _meter(total=1)
    inputs, targets = _batch()
    inputs[0, 0] = float("nan")
    assert step(model, inputs, targets, meter)
    assert torch.isnan(model.weight).any()
    assert meter.diverged


def test_grad_clip_bounds_the_update():
    model, clipped = nn.Linear(4, 2), nn.Linear(4, 2)
    clipped.load_state_dict(model.state_dict())
    for m, clip in ((model, None), (clipped, 0.01)):
        before = m.weight.detach().clone()
        _step(m, lr=1.0, grad_clip=clip)(m, *_batch(), _meter())
        m.change = (m.weight.detach() - before).norm().item()
    assert clipped.change <= 0.01 + 1e-6 < model.change


def test_a_batch_of_one_names_the_flag_to_change_only_where_it_was_given():
    from freezetune.training.step import one_value_batch

    exc = ValueError("Expected more than 1 value per channel when training")
    assert "give --batch-size 2 or more" in str(one_value_batch(exc, 1, 1))
    assert "give more --epoch-images" in str(one_value_batch(exc, 1, 32, epoch_images=3))
    assert "give more training images" in str(one_value_batch(exc, 1, 32))  # --epoch-images was never given
