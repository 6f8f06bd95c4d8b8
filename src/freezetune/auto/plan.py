"""The auto recipe's plan for its final run (``auto/recipe.py`` runs it), once the trials have chosen what trains:
whether it starts from a probed head (few-shot data), whether the held-out validation images train too (refit), its
BatchNorm statistics, and how many epochs and how much warm-up ``--budget`` affords at the chosen trial's pace."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path

from freezetune.auto.rule import TRIAL_FRACTION
from freezetune.config.check import needs_validation
from freezetune.config.options import budget_text, parse_duration
from freezetune.config.train_config import TrainConfig, epochs_of
from freezetune.errors import setting

# A default trial shorter than this starts the run from a probed head instead (auto/recipe.py's docstring, step 5).
# Fashion-MNIST, 3 seeds: 2-step trials (10 images a class, 10 epochs) gained 8.3 points at 224 px and 3.3 at 64 px,
# 3-step trials (20 a class) 1.3 at 224 px, 10 epochs and 0.1 at 64 px, 3 epochs; at 64 px, 3 epochs, 4-step trials
# (25 a class, 2 seeds) lost 1.8, 7-step trials (50 a class) 1.1 and 15-step ones (100 a class) 1.9
PROBE_BELOW_STEPS = 4
# ... and the run then trains this many steps or more: from a probed head, a short run fell below its own start (the
# head fitted, the stages it trains pulled away before they settle again). Fashion-MNIST, 64 px, 3 seeds, the full
# test set, probed vs from the trial: 10 a class (4-step epochs) 3 epochs 62.07 vs 70.39, 5 epochs 64.83 vs 68.40,
# 10 epochs 72.50 vs 69.21; 20 a class (7-step epochs) 3 epochs 71.74 vs 71.63, 5 epochs 74.10 vs 73.25
PROBE_MIN_RUN_STEPS = 30
# A run's one epoch sized to the time left plans for this share of it: under --budget 1m on 10 000 Fashion-MNIST
# images (64 px, 2-core CPU) the run's epoch trained 6 % slower than its trial (156 vs 166 img/s) and ended 4 s past
PACE_MARGIN = 0.95
# The most epochs a budget plans where --epochs does not say (given, --epochs is the most: whichever of the two ends
# the run first, as Lightning's max_epochs and max_time): a small set under a large budget trained thousands. The
# default command on Fashion-MNIST, 64 px, 3 seeds, the full test set: 10 a class 73.34 % (10 epochs), 75.36 % (30),
# 75.73 % (100, in 3.3 x the time); 100 a class 86.99 % (10) and 87.22 % (30)
MAX_BUDGET_EPOCHS = 30
HELD_STATS = "frozen"  # the bn_stats of a run from a probed head: its trainable stages' BatchNorm statistics held


def refits(cfg: TrainConfig) -> bool:
    """Whether the final run trains on the held-out validation images too (``refit``): unless the config says, when
    the validation set is the automatic hold-out (no ``val_data``/``val_split``) and nothing in the run needs it.

    >>> refits(TrainConfig()), refits(TrainConfig(val_split=0.2)), refits(TrainConfig(early_stop=2))
    (True, False, False)
    """
    if cfg.refit is not None:
        return cfg.refit
    # the choice made, the images held out to make it are training data like the rest: +1.65 and +1.05 points on the
    # Fashion-MNIST test set (3 seeds, last 2 and last 3 stages trained, 100/class, 64 px) over keeping them for
    # validation. build_datasets joins them only where they are the automatic hold-out within --per-class.
    return cfg.val_data is None and cfg.val_split is None and not needs_validation(cfg)


def run_refits(cfg: TrainConfig, first: dict, echo: Callable[[str], None]) -> bool:
    """Whether the final run's (and a probe's) held-out validation data trains too; a departure from what was asked
    is said. ``first``: the default candidate's trial."""
    refit = refits(cfg)
    if refit and not first["n_val"]:  # no validation images (one a class): nothing to refit, nothing to say
        refit = False
    elif refit and not first["refit_fits"]:  # recorded as done (recipe.json, config.yaml), not as asked
        refit = False  # a validation folder with --per-class gave the per-class reason: the data says which
        echo(f"auto: the validation {first['data_kind']} stay validation (no refit): {first['no_refit']}")
    elif refit and cfg.monitor != TrainConfig.monitor:  # it asked for best.pt by another metric: say what it got
        echo(f"auto: the held-out validation {first['data_kind']} train too (refit), so best.pt is the run's last "
             f"epoch, not its best by {cfg.monitor}: {setting('refit', False)} keeps them to choose by it")  # fmt: skip
    return refit


def run_epochs(cfg: TrainConfig, trials: list[dict], choice: dict, spent: float, refit: bool,
               echo: Callable[[str], None], *, probed: bool = False, setup_s: float = 0.0,
               longest: int | None = None, piloted: bool = False, test_s: float = 0.0) -> tuple[int, int | None]:  # fmt: skip
    """The final run's epochs: what the budget affords after ``spent`` seconds of trials (and a probe: ``probed``)
    and the run's own ``setup_s`` (a pilot measured it), at most ``epochs`` where the config sets it, else
    ``MAX_BUDGET_EPOCHS``, said; and where less than one epoch is left, the images its
    one epoch draws (as ``epoch_images``; None: the epochs as the trials' run would have them). ``longest``: where a
    pilot shortened the epochs, the images of one as asked: a run with time for less than two of the short ones
    trains one as long as the time left affords, up to that (the pilot's first steps are its slowest). ``piloted``:
    a budget's pilot ran before the trials (its seconds are among ``spent``). ``test_s``: the final test's seconds
    (``final_test_seconds``), left for it."""
    done = [*(["the pilot"] if piloted else []), "the trials", *(["the probe"] if probed else [])]
    measured = done[0] if len(done) == 1 else f"{', '.join(done[:-1])} and {done[-1]}"
    budget, named = parse_duration(cfg.budget), budget_text(cfg.budget)
    if budget is None:
        return epochs_of(cfg), None
    _, replaced = _at_most(cfg, 1)  # what a run of one epoch says of --epochs
    train_s, other_s = epoch_pace(choice, refit, trials[0]["n_val"])
    left, epoch_s = budget - spent - setup_s - test_s, train_s + other_s
    after = f"{measured} and the run's set-up (about {seconds_text(setup_s)})" if setup_s else measured
    if test_s:  # the final test ran after the time the budget planned for, and ended the call past it
        after = f"{after}, and about {seconds_text(test_s)} kept for the final test"
    pace = f"about {epoch_s:.1f}s ({train_s:.1f}s training, {other_s:.1f}s validation and checkpoints)"
    if left < epoch_s * (2 if longest else 1):  # one epoch, of what the time left affords
        images, whole, over_s = _one_epoch(choice, refit, trials[0]["n_val"], left, (train_s, other_s), longest)
        kind = choice.get("data_kind", "images")
        drawn = f" of {images:,} of the {max(whole, longest or 0):,} {kind}" if images != whole else ""
        if left <= 0:  # the run then trains one epoch, as short as a trial's: say why, not only how many
            ahead = [f"the run's set-up takes about {seconds_text(setup_s)}"] if setup_s else []
            ahead += [f"the final test {'' if setup_s else 'takes '}about {seconds_text(test_s)}"] if test_s else []
            setup = f", and {' and '.join(ahead)}" if ahead else ""
            echo(f"auto: {measured} took {seconds_text(spent)} of the {named} budget{setup}: the "
                 f"run trains one epoch{replaced}{drawn}, over it")  # fmt: skip
        else:  # (over it by a few percent: the pace's noise, not said)
            over = f", about {seconds_text(over_s)} over it" if over_s > 0.05 * left else ""
            echo(f"auto: the {named} budget leaves {seconds_text(left)} after {after}: 1 "
                 f"epoch{replaced}{drawn}{over}; at the trial's pace an epoch of {whole:,} takes {pace}")  # fmt: skip
        return 1, images if images != whole else None
    epochs, said = _at_most(cfg, max(1, math.floor(left * PACE_MARGIN / max(epoch_s, 1e-6))))
    # the pace is the chosen trial's: the stages an --unfreeze opens later train too, and their epochs take longer
    slower = (f"; the epochs after --unfreeze {cfg.unfreeze} opens more stages train slower than that, and may end the "
              "run past the budget") if cfg.unfreeze else ""  # fmt: skip
    images, whole = _one_more(cfg, choice, refit, trials[0]["n_val"], left, (train_s, other_s), epochs)
    if images is not None:
        kind = choice.get("data_kind", "images")
        echo(f"auto: the {named} budget leaves {seconds_text(left)} after {after}: {epochs + 1} epochs of {images:,} "
             f"of the {whole:,} {kind}; at the trial's pace an epoch of {whole:,} takes {pace}")  # fmt: skip
        return epochs + 1, images
    echo(f"auto: the {named} budget leaves {seconds_text(left)} after {after}: {epochs} epoch(s){said} "
         f"of {pace}{slower}")  # fmt: skip
    return epochs, None


def _one_more(cfg: TrainConfig, choice: dict, refit: bool, n_val: int, left: float, pace: tuple[float, float],
              epochs: int) -> tuple[int | None, int]:  # fmt: skip
    """Where ``epochs`` whole epochs leave part of the budget unused (up to an epoch's time: whole epochs ended runs
    at 0.76-0.88 of their budget), one epoch more, each of the images that then fit in ``PACE_MARGIN`` of the time
    ``left``: (those images, the images of a whole epoch), or (None, whole epoch) where they would be fewer than half
    an epoch's (the trial's share: the extra validation pass would cost more than it adds), or where the epochs are
    the most asked (``--epochs``, ``MAX_BUDGET_EPOCHS``), fixed (``--epoch-images``), or followed by an ``--unfreeze``.

    >>> _one_more(TrainConfig(), {"epoch_images": 100.0}, False, 10, left=15.0, pace=(2.0, 3.0), epochs=2)
    (87, 100)
    >>> _one_more(TrainConfig(), {"epoch_images": 100.0}, False, 10, left=16.0, pace=(2.0, 3.0), epochs=3)
    (None, 100)
    """
    train_s, other_s = pace
    whole = _whole_epoch(choice, refit, n_val)
    if epochs >= _most_epochs(cfg) or choice.get("fixed_epoch") or cfg.unfreeze:
        return None, whole
    images = math.floor(whole * max(left * PACE_MARGIN / (epochs + 1) - other_s, 0.0) / max(train_s, 1e-6))
    return (images, whole) if whole * TRIAL_FRACTION <= images < whole else (None, whole)


def final_test_seconds(measured: list[dict | None], test_items: int | None) -> float:
    """About how long the run's final test of ``test_items`` images (or texts) takes (0.0 without a test split): at
    the fastest of the ``measured`` pilot's and trials' paces of an evaluation of the whole model (its validation,
    with the pace of a store's build where it read one). The fastest: each pace is of a validation split a fraction of
    the test's size, whose fixed costs (the loader's start, a first pass's allocations) weigh more on it; the first,
    the pilot's, kept 33-55 s for tests that took 22-35 s. 0.0 where none was measured (no validation split; stores
    read from disk that recorded no pace of their build: a pilot's training pace on them leaves out the images'
    loading and the frozen layers, and kept a third too little).

    >>> final_test_seconds([None, {"eval_item_s": None}, {"eval_item_s": 0.003}, {"eval_item_s": 0.002}], 10_000)
    20.0
    """
    paces = [m["eval_item_s"] for m in measured if m is not None and m.get("eval_item_s") is not None]
    return test_items * min(paces) if test_items and paces else 0.0


def _at_most(cfg: TrainConfig, affords: int) -> tuple[int, str]:
    """The run's epochs of the ``affords`` a budget leaves time for: no more than ``epochs`` where the config sets it
    (a budget and --epochs are both limits: whichever ends the run first), else than ``MAX_BUDGET_EPOCHS``; and what
    the budget's line says of them.

    >>> _at_most(TrainConfig(), 4000), _at_most(TrainConfig(epochs=10), 4000)
    ((30, ' (at most 30 without --epochs; the budget affords 4,000)'), (10, ' (--epochs 10; the budget affords 4,000)'))
    >>> _at_most(TrainConfig(epochs=50), 12), _at_most(TrainConfig(), 12)
    ((12, ' (not the 50 of epochs)'), (12, ''))
    """
    given, most = cfg.epochs is not None, _most_epochs(cfg)
    if affords < most:
        return affords, f" (not the {cfg.epochs} of epochs)" if given else ""
    if affords == most:
        return most, ""
    if given:
        return most, f" (--epochs {most}; the budget affords {affords:,})"
    return most, f" (at most {most} without --epochs; the budget affords {affords:,})"


def _most_epochs(cfg: TrainConfig) -> int:
    """The most epochs a budget plans: ``epochs`` where the config sets it, else ``MAX_BUDGET_EPOCHS``."""
    return cfg.epochs if cfg.epochs is not None else MAX_BUDGET_EPOCHS


def _whole_epoch(choice: dict, refit: bool, n_val: int) -> int:
    """The images of one of the run's epochs at the trial's length: under refit, the held-out ones too (not where
    ``--epoch-images`` fixes the length)."""
    return round(choice["epoch_images"] + (n_val if refit and not choice.get("fixed_epoch") else 0))


def _one_epoch(choice: dict, refit: bool, n_val: int, left: float, pace: tuple[float, float],
               longest: int | None = None) -> tuple[int, int, float]:  # fmt: skip
    """The images of a run's one epoch in the time ``left`` (as many as its training time affords at the trial's
    ``pace`` in ``PACE_MARGIN`` of it, no fewer than a trial drew, its half epoch; no more than an epoch, or than
    ``longest``), the images of one epoch at that pace, and how many seconds past the budget it ends.

    >>> _one_epoch({"epoch_images": 100.0}, False, 10, left=6.0, pace=(8.0, 1.0))  # 4.7 s of 8 s training
    (58, 100, 0.0)
    >>> _one_epoch({"epoch_images": 100.0}, True, 10, left=-1.0, pace=(11.0, 1.0))  # refit: 110 a whole epoch
    (50, 110, 7.0)
    >>> _one_epoch({"epoch_images": 100.0}, False, 10, left=21.0, pace=(8.0, 1.0), longest=300)  # pilot-shortened
    (236, 100, 0.0)
    """
    train_s, other_s = pace
    whole = _whole_epoch(choice, refit, n_val)
    fewest = math.ceil(choice["epoch_images"] * TRIAL_FRACTION)
    affords = math.floor(whole * max(left * PACE_MARGIN - other_s, 0.0) / max(train_s, 1e-6))
    images = min(max(whole, longest or 0), max(fewest, affords))
    return images, whole, max(other_s + train_s * images / max(whole, 1) - left, 0.0)


def seconds_text(s: float) -> str:
    """Seconds as the budget lines say them: tenths under 10 s (a 0.6 s trial was "1s of the 1s budget").

    >>> seconds_text(0.64), seconds_text(42.4)
    ('0.6s', '42s')
    """
    return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"


def run_warmup(cfg: TrainConfig, epochs: int, echo: Callable[[str], None]) -> float:
    """The final run's (and a probe's) warm-up: as asked, unless a budget planned no more epochs than it (the run's
    config was then refused after the trials, "warmup_epochs must be in [0, epochs)", naming a value the user had
    checked against --epochs): then the share of the run that was asked of ``--epochs``, said."""
    if cfg.warmup_epochs < epochs or not cfg.warmup_epochs:
        return cfg.warmup_epochs
    asked = epochs_of(cfg)
    share = cfg.warmup_epochs / asked if cfg.warmup_epochs < asked else 0.5
    warmup = round(epochs * share, 3)
    echo(f"auto: --warmup-epochs {cfg.warmup_epochs:g} is as long as the {epochs} epoch(s) the budget plans: the run "
         f"warms up for {warmup:g}, the share of the run it was of "
         f"{f'--epochs {asked}' if cfg.epochs is not None else f'the default {asked} epochs'}")  # fmt: skip
    return warmup


def epoch_pace(choice: dict, refit: bool, n_val: int) -> tuple[float, float]:
    """Seconds one of the run's epochs will take, from the chosen trial: its training (the trial's half epoch twice;
    with refit, the held-out images too) and the rest of its loop (validation, checkpoints). The training alone put
    a 45 s budget's 30 epochs at 63 s, each epoch's validation of many images uncounted."""
    grows = refit and choice["epoch_images"] and not choice.get("fixed_epoch")  # --epoch-images fixes its length
    train_s = choice["epoch_s"] * (1 + n_val / choice["epoch_images"] if grows else 1)
    # the trial's loop less its training (a recipe.json before "trained_s": its share of a run epoch's, about)
    other_s = choice["loop_s"] - choice.get("trained_s", choice["epoch_s"] * TRIAL_FRACTION)
    if refit:  # no validation in the run: the checkpoints alone
        other_s -= choice["val_s"]
    return train_s, max(other_s, 0.0)


def few_shot(first: dict, text: bool, epochs: int, echo: Callable[[str], None] = lambda line: None) -> bool:
    """Whether the run starts from a probed head: the data is too small for the trials' start (the default
    candidate's trial took fewer than ``PROBE_BELOW_STEPS`` steps; an image model's: a text model's rule was measured
    without a probe) and the run long enough to move from it (``PROBE_MIN_RUN_STEPS``, its ``epochs`` at twice a
    trial's steps each); a short run's start from its trial is said."""
    if text or first["steps"] >= PROBE_BELOW_STEPS:
        return False
    steps = run_steps(first, epochs)
    if steps < PROBE_MIN_RUN_STEPS:
        echo(f"auto: a trial of {steps_text(first['steps'])} is short for a new head, but a run of about {steps} "
             f"steps is too short to move from a probed one (under {PROBE_MIN_RUN_STEPS}): it starts from its "
             "trial")  # fmt: skip
        return False
    return True


def run_steps(first: dict, epochs: int) -> int:
    """The final run's steps, about: ``epochs`` of twice the default trial's steps (a trial trains ``TRIAL_FRACTION``
    of an epoch).

    >>> run_steps({"steps": 2}, 3), run_steps({"steps": 2}, 10)
    (12, 40)
    """
    return math.ceil(first["steps"] / TRIAL_FRACTION) * epochs


def run_bn_stats(asked: str, probed: bool) -> str:
    """The run's BatchNorm statistics: as asked, ``auto`` resolved (held from a probed head, else updated).

    >>> run_bn_stats("auto", True), run_bn_stats("auto", False), run_bn_stats("update", True)
    ('frozen', 'update', 'update')
    """
    if asked != "auto":  # an explicit "update" from a probed head too: the user's call
        return asked
    return HELD_STATS if probed else "update"


def steps_text(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


def duration_text(seconds: float) -> str:
    """A run's length as the chose line says it: seconds, minutes, or hours and minutes.

    >>> duration_text(42.4), duration_text(754), duration_text(7300)
    ('42s', '13m', '2h02m')
    """
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours}h{minutes:02d}m"


def shared_config(cfg: TrainConfig, out: Path, cut: str) -> TrainConfig:
    """What every run of the recipe shares (its trials, probe and run): ``cfg`` as a plain ``freeze: auto`` run in
    ``out``, the feature cache cut at ``cut`` and kept in ``out/features`` unless ``cache_dir`` names another."""
    # absolute: the run's config.yaml names this cache (and its start weights), and a --resume or a train --config
    # of it may run from another directory
    # without the cache there is no cut to make (a cut beside cache off is refused as doing nothing)
    cut = None if cfg.cache == "off" else cut
    # the trials and the probe average no weights: what they are scored on, or hand the run, is where they ended
    return dataclasses.replace(cfg, recipe=None, freeze="auto", budget=None, out=str(out), cache_at=cut,
                               cache_dir=cfg.cache_dir or os.path.abspath(out / "features"),
                               average_weights=0.0)  # fmt: skip


def at_lr(cfg: TrainConfig, lr: float) -> TrainConfig:
    """``cfg`` at learning rate ``lr``, its explicit ``stage_lrs`` scaled by the same factor: the ratios the user set
    between the head and those stages hold in the trials and the run, as the ``decay`` rule's do (the boost moved
    the head alone: ``layer4=1e-3`` beside ``--lr 1e-3`` trained 6.7 times slower than the head).

    >>> at_lr(TrainConfig(lr=1e-3, stage_lrs={"layer4": 1e-4}), 1e-2).stage_lrs
    {'layer4': 0.001}
    """
    factor = lr / cfg.lr
    return dataclasses.replace(cfg, lr=lr, stage_lrs={name: v * factor for name, v in cfg.stage_lrs.items()})


def measured_trials(trials: list[dict], probe: dict | None, pilot: dict | None = None) -> list[dict]:
    """Every measurement whose seconds the run's cost includes: the trials, the probe and a budget's pilot."""
    return [*trials, *(m for m in (probe, pilot) if m)]
