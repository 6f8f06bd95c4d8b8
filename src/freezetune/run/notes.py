"""What a run says of its set-up before it trains, besides the stage table: the warnings on frozen layers that keep
random weights, the notes on settings that do nothing in this run, when patience starts counting, and the line a
resume opens with. ``RunSetup.say_setup`` (``run/setup.py``) prints them; each is built here from the values it
reads, so that the set-up's order and what it says of it read apart.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from freezetune.cache.store import idle_views_note
from freezetune.config.train_config import TrainConfig
from freezetune.data.text import truncation_note
from freezetune.errors import choices
from freezetune.freezing.bn_policy import idle_bn_policy
from freezetune.freezing.dropout import dropout_note
from freezetune.freezing.schedule import idle_schedule_note, plateau_units_note
from freezetune.freezing.unfreezing import Unfreezer
from freezetune.model import text_pooling
from freezetune.model.stages import stages
from freezetune.run import log as run_log
from freezetune.training.optim import idle_warmup_note, momentum_note
from freezetune.training.param_groups import idle_stage_lrs

log = logging.getLogger(__name__)


def say_random_frozen(model: nn.Module) -> None:
    """Frozen layers of a model built without pretrained weights keep their random start: said once a run, where a
    linear probe of random features trained in silence (val_loss 356, freeze by the auto recipe's default)."""
    frozen = [s.name for s in stages(model) if any(not p.requires_grad for p in s.params)]
    if frozen:
        run_log.warn_once(log, "--weights none: the frozen stage(s) %s keep their random initial weights (nothing "
                          "pretrained to keep); --recipe full trains every layer",
                          choices(frozen, limit=4))  # fmt: skip


def say_head_frozen(model: nn.Module) -> None:
    """The new head frozen (``--freeze classifier``, a glob that caught it): the layers that train learn against a
    random classifier that never moves; said once, where the run's table alone showed it (``classifier ... 0``)."""
    head = stages(model)[-1]
    if head.params and not any(p.requires_grad for p in head.params):
        run_log.warn_once(log, "the new head (%s) is frozen: it keeps its random initial weights, and the layers that "
                          "train learn to fit a classifier that never moves; freeze less of it (--freeze backbone "
                          "trains the head alone)", head.name)  # fmt: skip


def idle_setting_notes(cfg: TrainConfig, model: nn.Module, train_set, preprocess,
                       unfreezer: Unfreezer | None) -> list[str | None]:  # fmt: skip
    """The notes on what the run's settings do not do here (a schedule that opens nothing, a stage LR for no stage
    that trains, a BatchNorm or dropout policy with nothing to hold, ...), None where a setting does its work; said by
    a run's first set-up, not again by the auto recipe's later trials."""
    schedule = unfreezer.schedule if unfreezer is not None else None  # parsed once
    idle = idle_schedule_note(unfreezer, cfg.epochs, cfg.early_stop)  # a schedule that opens nothing here
    return [
        truncation_note(train_set, preprocess),
        text_pooling.note(model),
        idle_stage_lrs(model, cfg.stage_lrs, unfreezes=schedule is not None and idle is None, decay=cfg.decay),
        idle_bn_policy(model, cfg.bn),
        dropout_note(model),
        plateau_units_note(schedule, cfg.monitor),
        idle,
        momentum_note(cfg.optimizer, cfg.momentum, TrainConfig.momentum),
        idle_warmup_note(cfg.scheduler, cfg.warmup_epochs),
        idle_views_note(cfg.aug, cfg.cache_views, cfg.cache),
    ]


def warmup_note(cfg: TrainConfig, unfreezer: Unfreezer | None, *, warmup_steps: int,
                steps_per_epoch: int) -> str | None:  # fmt: skip
    """When the patience of early stopping or a plateau unfreeze starts counting, if the LR warm-up delays it."""
    first = warmup_steps // max(steps_per_epoch, 1) + 1  # the first epoch that ends past the peak
    plateau = unfreezer is not None and unfreezer.schedule.kind == "plateau"
    waits = [what for what, on in (("early stopping", bool(cfg.early_stop)), ("plateau unfreezing", plateau)) if on]
    if first <= 1 or not waits:
        return None
    count = "counts" if len(waits) == 1 else "count"
    return (f"note: {' and '.join(waits)} {count} epochs without improvement from epoch {first} on: the "
            f"{cfg.scheduler} schedule raises the LR until then")  # fmt: skip


def averaging_note(cfg: TrainConfig, steps_per_epoch: int) -> str | None:
    """What ``average_weights`` does to the run's end, where it is on: the last epoch's row, ``last.pt`` (and
    ``best.pt`` where that epoch is best) hold the average, not the last step's weights; a named recipe's run said
    nothing, and its last epoch scored lower than the one before with no line to say why."""
    if not cfg.average_weights:
        return None
    return (f"note: the weights end as their average over the last {cfg.average_weights:.0%} of the run's "
            f"{cfg.epochs * steps_per_epoch} steps (--average-weights), BatchNorm statistics recomputed for it: the "
            f"last epoch's validation and last.pt are the average's")  # fmt: skip


def resumed_line(run_dir: Path, cfg: TrainConfig, progress, steps_per_epoch: int, *, trained_out: bool) -> str:
    """The line a resume opens with: where the stopped run is taken up, and whether anything is left to train."""
    p = progress
    # where the stop line left it ("stopped ... at step 3/5 of epoch 2"): "after epoch 0 and step 7/7 of epoch 1"
    # named an epoch never trained and left the user to guess the last step's validation had not run
    where = f"after epoch {p.epoch}"
    if p.step:
        where = f"at step {p.step}/{steps_per_epoch} of epoch {p.epoch + 1}"
        where += "; the epoch's validation runs next" if p.step >= steps_per_epoch else ""
    done = ""
    if trained_out:  # a finished run: say so, not leave it to guess
        done = ": the run had finished (early stop)" if p.epoch < cfg.epochs else \
            f": all {cfg.epochs} epochs were trained"  # fmt: skip
    # (said of a sweep's recipes too, which the sweep runs without a test: "as --no-final-test asks" named a flag
    # nobody gave)
    unscored = "report; the test split is not scored: final_test is off (--no-final-test, or a sweep's run)"
    end = "report, test split" if cfg.final_test else unscored
    then = f"; nothing trains, only the run's end ({end}) runs again" if done else ""
    return f"resumed {run_dir} {where}{done}{then}"
