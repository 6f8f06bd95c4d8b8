"""``Progress``: which epoch is the best one, by the monitored metric's own direction."""

from __future__ import annotations

import pytest

from freezetune.errors import ConfigError
from freezetune.training.progress import Progress


@pytest.mark.parametrize(("monitor", "metrics", "best"), [
    ("val_acc", [0.5, 0.7, 0.6], 2),  # accuracy: higher is better
    ("val_loss", [0.9, 0.4, 0.6], 2),  # loss: lower is better
    ("val_loss", [0.9, float("nan"), 1.2], 1),  # a non-finite metric never becomes the best
    ("val_f1", [0.4, 0.3, 0.6], 3),  # macro-F1: higher is better
])  # fmt: skip
def test_the_best_epoch_follows_the_monitored_metrics_direction(monitor, metrics, best):
    progress = Progress(monitor)
    improved = [progress.update(epoch, metric) for epoch, metric in enumerate(metrics)]
    assert progress.best_epoch == best and progress.best_metric == metrics[best - 1]
    assert improved == [epoch + 1 == best or epoch == 0 for epoch in range(len(metrics))]
    assert progress.bad_epochs == len(metrics) - best and progress.epoch == len(metrics)


@pytest.mark.parametrize(("monitor", "rows", "best"), [
    # 12 validation images: 100 % at epochs 1 to 3; the third, surest, is the best (the first was kept: 4-9 points
    # of test accuracy lower)
    ("val_acc", [(1.0, 0.30), (1.0, 0.15), (1.0, 0.07), (0.9, 0.05)], 3),
    ("val_loss", [(0.2, 0.8), (0.2, 0.9), (0.3, 1.0)], 2),  # a tied loss goes to the higher accuracy
    ("val_acc", [(1.0, 0.15), (1.0, float("nan")), (1.0, 0.20)], 1),  # a later tie no surer is no better
    ("val_f1", [(0.7, 0.50), (0.7, 0.40), (0.6, 0.30)], 2),  # a tied macro-F1 goes to the lower loss
])  # fmt: skip
def test_a_tie_goes_to_the_epoch_better_on_the_other_metric(monitor, rows, best):
    progress = Progress(monitor)
    for epoch, (acc_or_loss, other) in enumerate(rows):
        progress.update(epoch, acc_or_loss, other)
    assert progress.best_epoch == best


def test_a_tie_won_is_the_best_but_no_improvement_for_early_stopping():
    # lr 1e-9: val_acc stalls while val_loss creeps down; counted as improving, early stopping never came
    progress = Progress("val_acc")
    for epoch, loss in enumerate([0.70, 0.69, 0.68, 0.67]):
        progress.update(epoch, 0.5, loss)
    assert progress.best_epoch == 4 and progress.bad_epochs == 3


def test_a_tie_after_resuming_a_last_pt_that_kept_no_tie_breaker_keeps_its_best():
    progress = Progress("val_acc")
    progress.load_state_dict({"monitor": "val_acc", "epoch": 2, "best_epoch": 1, "best_metric": 1.0})  # an older one
    assert not progress.update(2, 1.0, 0.9) and progress.best_epoch == 1


@pytest.mark.parametrize(("monitor", "n_val", "rows", "best"), [
    # 168 validation images cannot tell 60.1 % from 56.0 %: the later epoch, surer, is as good (best.pt kept the
    # first, still at a high learning rate: 48.9 % on the test split against the last's 56.4 %)
    ("val_acc", 168, [(0.601, 1.365), (0.565, 1.402), (0.560, 1.363)], 3),
    ("val_acc", 5000, [(0.601, 1.365), (0.565, 1.402), (0.560, 1.363)], 1),  # 5 000 can: 4 points are no tie
    ("val_acc", None, [(0.601, 1.365), (0.565, 1.402), (0.560, 1.363)], 1),  # no split size given: exact ties only
    ("val_acc", 168, [(0.601, 1.365), (0.590, 1.500)], 1),  # as accurate but less sure (overfitting): no better
    # ties are measured from the highest accuracy, not from the last epoch that tied: no walk downwards
    ("val_acc", 100, [(0.70, 1.0), (0.64, 0.9), (0.58, 0.8)], 2),
    ("val_f1", 168, [(0.60, 1.365), (0.56, 1.363)], 2),  # macro-F1 is held to the same noise
    ("val_loss", 168, [(0.50, 0.80), (0.51, 0.90)], 1),  # a loss is not: no standard error of it is at hand
])  # fmt: skip
def test_a_metric_within_the_validation_splits_noise_of_the_highest_ties_it(monitor, n_val, rows, best):
    progress = Progress(monitor, n_val=n_val)
    for epoch, (metric, other) in enumerate(rows):
        progress.update(epoch, metric, other)
    assert progress.best_epoch == best and progress.best_metric == rows[best - 1][0]
    assert progress.bad_epochs == len(rows) - 1  # a tie won is no improvement: early stopping's patience counts it


def test_the_highest_metric_survives_a_resume():
    progress = Progress("val_acc", n_val=100)
    for epoch, (acc, loss) in enumerate([(0.70, 1.0), (0.64, 0.9)]):
        progress.update(epoch, acc, loss)
    resumed = Progress("val_acc", n_val=100)
    resumed.load_state_dict(progress.state_dict())
    assert resumed.top_metric == 0.70 and not resumed.update(2, 0.58, 0.8) and resumed.best_epoch == 2
    assert resumed.update(3, 0.71, 2.0) and resumed.best_epoch == 4  # a new highest is the best, however unsure


def test_without_a_metric_the_latest_epoch_is_the_best_known():
    progress = Progress("val_acc")
    assert progress.update(0, None) and progress.update(1, None) and progress.best_epoch == 2


def test_an_unknown_monitor_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown monitor 'acc'; choose one of: 'val_acc', 'val_loss'"):
        Progress("acc")
