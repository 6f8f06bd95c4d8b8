"""What ``--budget`` decides in the auto recipe (``auto/recipe.py``) before and between its trials: a pilot's pace, the
length of the epochs that pace affords (``plan_epoch``), and whether the other candidates' trials fit
(``TrialBudget``). The run's epochs, planned after the trials at the chosen trial's pace, are
``auto.plan.run_epochs``'s.

A trial trains on ``TRIAL_FRACTION`` of an epoch and the run at least one epoch: on a large set a small budget was
spent before the first trial ended (10 000 Fashion-MNIST images at 64 px on a 2-core CPU: ``--budget 30s`` took
111 s, ``1m`` 129 s; ``benchmarks/budget.py``). So under a budget a pilot first trains the default candidate for
``PILOT_STEPS`` steps, streamed (the frozen prefix computed per batch, no training store built), and its pace says
whether a trial and one epoch of the run fit in what is left; where they do not, the trials' and the run's epochs
draw fewer images (as ``--epoch-images`` does), as many as that time affords, and the other trials are left out
(``TrialBudget``). Its pace counts everything a trial and the run repeat: their set-up, validation and checkpoints,
and the frozen prefix of every image they draw; a store, where one pays, costs less. A pilot that drew the trial's
whole epoch (a small set) is the default's trial."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

from freezetune.auto.plan import epoch_pace, seconds_text, steps_text
from freezetune.auto.rule import TRIAL_FRACTION
from freezetune.config.train_config import TrainConfig
from freezetune.data.loaders import epoch_share

PILOT_STEPS = 8  # the pilot's optimizer steps: the first ones are the slowest, so its pace errs on the long side
PILOT_BATCH = 32  # the batch a pilot plans its images for where the batch size is "auto" (measured in the run)
OVER_SAID = 0.1  # a run past its budget by more than this share says so at its end: the pace moves by 10 % or so


@dataclasses.dataclass
class TrialBudget:
    """A ``--budget``'s say in the trials: ``seconds`` (None: no budget), as given (``said``), and when the recipe
    started (``time.perf_counter``), whose clock (``spent``) the run's epochs are planned by too; ``info``: under
    torchrun rank 0's clock decides, the ranks must run the same trials and epochs."""

    seconds: float | None
    said: str | None
    start: float
    info: object = None
    call_s: float = 0.0  # what a call of train spends besides its training: its set-up, validation, checkpoints
    test_items: int | None = None  # the test split's images (or texts) the run scores at its end
    test_s: float = 0.0  # the run's final test, at a pilot's pace: kept out of what the trials and epochs may spend

    @property
    def world(self) -> int:
        """The ranks training together: a step draws a batch on each."""
        return getattr(self.info, "world", 1) or 1

    def spent(self) -> float:
        from freezetune.device.distributed import broadcast

        seconds = time.perf_counter() - self.start
        return seconds if self.info is None else broadcast(seconds, self.info)

    def took(self, spent: float) -> str:
        """The line that ends a budgeted run (``seconds`` set): what the trials, the run and its final test took
        (``spent``) against the budget, and by how much they overran it where they did (a budget is "about", but a run
        past it by a third said nothing at its end, and the test had taken three times the seconds kept for it)."""
        line = f"auto: the {self.said} budget: the trials, the run and its final test took {seconds_text(spent)}"
        if spent <= self.seconds * (1 + OVER_SAID):
            return line
        test = f", {seconds_text(self.test_s)} of it kept for the final test" if self.test_s else ""
        return (f"{line}, {seconds_text(spent - self.seconds)} past it (its plan is in recipe.json{test}); a "
                "loaded machine, or epochs slower than their trial's, end a run late")  # fmt: skip

    def too_short_for(self, first: dict, others: int) -> str | None:
        """Why the budget leaves no time for the ``others`` trials after ``first`` and one epoch of the run: a 2m
        budget's third trial started 18 s before its end and took 46 s, then the run trained an epoch, 4m39s in all.
        A later trial reads the cache the first built: its cost is the first's less the build, plus its set-up where
        a pilot measured it (``call_s``: ten-step trials are mostly set-up). A deeper candidate's slower steps are not
        counted: "about"."""
        if self.seconds is None:
            return None
        spent, trial_s = self.spent(), first["seconds"]["epochs"] + self.call_s
        epoch_s = sum(epoch_pace(first, refit=False, n_val=first["n_val"]))
        if spent + others * trial_s + epoch_s + self.test_s <= self.seconds:
            return None
        test = f" and its final test (about {seconds_text(self.test_s)})" if self.test_s else ""
        return (f"the {self.said} budget leaves {seconds_text(max(self.seconds - spent, 0.0))} after its "
                f"trial, less than the other {others} trial(s) (about {seconds_text(trial_s)} each) and one "
                f"epoch of the run (about {seconds_text(epoch_s)}){test} take")  # fmt: skip


def resumed_took(said: str, epochs: int, seconds: float) -> str:
    """The line that ends a resumed budgeted run: the budget's clock ran in the call that planned it, so this call
    says what it took on its own and that the plan it trained is that call's (a resume said nothing of its budget).

    >>> print(resumed_took("30s", 4, 12.5)[:87])
    auto: resumed on the 30s budget's plan (4 epoch(s), in recipe.json): this call took 12s
    """
    return (f"auto: resumed on the {said} budget's plan ({epochs} epoch(s), in recipe.json): this call took "
            f"{seconds_text(seconds)}; the budget counted the call that planned it, not its resumes")  # fmt: skip


def pilot_config(trial: TrainConfig, world: int = 1) -> TrainConfig:
    """The pilot: the default candidate's ``trial`` cut to ``PILOT_STEPS`` steps (of a batch on each of ``world``
    ranks), in the trial's dir (where it drew the trial's whole epoch, it is the trial)."""
    batch = (trial.batch_size if isinstance(trial.batch_size, int) else PILOT_BATCH) * world
    images = PILOT_STEPS * batch if trial.epoch_images is None else min(trial.epoch_images, PILOT_STEPS * batch)
    return dataclasses.replace(trial, epoch_images=images)


def pace(result, seconds: float, measured: dict) -> dict:
    """The pilot's pace from its ``result`` (``RunResult``), the ``seconds`` its call took in all and the
    ``measured`` seconds the run's cost counts: seconds a training image (or text) drawn, seconds a call of
    ``train`` spends besides its training (set-up, validation, checkpoints; a store built once, not), and before its
    epochs (``setup_s``: the model built, the data read), the training set's size, and what it drew."""
    row = result.history[-1] if result.history else {}
    train_s = row.get("epoch_time_s", 0.0)
    images = row.get("img_per_s", 0.0) * train_s
    cache_s = result.seconds.get("cache", 0.0)
    return {"steps": result.steps_per_epoch, "images": round(images), "image_s": train_s / max(images, 1.0),
            "wall_s": seconds,
            "call_s": max(seconds - cache_s - train_s, 0.0),
            "setup_s": max(seconds - cache_s - result.seconds.get("epochs", 0.0), 0.0),
            "train_items": result.train_items, "data_kind": result.data_kind, "seconds": measured,
            "eval_item_s": result.eval_item_s}  # fmt: skip


def pilot_was_trial(pilot: dict, budget: TrialBudget) -> str:
    """The line of a pilot that drew the default trial's whole epoch (a small set): it is that trial, and nothing
    is planned before the run's epochs.

    >>> b = TrialBudget(30.0, "30s", 0.0)
    >>> pilot_was_trial({"steps": 3, "image_s": 0.005, "wall_s": 0.8, "data_kind": "images", "images": 96}, b)
    "auto: the 30s budget: a pilot of 3 steps trained 200 images/s (0.8s in all) on the default trial's 96 images: it is that trial"
    """
    return (f"auto: the {budget.said} budget: a pilot of {steps_text(pilot['steps'])} trained "
            f"{1 / pilot['image_s']:.0f} {pilot['data_kind']}/s ({seconds_text(pilot['wall_s'])} in all) on the default "
            f"trial's {pilot['images']:,} {pilot['data_kind']}: it is that trial")  # fmt: skip


def plan_epoch(cfg: TrainConfig, pilot: dict, budget: TrialBudget, echo: Callable[[str], None], *,
               min_trial_steps: int) -> int | None:  # fmt: skip
    """The images each of the trials' and the run's epochs draws (as ``epoch_images``) so that the default trial and
    one epoch of the run fit in what is left of the ``budget`` at the ``pilot``'s pace; None where ``cfg``'s epochs
    fit (or no fewer images would: a trial of fewer than ``min_trial_steps`` steps tells nothing). Said."""
    kind, steps, left = pilot["data_kind"], pilot["steps"], budget.seconds - budget.spent() - budget.test_s
    epoch = epoch_items(cfg, pilot["train_items"])
    # a trial on TRIAL_FRACTION of an epoch and one epoch of the run, each a call of train besides its training
    need = 2 * pilot["call_s"] + (1 + TRIAL_FRACTION) * epoch * pilot["image_s"]
    said = (f"auto: the {budget.said} budget: a pilot of {steps_text(steps)} trained {1 / pilot['image_s']:.0f} "
            f"{kind}/s ({seconds_text(pilot['wall_s'])} in all); a trial on {TRIAL_FRACTION:.0%} of an epoch of "
            f"{epoch:,} {kind} and one epoch of the run take about {seconds_text(need)}")  # fmt: skip
    has = f"the {seconds_text(left)} left" if left > 0 else "what the budget has left (nothing)"
    has += f" (about {seconds_text(budget.test_s)} more kept for the final test)" if budget.test_s else ""
    if need <= left:
        echo(f"{said}, within {has}")
        return None
    # a step draws a batch on each rank (a batch size "auto" measured: the pilot's images a step)
    batch = cfg.batch_size * budget.world if isinstance(cfg.batch_size, int) else pilot["images"] / max(steps, 1)
    fewest = math.ceil(min_trial_steps * batch / TRIAL_FRACTION)  # the trial's steps the choice needs
    images = math.floor((left - 2 * pilot["call_s"]) / ((1 + TRIAL_FRACTION) * pilot["image_s"]))
    if max(images, fewest) >= epoch:
        echo(f"{said}, more than {has}: the run will end past the budget (an epoch of the set is no longer than the "
             f"{fewest:,} {kind} a trial of {min_trial_steps} steps needs)")  # fmt: skip
        return None
    over = (
        "" if images >= fewest else f", past the budget: fewer would leave a trial under {steps_text(min_trial_steps)}"
    )
    images = max(images, fewest)
    trial = max(1, round(images * TRIAL_FRACTION))
    echo(f"{said}, more than {has}: the run's epochs draw {images:,} of the {epoch:,} {kind} (as --epoch-images "
         f"{images} would; each trial {trial:,}){over}")  # fmt: skip
    return images


def epoch_items(cfg: TrainConfig, train_items: int) -> int:
    """About how many of ``train_items`` one of ``cfg``'s epochs draws (the share a run's loaders visit).

    >>> epoch_items(TrainConfig(epoch_fraction=0.5), 1000), epoch_items(TrainConfig(epoch_images=300), 1000)
    (500, 300)
    """
    return round(train_items * epoch_share(train_items, cfg.epoch_fraction, cfg.epoch_images))
