"""The auto recipe's measurements (``auto/recipe.py`` runs them): a candidate's trial (its config, its run, its row in
``recipe.json``), which candidates are tried beyond the default and why, and what a stop in one of them says."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from freezetune.auto import budget as auto_budget
from freezetune.auto.plan import at_lr, steps_text
from freezetune.auto.rule import (
    TRIAL_FRACTION,
    candidate_lr,
    choose,
    default_stages,
    difference_noise,
)
from freezetune.config.options import METRIC_NAMES, compared_by
from freezetune.config.train_config import TrainConfig
from freezetune.run import log as run_log
from freezetune.run.directory import TRIALS_DIR
from freezetune.run.interrupt import RunInterrupted

if TYPE_CHECKING:
    from freezetune.training.progress import RunResult

# the other candidates' trials run only on a validation split this large: on 400 images one standard error of the
# difference of two accuracies near 75 % is 3 points, about what separates the candidates trained to the end. On 100
# images (6 points) the trials overturned the default on 3 of 9 runs (3 datasets x 3 seeds) and each of those ended at
# or near its dataset's lowest accuracy.
MIN_VAL_TO_COMPARE = 400
# Nor a trial this short: a few steps leave each candidate near where it started, and its score moves more from seed
# to seed than the candidates differ (rendered letters, 20 classes, 10 images a class, 400 validation images: the
# 4-step trials' last-2 minus last-3 gap ran from -6.5 to +8.0 points over 5 seeds, and the two overturns cost 5.0
# and 2.0 points of test accuracy). The benchmark datasets' trials (100 images a class) take 14 to 16 steps.
MIN_TRIAL_STEPS = 10


def measure(base: TrainConfig, ks: list[int], boost: float, out: Path, train: Callable,
            echo: Callable[[str], None], budget: auto_budget.TrialBudget | None = None, *,
            first: dict | None = None, piloted: bool = False):  # fmt: skip
    """The trials (the default candidate's first, the others where the split, the trial's steps and the budget
    allow), the chosen one, and why it was chosen. ``first``: the default's trial where a budget's pilot was it;
    ``piloted``: a pilot printed the stage table."""
    default_k = default_stages(ks)
    first = first or trial(base, default_k, boost, out, train, echo, brief=piloted)
    n_val, kind = first["n_val"], first["data_kind"]
    if not n_val:
        return [first], first, f"the default (last {default_k} stages): there are no validation {kind} to compare on"
    if n_val < MIN_VAL_TO_COMPARE and len(ks) > 1:
        noise = 100 * difference_noise(0.75, n_val, floored=False)  # as said: near 75 %, whatever the split's size
        return [first], first, (f"the default (last {default_k} stages): {n_val} validation {kind} cannot tell the "
                                f"candidates apart (one standard error of a difference near 75 % is {noise:.1f} points "
                                f"on them; the candidates trained to the end differ by about 3), so only its trial "
                                f"ran")  # fmt: skip
    if first["steps"] < MIN_TRIAL_STEPS and len(ks) > 1:
        return [first], first, (f"the default (last {default_k} stages): a trial of {steps_text(first['steps'])} "
                                f"cannot tell the candidates apart (under {MIN_TRIAL_STEPS}, a trial's score moves "
                                "more from seed to seed than the candidates differ), so only its trial "
                                "ran")  # fmt: skip
    if budget is not None and len(ks) > 1 and (short := budget.too_short_for(first, len(ks) - 1)):
        return [first], first, f"the default (last {default_k} stages): {short}, so only its trial ran"
    trials = sorted([first, *(trial(base, k, boost, out, train, echo, brief=True) for k in ks if k != default_k)],
                    key=lambda t: t["trained_stages"])  # fmt: skip
    choice = choose(trials, n_val, compared_by(base.monitor))
    trained = _trained(trials)
    if choice is not first:
        return trials, choice, (f"its trial beat the default (last {default_k} stages) by more than the noise of "
                                f"{n_val} validation {kind}{trained}")  # fmt: skip
    return trials, choice, (f"the default (last {default_k} stages): no trial beat it by more than the noise of "
                            f"{n_val} validation {kind}{trained}")  # fmt: skip


def trial(base: TrainConfig, k: int, boost: float, out: Path, train: Callable, echo: Callable[[str], None], *,
          brief: bool) -> dict:  # fmt: skip
    """Train candidate ``k`` for one short epoch and score it on the validation split."""
    trial_cfg = trial_config(base, k, boost, out)
    # the first trial prints the stage table, the others what they train
    result, seconds = measurement(trial_cfg, train, echo, brief=brief, during=f"the trial of the last {k} stage(s) "
                                  "(trials are not resumed)", again="them again")  # fmt: skip
    return trial_row(base, k, trial_cfg, result, seconds, echo)


def trial_row(base: TrainConfig, k: int, trial_cfg: TrainConfig, result: RunResult, seconds: dict,
              echo: Callable[[str], None]) -> dict:  # fmt: skip
    """Candidate ``k``'s trial, said and recorded: its score, its pace, what it trained."""
    row = result.history[-1] if result.history else {}
    trained_s = row.get("epoch_time_s", 0.0)
    # the images of one of the run's epochs, counted (not the trial's pace times its seconds, doubled: 151 of 150),
    # and a whole epoch's training at the trial's pace of its own images
    epoch = auto_budget.epoch_items(base, result.train_items)
    epoch_s = trained_s * epoch / max(auto_budget.epoch_items(trial_cfg, result.train_items), 1)
    metric = compared_by(base.monitor)
    echo(f"auto: last {k} stage(s) + head at lr {trial_cfg.lr:.1e}: {METRIC_NAMES[metric]} "
         f"{pct(result.best_val(metric))} after {steps_text(result.steps_per_epoch)} "
         f"({sum(seconds.values()):.1f}s)")  # fmt: skip
    return {"trained_stages": k, "freeze": -(k + 1), "lr": trial_cfg.lr, "val_acc": result.best_val_acc,
            "val_f1": result.best_val("val_f1"),
            "seconds": seconds, "epoch_s": epoch_s, "epoch_images": float(epoch), "trained_s": trained_s,
            "loop_s": seconds["epochs"],
            "val_s": result.seconds.get("val", 0.0), "fixed_epoch": base.epoch_images is not None,
            "trainable_params": row.get("trainable_params"), "n_val": _val_size(result),
            "data_kind": result.data_kind, "refit_fits": result.refit_fits, "no_refit": result.no_refit,
            "steps": result.steps_per_epoch, "eval_item_s": result.eval_item_s}  # fmt: skip


def trial_config(base: TrainConfig, k: int, boost: float, out: Path) -> TrainConfig:
    """Candidate ``k``'s trial: one epoch of half of one of the run's epochs (of the training set, or of what
    --epoch-fraction or --epoch-images leave of it), at the candidate's LR, its schedule run to the end within it."""
    images = None if base.epoch_images is None else max(1, round(base.epoch_images * TRIAL_FRACTION))
    return dataclasses.replace(
        at_lr(base, candidate_lr(base.lr, k, boost)), freeze=-(k + 1), epochs=1,
        epoch_fraction=base.epoch_fraction * TRIAL_FRACTION, epoch_images=images, warmup_epochs=0.0, early_stop=None,
        unfreeze=None, final_test=False, tensorboard=False, resume=False, refit=False, out=str(trial_dir(out, k)),
    )  # fmt: skip


def measurement(cfg: TrainConfig, train: Callable, echo: Callable[[str], None], *, brief: bool, during: str,
                again: str) -> tuple[RunResult, dict]:  # fmt: skip
    """Train one of the recipe's measurements (a trial, the probe): not resumed, so no last.pt; a stop in it says what
    a re-run does (its last.pt would not be the run's). Returns its result and the seconds the run's cost counts."""
    try:
        result = train(cfg, echo=run_log.indented(echo), resumable=False, brief=brief)
    except RunInterrupted as exc:
        from freezetune.cache.store import BUILDING

        building = f", {BUILDING}" if exc.where.startswith(BUILDING) else ""  # (its cache bar all that was seen)
        # a measurement's dir is RUN/auto-trials/NAME; before the run dir is made, --resume is refused ("does not
        # exist"), and the line said it would start the trials again
        made = Path(cfg.out).parent.parent.exists()
        command = (
            "the same command, with or without --resume,"
            if made
            else "the same command (without --resume: the run dir was not made yet)"
        )
        raise RunInterrupted.by(exc.signum, f"during {during}{building}; {command} starts {again}") from None
    return result, {key: result.seconds.get(key, 0.0) for key in ("cache", "epochs")}


def _trained(trials: list[dict]) -> str:
    """How much the trials trained, part of the evidence (a trial of one step favours the highest learning rate);
    each trial's own count where they differ (``--batch-size auto`` measures each candidate's batch).

    >>> _trained([{"steps": 3, "trained_stages": 2}, {"steps": 1, "trained_stages": 3}])
    ' (trials of 3 steps (last 2), 1 step (last 3))'
    """
    if len({t["steps"] for t in trials}) == 1:
        return f" (each trial: {steps_text(trials[0]['steps'])})"
    each = [f"{steps_text(t['steps'])} (last {t['trained_stages']})" for t in trials]
    return f" (trials of {', '.join(each)})"


def trial_dir(out: Path, k: int) -> Path:
    return out / TRIALS_DIR / f"last-{k}"


def _val_size(result) -> int:
    """How many images the trial was validated on (the ``val_n`` column of its epoch row)."""
    return int(result.history[-1].get("val_n", 0)) if result.history else 0


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
