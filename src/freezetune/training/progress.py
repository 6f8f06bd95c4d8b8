"""How far a run has come (``Progress``: finished epochs, the best epoch and its metric, epochs without
improvement) and what a finished run produced (``RunResult``).

``Progress`` is a small object with ``state_dict()``, saved in ``last.pt`` and restored on resume, so the trainer
keeps no loose counters. ``update`` is the one place that decides whether an epoch improved on the best.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freezetune.config.options import DEFAULT_MONITOR, FRACTIONS, MONITOR_MODES, MONITORS, TIE_BREAKS, check_choice


@dataclass
class Progress:
    """Progress of a run monitored on ``monitor`` (``val_acc`` and ``val_f1`` are maximised, ``val_loss`` minimised).

    >>> p = Progress("val_acc"); p.update(0, 0.5), p.update(1, 0.4), p.best_epoch, p.bad_epochs
    (True, False, 1, 1)
    """

    monitor: str = DEFAULT_MONITOR
    epoch: int = 0  # epochs finished
    best_epoch: int = 0  # 1-based; 0 before the first epoch
    best_metric: float | None = None
    best_other: float | None = None  # the best epoch's other metric (val_loss for val_acc): it breaks a tie
    # the validation split's size: an accuracy (or macro-F1) within its noise of the highest so far ties it
    n_val: int | None = None
    top_metric: float | None = None  # the best metric any epoch reached (best.pt's may be one tied with it)
    bad_epochs: int = 0  # epochs since the best one
    # A last.pt saved mid-epoch: the steps of epoch ``epoch`` (0-based) already trained, and what continuing it
    # exactly needs (the epoch's running train totals, the RNG state after that step). 0 and None at epoch ends.
    step: int = 0
    partial: dict[str, Any] | None = None
    # seconds this run spent in the processes before this one (``RunResult.seconds``' keys): a resumed run's time
    # counts them too (a sweep's table compared a resumed recipe by its last process's seconds alone)
    spent: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("monitor", self.monitor, MONITORS)

    def update(self, epoch: int, metric: float | None, other: float | None = None, *,
               spent: dict[str, float] | None = None) -> bool:  # fmt: skip
        """Record that ``epoch`` (0-based) finished with ``metric``; True when it is the new best.

        Without a metric (no validation data) the latest epoch is the best we know. A non-finite metric never
        becomes the best. A tie goes to the better ``other`` metric (``val_loss`` when ``val_acc`` is monitored, and
        the reverse): on a small validation set accuracies tie often, and the first epoch to reach a score kept
        ``best.pt`` over later ones as accurate and surer (a test accuracy 2 to 9 points lower). With ``n_val``, an
        accuracy or macro-F1 within the split's noise of the highest so far (one standard error of the difference of
        two accuracies on ``n_val`` images, ``difference_noise``) ties it as well: 168 images cannot tell 60.1 % from
        56.0 %, and best.pt kept a first epoch, still at a high learning rate, 7.5 points below its last on the test
        split. Such an epoch is the best, not an improvement: early stopping's patience counts it, as a stalled
        metric whose loss creeps down. ``spent``: the run's seconds so far (kept as given when None).

        >>> p = Progress("val_acc"); p.update(0, 1.0, 0.15), p.update(1, 1.0, 0.07), p.update(2, 1.0, 0.09)
        (True, True, False)
        >>> p.best_epoch, p.bad_epochs
        (2, 2)
        >>> p = Progress("val_acc", n_val=168)
        >>> p.update(0, 0.601, 1.365), p.update(1, 0.565, 1.402), p.update(2, 0.56, 1.363)
        (True, False, True)
        >>> p.best_epoch, p.best_metric, p.top_metric, p.bad_epochs
        (3, 0.56, 0.601, 2)
        """
        self.epoch, self.step, self.partial = epoch + 1, 0, None
        self.spent = self.spent if spent is None else dict(spent)
        if metric is None:
            self.best_epoch, self.bad_epochs = epoch + 1, 0
            return True
        top = self.top_metric if self.top_metric is not None else self.best_metric  # (an older last.pt: its best)
        improved = _beats(metric, top, self.monitor)  # (never a non-finite one; anything beats none)
        # (a last.pt of an older freezetune has no best_other: its ties keep the best it had)
        tied = metric == self.best_metric or self._within_noise(metric, top)
        tie_won = (not improved and tied and self.best_other is not None
                   and _beats(other, self.best_other, other_monitor(self.monitor)))  # fmt: skip
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        if improved:
            self.top_metric = metric
        if improved or tie_won:
            self.best_metric, self.best_other, self.best_epoch = metric, other, epoch + 1
        return improved or tie_won

    def noise_tie(self, items: str = "images") -> str | None:
        """What the log says when the best epoch is one that ties the highest within the split's noise (not an
        improvement, not an exact tie): best.pt moved to a lower score, and why. None otherwise.

        >>> p = Progress("val_acc", n_val=168)
        >>> p.update(0, 0.601, 1.365), p.noise_tie(), p.update(1, 0.56, 1.363)
        (True, None, True)
        >>> print(p.noise_tie())
        best.pt: epoch 2, val_acc 56.0 % within the noise of 168 validation images of the highest, 60.1 % (one \
standard error of a difference: 5.3 points), at a lower val_loss
        """
        top, best = self.top_metric, self.best_metric
        if top is None or best is None or best == top or not self._within_noise(best, top):
            return None
        noise = 100 * difference_noise(top, self.n_val or 1)
        return (f"best.pt: epoch {self.best_epoch}, {self.monitor} {100 * best:.1f} % within the noise of {self.n_val} "
                f"validation {items} of the highest, {100 * top:.1f} % (one standard error of a difference: "
                f"{noise:.1f} points), at a lower {other_monitor(self.monitor)}")  # fmt: skip

    def _within_noise(self, metric: float | None, top: float | None) -> bool:
        """Whether an accuracy (or macro-F1) ``metric`` is as good as ``top`` on a split of ``n_val`` images."""
        # accuracy and macro-F1, the fractions (macro-F1 held to an accuracy's noise: a rule of thumb)
        if self.monitor not in FRACTIONS or not self.n_val or metric is None or top is None:
            return False
        if not (math.isfinite(metric) and math.isfinite(top)):
            return False
        return top - metric <= difference_noise(top, self.n_val)

    def at_step(self, step: int, partial: dict[str, Any], *, spent: dict[str, float] | None = None) -> None:
        """Record that ``step`` steps of the unfinished epoch have trained (a mid-epoch ``last.pt`` follows), and the
        run's seconds so far (``spent``; kept as given when None)."""
        self.step, self.partial = step, partial
        self.spent = self.spent if spent is None else dict(spent)

    def reset_patience(self) -> None:
        """New capacity (an unfreeze): give it the full early-stop patience."""
        self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def other_monitor(monitor: str) -> str:
    """The metric that breaks a tie of ``monitor``.

    >>> other_monitor("val_acc"), other_monitor("val_f1"), other_monitor("val_loss")
    ('val_loss', 'val_loss', 'val_acc')
    """
    return TIE_BREAKS[monitor]


def difference_noise(p: float, n_val: int, *, floored: bool = True) -> float:
    """One standard error of the difference of two accuracies near ``p`` on ``n_val`` images (``floored``: a split
    all right or all wrong is not noiseless; on 5 images or fewer the floor exceeds the error near 75 %).

    >>> round(difference_noise(0.75, 100), 3), round(difference_noise(0.75, 400), 3)
    (0.061, 0.031)
    >>> round(difference_noise(0.75, 2, floored=False), 3)
    0.433
    """
    n = max(n_val, 1)
    return math.sqrt(2 * (max(p * (1 - p), 1 / n) if floored else p * (1 - p)) / n)


def _beats(value: float | None, best: float | None, monitor: str) -> bool:
    """Whether ``value`` of ``monitor`` is strictly better than ``best`` (a missing or non-finite one never is)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value > best if MONITOR_MODES[monitor] == "max" else value < best


NOT_HELD_OUT = "they were not held out of the training data"  # why a validation set given as such does not refit


@dataclass(repr=False)
class RunResult:
    """What a finished run produced (``freezetune.train`` returns it): where, the best validation metric, the test
    metrics of ``best.pt`` (``test["acc"]``; None without a test split or a final test), every epoch's metrics row
    (``history``, as ``metrics.csv``) and the seconds spent (``cache``: the feature-cache build at set-up;
    ``epochs``: the epoch loop, with its checkpoints and any cache rebuild after an unfreeze; ``val``: the validation
    within it). Training cost: cache + epochs - val. The trained model: ``freezetune.load_model(r.best_checkpoint)``.

    >>> RunResult(Path("runs/r1"), 2, 0.91, {"acc": 0.885}, [{"epoch": 1}, {"epoch": 2}])
    RunResult(runs/r1: best epoch 2 of 2, val_acc 0.91, test acc 0.885)
    """

    run_dir: Path
    best_epoch: int
    best_metric: float | None
    test: dict | None = None
    history: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    data_kind: str = "images"  # what the items were, for messages: "images" or "texts"
    no_refit: str = NOT_HELD_OUT  # why its validation set could not train too, "" when it could (``DataBundle``)
    monitor: str = DEFAULT_MONITOR  # what best_metric is
    steps_per_epoch: int = 0  # optimizer steps an epoch (a trial's one epoch: how much it trained)
    train_items: int = 0  # images (or texts) in its training set, a held-out validation split not among them
    eval_item_s: float | None = None  # seconds an item of an evaluation of the whole model took (``FeaturePath``)

    @property
    def refit_fits(self) -> bool:
        """Whether its validation set could have trained too (``refit``)."""
        return not self.no_refit

    @property
    def best_val_acc(self) -> float | None:
        """The validation accuracy of the best epoch, whatever the run monitored: what trials and recipes are compared
        by unless ``val_f1`` is monitored (a ``val_loss`` run's ``best_metric`` is a loss, and the highest one had
        won).

        >>> RunResult(Path("r"), 2, 0.4, history=[{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.7}]).best_val_acc
        0.7
        """
        return self.best_val("val_acc")

    def best_val(self, metric: str) -> float | None:
        """``metric`` (a column of ``history``: ``val_acc``, ``val_f1``, ...) at the best epoch, None without it.

        >>> RunResult(Path("r"), 1, 0.4, history=[{"epoch": 1, "val_acc": 0.5, "val_f1": 0.25}]).best_val("val_f1")
        0.25
        """
        row = next((r for r in self.history if r.get("epoch") == self.best_epoch), None)
        value = row.get(metric) if row else None
        return float(value) if value is not None else None

    @property
    def best_checkpoint(self) -> Path:
        """``best.pt``: the weights of the best epoch, whose test metrics ``test`` holds."""
        from freezetune.run.checkpoint import BEST

        return Path(self.run_dir) / BEST

    def __repr__(self) -> str:
        # the dataclass's own repr printed every epoch's row and the confusion matrix: kilobytes in a notebook cell
        metric = "" if self.best_metric is None else f", {self.monitor} {self.best_metric:.4g}"
        test = "" if not self.test or self.test.get("acc") is None else f", test acc {self.test['acc']:.4g}"
        epochs = f" of {len(self.history)}" if self.history else ""
        return f"RunResult({self.run_dir}: best epoch {self.best_epoch}{epochs}{metric}{test})"

    @property
    def train_seconds(self) -> float:
        """What the user paid to train: cache + epochs - val (the per-epoch validation selects, it does not train).

        >>> RunResult(Path("r"), 1, None, seconds={"cache": 2.0, "epochs": 10.0, "val": 1.0}).train_seconds
        11.0
        """
        spent = self.seconds
        return spent.get("cache", 0.0) + spent.get("epochs", 0.0) - spent.get("val", 0.0)
