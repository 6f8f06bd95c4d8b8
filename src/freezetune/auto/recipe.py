"""The auto recipe (``freeze: auto``, the default): decide which stages to freeze by measurement, then fine-tune.

Which block should train depends on the data (surgical fine-tuning, Lee et al. 2023): a small shift is best served
by tuning the last stages over frozen features, a larger one by tuning deeper. The frozen-prefix cache makes it
cheap to ask the data. The procedure, every step printed and written to ``recipe.json`` in the run directory (the
numbers of steps 1 to 3, and the measurements behind them, are in ``auto/rule.py``; the trials, and which of them run,
in ``auto/trials.py``; the plan of the run, steps 4 and 5, in ``auto/plan.py``; a budget's pilot in
``auto/budget.py``; a resume, which trains the decision kept, in ``auto/resume.py``):

1. Candidates: the last ``k`` stages and the head train, for ``k = MIN_TRAINED_STAGES .. MAX_TRAINED_STAGES`` (2, 3
   and 4; fewer on a model with fewer stages); everything before is frozen (BatchNorm frozen). All candidates share
   one feature cache, cut before the deepest candidate's first trainable stage: the prefix runs once per image for all
   of them and for the run. A partly frozen network takes larger steps than a whole one: candidate ``k`` trains at
   ``lr * LR_BOOST * min(1, 2 / k)`` (1e-2, 6.7e-3, 5e-3 for the default lr 1e-3), which beat the full fine-tune's
   1e-3 on every dataset measured. Not a Hugging Face text model's: its transformer layers train at ``lr * min(1,
   2 / k)`` (``TEXT_LR_BOOST``, 1).
2. Trials: each candidate trains one short epoch over a random ``TRIAL_FRACTION`` of a run epoch's training images
   (of the training set, unless ``epoch_fraction`` or ``epoch_images`` make epochs shorter), with its LR schedule run
   to the end within it, and is scored on the validation split (its accuracy; its macro-F1 under ``monitor:
   val_f1``, where every class counts alike). The test split is never looked at. The default
   candidate's trial runs first; the others run only if the split has ``MIN_VAL_TO_COMPARE`` (400) images or more: a
   smaller one cannot tell apart candidates a few points apart, and its noisy verdicts cost accuracy. Nor when the
   trial took fewer than ``MIN_TRIAL_STEPS`` (10) optimizer steps: its score then moves more from seed to seed than
   the candidates differ. Under ``budget`` a pilot of a few steps first measures the pace (``auto/budget.py``):
   where the default's trial and one epoch of the run would not fit, every epoch draws fewer images.
3. Choice: the last three stages (``DEFAULT_TRAINED_STAGES``), unless another candidate beats them on the validation
   split by more than its noise (one standard error of the difference of two accuracies on that many images): a
   small validation split does not get to overturn it. Each candidate trained for a whole run (3 epochs, 3 seeds, 100
   images a class, digits and photo patches) put the last 3 at most 0.31 points below the best and the last 1 1.7-2.3
   points below it, though its half-epoch trials often scored highest: a short trial favours what learns fastest.
4. The run: the chosen candidate trains for ``epochs`` epochs (with ``budget``: as many as the time left affords at
   its measured pace, less the final test's at the trials' pace of an evaluation, at least one, at most ``epochs``
   where the config sets it, else ``MAX_BUDGET_EPOCHS``), reading the shared cache. It starts from its trial's
   weights, head included (as LP-FT starts the fine-tune from a fitted head, Kumar et al. 2022): the trial's half
   epoch is not thrown away. From
   there it takes smaller steps, at ``RUN_LR_FACTOR`` times its trial's learning rate: +0.36, +0.32 and +0.55 points
   on Fashion-MNIST, digits and photo patches over the trial's own (3 seeds each, 100 images a class). When
   the validation set was held out automatically and nothing in the run needs it (no early stopping or plateau
   unfreezing), those images train too (``refit``; the run's ``best.pt`` is then its last epoch): the choice is made,
   and 10 % more data is worth more than a score nobody acts on. With ``per_class`` they join only if no class then
   exceeds it (held out of a larger pool, they are not the user's few-shot data). ``--val-split``, ``--val-data`` or
   ``--no-refit`` keep a validation set. The trials' metrics stay in ``auto-trials/``, and the chosen one's weights.
   Its weights end as their moving average over the last ``RUN_AVERAGE`` (half) of its steps (``average_weights``,
   ``training/averaging.py``), their BatchNorm statistics recomputed for them: +1.05, +0.31 and +0.45 points on
   Fashion-MNIST, digits and photo patches (3 seeds, 100 images a class, 64 px, 3 epochs; every seed as high or
   higher), for about 0.3-0.9 s of a 9 s run (the step's average, the statistics' pass). Not a Hugging Face text
   model's run: MiniLM lost 0.80 and 0.48 points so on man page and Debian package sections.
5. Few images (an image model whose default trial took fewer than ``PROBE_BELOW_STEPS`` steps): a head that starts
   random, trained at the boosted LR for a few steps, pulls the stages it trains away from their pretrained features
   before it has settled. So the head is fitted first, alone on the frozen network's features (a linear probe:
   ``epochs`` epochs at 10x the head's LR, over the run's training data, features cached at the head), and the run
   starts from the probed head, at the asked LR, its trainable stages' BatchNorm statistics held (LP-FT as Kumar et
   al. 2022 run it; unless ``bn_stats`` asks for ``update``); the trial's weights are not used, its pace is
   (``--budget``). Fashion-MNIST at 10 images a class, 224 px, 10 epochs (CPU, 3 seeds): 70.4 % before, 78.7 % so (a
   linear probe alone: 70.9 %); at 64 px 69.2 % before, 72.5 % so. Held statistics at 3.3e-3 (the trial's LR,
   halved) collapsed every seed to one class; statistics updated instead scored 73.1 % (224 px, seed 0). 3-step
   trials (20 a class): 79.0 % before, 80.3 % so at 224 px, 10 epochs (every seed higher). From 4-step trials on
   (25, 50, 100 a class at 64 px) the step cost 1.1 to 1.9 points: there the boosted trial's start is kept; so it is
   for a run shorter than ``PROBE_MIN_RUN_STEPS`` steps, too short to move on from a probed head (10 a class, 64 px,
   3 epochs: 62.1 % probed, 70.4 % from the trial).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from freezetune._io import atomic_write_text
from freezetune.auto import budget as auto_budget
from freezetune.auto import plan as auto_plan
from freezetune.auto import resume as auto_resume
from freezetune.auto import trials as auto_trials
from freezetune.auto.plan import (
    HELD_STATS,
    at_lr,
    few_shot,
    measured_trials,
    refits,
    run_bn_stats,
    run_epochs,
    run_refits,
    run_warmup,
    shared_config,
    steps_text,
)
from freezetune.auto.rule import (
    DEFAULT_TRAINED_STAGES,
    LR_BOOST,
    TEXT_LR_BOOST,
    TRIAL_FRACTION,
    candidates,
    default_stages,
)
from freezetune.config.options import METRIC_NAMES, budget_text, compared_by, parse_duration
from freezetune.config.train_config import TrainConfig, epochs_of
from freezetune.run import checkpoint
from freezetune.run import log as run_log
from freezetune.run.directory import RECIPE_FILE, TRIALS_DIR

RUN_LR_FACTOR = 0.5  # the run trains at its trial's learning rate times this
RUN_AVERAGE = 0.5  # the run's weights end as their average over this last share of its steps (unless average_weights)
# ... but a Hugging Face text model's: MiniLM (3 seeds) scored 69.29 % so on man page sections, 70.09 % without, and
# 78.74 % against 79.22 % on Debian package sections
_CACHED = ", its features cached once where the data allows"  # not a text model's: texts are not cached
PROBE_DIR = "probe"  # the probe's run, beside the trials' in auto-trials/


def run_average(asked: float | None, text: bool) -> float:
    """The share of its steps over which the auto recipe's run averages its weights: ``asked`` (``average_weights``)
    where given, else ``RUN_AVERAGE`` for an image model and none for a Hugging Face text model (``text``).

    >>> run_average(None, False), run_average(None, True), run_average(0.25, True)
    (0.5, 0.0, 0.25)
    """
    return (0.0 if text else RUN_AVERAGE) if asked is None else asked


def run(cfg: TrainConfig, *, echo: Callable[[str], None] = print, train: Callable | None = None):
    """Measure, choose, train (see the module docstring); returns the run's ``RunResult`` (in ``cfg.out``)."""
    from freezetune.device.distributed import broadcast, init_from_env, main_echo
    from freezetune.run import directory as runtime
    from freezetune.training import trainer

    train = train or trainer.train
    info = init_from_env(cfg.device)  # under torchrun: rank 0 says and writes; every rank takes its decisions
    echo = main_echo(echo, info)
    # rank 0's clock names it
    out = broadcast(Path(cfg.out) if cfg.out else runtime.new_run_dir(cfg.model, claim=info.is_main), info)
    if info.is_main:  # a process running in it refuses this one before the resume below rewrites its recipe.json
        from freezetune.run import lock as run_lock

        run_lock.claim(out)
    saved = out / RECIPE_FILE
    if cfg.resume and saved.is_file():  # the decision was made before the interruption: keep it
        # the trials' seconds count after a resume too (a sweep's row)
        began = time.perf_counter()
        resumed, trials = auto_resume.resumed(cfg, out, echo, write=info.is_main)
        result = train(resumed, echo=echo, recipe_run=True, later_epochs=0.0)
        if cfg.budget is not None:  # the run ended in silence on its budget, which its first call's clock had counted
            echo(auto_budget.resumed_took(budget_text(cfg.budget), resumed.epochs, time.perf_counter() - began))
        return _with_trial_seconds(result, trials)
    _check_plan(cfg)
    # a run dir in use is refused (or, resuming, one no run was started in) before any trial writes below it; the
    # trials and decision of an attempt stopped before its run finished an epoch are redone
    runtime.shared_run_dir(str(out), cfg.model, info, resume=cfg.resume, echo=echo)
    run_log.log_to(out)  # the trials' lines and the choice, in the run's train.log
    start = time.perf_counter()
    test_items = None
    if cfg.final_test:  # the trials do not read the test split: its problems would stop the run only after them
        from freezetune.recipes.named import check_test_data

        test_items = check_test_data(cfg)  # (a budget leaves time for scoring them)
    ks, cut, text = candidates(cfg)
    base, boost = shared_config(cfg, out, cut), TEXT_LR_BOOST if text else LR_BOOST

    def shared(trial_cfg: TrainConfig, **kwargs):  # rank 0 alone logs metrics rows: every rank takes its result
        if info.is_main:  # a trial of an interrupted earlier attempt starts afresh (rank 0 alone clears)
            shutil.rmtree(trial_cfg.out, ignore_errors=True)
        return broadcast(train(trial_cfg, **kwargs), info)  # (rank 1 scored "n/a", skipped trials, and the ranks hung)

    budget = auto_budget.TrialBudget(parse_duration(cfg.budget), budget_text(cfg.budget), start, info,
                                     test_items=test_items)  # fmt: skip
    said = run_log.introduced(echo, _intro(ks, cut, text, budget.said))
    pilot = first = None
    if budget.seconds is not None:  # how long a trial and an epoch take, measured: a large set's overran the budget
        pilot, base, first = _pilot(base, default_stages(ks), boost, out, shared, said, budget)
    # the trials' hold-out, lent: the final run trains on it; their cache, read by the run (and the other trials):
    # its epochs count when a trial decides whether a training store pays
    if pilot is None:
        later = epochs_of(cfg) / TRIAL_FRACTION + len(ks) - 1
    elif pilot["planned"]:  # the pilot shortened the epochs for the default's trial and about one of the run's (the
        later = 1 / TRIAL_FRACTION  # other trials run only if the time left still allows)
    else:  # a budget's are planned after the trials
        later = None
    lent = functools.partial(shared, refit_follows=refits(cfg), later_epochs=later)
    trials, choice, why = auto_trials.measure(base, ks, boost, out, lent, said, budget, first=first,
                                              piloted=pilot is not None)  # fmt: skip
    refit = run_refits(cfg, trials[0], echo)
    # the epochs planned before a probe (a budget's: rank 0's clock decides for every rank, theirs differ)
    longest, setup_s = _as_asked(cfg, pilot, trials, refit), pilot["setup_s"] if pilot else 0.0
    # the final test's seconds: the budget leaves time for it
    test_s, plan = auto_plan.final_test_seconds([pilot, *trials], test_items), []  # plan: the budget's lines
    if budget.seconds is not None and test_items and not test_s:
        plan.append(f"auto: the {budget.said} budget keeps no time for the final test of {test_items:,} "
                    f"{trials[0]['data_kind']}: no evaluation of the whole model was timed (no validation split, or "
                    "its stores were read from disk, an earlier attempt's or a cache dir's, not built, with no pace "
                    "of their build recorded)")  # fmt: skip
        echo(plan[-1])
    planned, _ = run_epochs(cfg, trials, choice, budget.spent(), refit, lambda line: None, setup_s=setup_s,
                            longest=longest, test_s=test_s)  # fmt: skip
    probe = None
    if few_shot(trials[0], text, planned, echo):  # too few steps to fit a random head at the boosted LR: probe it
        probe_base = dataclasses.replace(base, warmup_epochs=run_warmup(cfg, planned, lambda line: None))
        alone = functools.partial(shared, later_epochs=0.0)  # no later run reads a probe's store (cut at the head)
        probe = _probe(probe_base, planned, refit, out, alone, echo, steps=trials[0]["steps"])
    spent = budget.spent()  # the budget's plan is said and kept in recipe.json
    epochs, images = run_epochs(cfg, trials, choice, spent, refit, lambda line: plan.append(line) or echo(line),
                                probed=probe is not None, setup_s=setup_s, longest=longest, piloted=pilot is not None,
                                test_s=test_s)  # fmt: skip
    base = base if images is None else dataclasses.replace(base, epoch_images=images)  # the time left affords them
    warmup = run_warmup(cfg, epochs, echo)
    # from the trial's fitted weights: a smaller step (see the docstring); from a probe's head, the LR as asked
    run_lr = cfg.lr if probe else choice["lr"] * RUN_LR_FACTOR
    bn_stats = run_bn_stats(cfg.bn_stats, probe is not None)
    average = run_average(cfg.average_weights, text)
    how = f", weights averaged over the last {average:.0%} of its steps" if average else ""
    how += ", BatchNorm statistics held" if probe and bn_stats == HELD_STATS else ""
    # how long the run will take, at its trial's pace (a budget's line said it): the default command on a few
    # thousand 224 px images on a CPU trains for hours, and nothing said so
    run_s = epochs * sum(auto_plan.epoch_pace(choice, refit, trials[0]["n_val"]))
    later = ", longer once --unfreeze opens more stages" if cfg.unfreeze else ""
    pace = "" if cfg.budget else f" (about {auto_plan.duration_text(run_s)}{later})"
    drawn = f" of {base.epoch_images:,} {trials[0]['data_kind']}" if base.epoch_images != cfg.epoch_images else ""
    # the why on a line of its own: in one, 300 characters wrapped to four lines of a terminal pane
    echo(f"auto: chose to train the last {choice['trained_stages']} stage(s) + head (freeze {choice['freeze']}, lr "
         f"{run_lr:.1e}{how}){' from the probed head' if probe else ''} for {epochs} epoch(s){drawn}{pace}:\n"
         f"  {why}")  # fmt: skip
    init = _start_from(out, trials, choice, cfg.init, delete=info.is_main, probe=probe)
    decision = {"format": auto_resume.DECISION_FORMAT, "procedure": _procedure(), "asked": cfg.recorded(), "cut": cut,
                "trials": trials, "probe": probe,
                "default_trained_stages": DEFAULT_TRAINED_STAGES, "trial_fraction": TRIAL_FRACTION,
                "compared_by": compared_by(cfg.monitor),
                "budget_s": parse_duration(cfg.budget),
                # what the budget had spent before the run, the seconds it kept for the final test, and its plan
                "budget": {"spent_s": spent, "setup_s": setup_s, "test_s": test_s, "plan": plan} if cfg.budget else None,
                "pilot": pilot,
                "choice": {**choice, "epochs": epochs, "refit": refit, "why": why, "init": init, "run_lr": run_lr,
                           "bn_stats": bn_stats, "warmup_epochs": warmup, "average_weights": average,
                           "epoch_images": base.epoch_images}}  # fmt: skip
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, json.dumps(decision, indent=1))
    final = dataclasses.replace(at_lr(base, run_lr), freeze=choice["freeze"], epochs=epochs, refit=refit, init=init,
                                bn_stats=bn_stats, warmup_epochs=warmup, resume=False,
                                average_weights=average)  # fmt: skip
    # the last reader of the trials' cache: nothing reads its stores after it
    result = train(final, echo=echo, recipe_run=True, later_epochs=0.0)
    if budget.seconds is not None:
        spent = budget.spent()
        echo(budget.took(spent))
        if info.is_main:  # beside its plan: what it came to (the log's line alone said so)
            decision["budget"]["took_s"] = round(spent, 1)
            atomic_write_text(saved, json.dumps(decision, indent=1))
    if info.is_main and cfg.cache_dir is None:
        _say_kept_cache(out / "features", echo)
    return _with_trial_seconds(result, measured_trials(trials, probe, pilot))


KEPT_CACHE_SAID_MIB = 100  # a kept feature cache this large is named at the run's end, with how to reclaim it


def _say_kept_cache(folder: Path, echo: Callable[[str], None]) -> None:
    """The run's own feature cache (``features/``), kept for a ``--resume`` and later runs, named where it is large:
    at 224 px it holds about 120 MiB a thousand images, and a run dir of 100 000 kept 12 GiB unsaid."""
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
    if size >> 20 >= KEPT_CACHE_SAID_MIB:
        echo(f"note: the feature cache ({size >> 20:,} MiB) stays in {folder} for a --resume, and for later runs "
             f"given --cache-dir {folder}; delete it to reclaim the space")  # fmt: skip


def _intro(ks: list[int], cut: str, text: bool, budget: str | None = None) -> str:
    return (f"auto: choosing how many of the last stages to train ({', '.join(map(str, ks))}) from a trial each on "
            f"{TRIAL_FRACTION:.0%} of an epoch's training {'texts' if text else 'images'}, scored on the validation "
            f"split\n  what comes before {cut} is frozen in all of them{'' if text else _CACHED}; the default's "
            f"trial first, the others' if the split holds {auto_trials.MIN_VAL_TO_COMPARE} or more"
            f"{f' and the {budget} budget leaves time for them' if budget else ''}")  # fmt: skip


def _pilot(base: TrainConfig, k: int, boost: float, out: Path, train: Callable, echo: Callable[[str], None],
           budget: auto_budget.TrialBudget) -> tuple[dict, TrainConfig, dict | None]:  # fmt: skip
    """A budget's pilot (``auto.budget``): the default candidate's trial cut to a few steps, streamed, its pace
    recorded; returns it, ``base`` with the epoch length that pace affords (as asked where it all fits), and the
    default's trial where the pilot was it (a trial no longer than the pilot's steps)."""
    trial_cfg = auto_trials.trial_config(base, k, boost, out)
    pilot_cfg = auto_budget.pilot_config(trial_cfg, budget.world)  # in the trial's dir: it may be the trial
    # "up to": the trial's part of a small set's epoch is fewer steps (it said 8, and the next line "a pilot of 3")
    echo(f"auto: the {budget.said} budget: a pilot of the default (last {k} stages), up to "
         f"{auto_budget.PILOT_STEPS} steps, measures the pace first")  # fmt: skip
    before = budget.spent()
    # no later reader: a store pays only where the pilot's own draws exceed the set (tiny data, then read again)
    result, seconds = auto_trials.measurement(pilot_cfg, functools.partial(train, later_epochs=0.0), echo,
                                              brief=False, during="the pilot of the budget (pilots are not resumed)",
                                              again="the pilot and the trials again")  # fmt: skip
    pilot = auto_budget.pace(result, budget.spent() - before, seconds)
    budget.call_s = pilot["call_s"]  # each later trial's set-up, where the budget weighs the other trials
    budget.test_s = auto_plan.final_test_seconds([pilot], budget.test_items)  # kept for the run's final test
    # a pilot that drew the trial's whole epoch is that trial: the plan of a trial and a run epoch ahead of it read as
    # if the trial were still to run (the run's own plan follows the trials)
    was_trial = pilot["images"] >= auto_budget.epoch_items(trial_cfg, result.train_items)
    if was_trial:
        echo(auto_budget.pilot_was_trial(pilot, budget))
        images = None
    else:
        images = auto_budget.plan_epoch(base, pilot, budget, echo, min_trial_steps=auto_trials.MIN_TRIAL_STEPS)
    pilot["planned"] = images
    first = None
    if was_trial:
        # it drew the trial's whole epoch, as the trial would (the same images, seed and LR): it is the default's
        # trial (a small set's pilot repeated it, and the budget paid twice); else the trial starts its dir afresh
        first = auto_trials.trial_row(base, k, trial_cfg, result, seconds, echo)
        pilot["seconds"], pilot["is_trial"] = {}, True  # its seconds counted once, as the trial's
    return pilot, base if images is None else dataclasses.replace(base, epoch_images=images), first


def _as_asked(cfg: TrainConfig, pilot: dict | None, trials: list[dict], refit: bool) -> int | None:
    """The images of one of the run's epochs as asked, where a budget's pilot shortened them (else None)."""
    if not pilot or not pilot["planned"]:
        return None
    return auto_budget.epoch_items(cfg, pilot["train_items"] + (trials[0]["n_val"] if refit else 0))


def _probe(base: TrainConfig, epochs: int, refit: bool, out: Path, train: Callable, echo: Callable[[str], None], *,
           steps: int) -> dict:  # fmt: skip
    """Fit the head alone on the frozen network's features (``recipes.named.probe_lrs``: 10x the head's LR), for the
    run's ``epochs`` over the run's training data (``refit``); its weights start the run."""
    from freezetune.recipes.named import probe_lrs

    probe_cfg = dataclasses.replace(
        base, freeze="backbone", bn="frozen", **probe_lrs(base), cache_at=None, epochs=epochs, unfreeze=None,
        early_stop=None, final_test=False, tensorboard=False, resume=False, refit=refit,
        out=str(out / TRIALS_DIR / PROBE_DIR),
    )  # fmt: skip
    echo(f"auto: a trial of {steps_text(steps)} (under {auto_plan.PROBE_BELOW_STEPS}) is too short for a new head to "
         "settle before the stages it trains drift: the head is fitted first, alone on the frozen network's features "
         f"(a linear probe, {epochs} epoch(s) at lr {probe_cfg.lr:.1e}); the run starts from it (LP-FT)")  # fmt: skip
    result, seconds = auto_trials.measurement(probe_cfg, train, echo, brief=True, during="the probe of the head "
                                              "(probes are not resumed)", again="the trials again")  # fmt: skip
    metric = compared_by(base.monitor)
    scored = "no validation (refit)" if refit else f"{METRIC_NAMES[metric]} {auto_trials.pct(result.best_val(metric))}"
    echo(f"auto: the probed head: {scored} after {epochs} epoch(s) ({sum(seconds.values()):.1f}s)")
    return {"lr": probe_cfg.lr, "epochs": epochs, "refit": refit, "val_acc": result.best_val_acc,
            "val_f1": result.best_val("val_f1"), "seconds": seconds,
            "weights": str(result.run_dir / checkpoint.BEST)}  # fmt: skip


def _with_trial_seconds(result, trials: list[dict]):
    """The final run's result with every trial's seconds added: the measurement is part of the training cost."""
    seconds = dict(result.seconds)
    for key in ("cache", "epochs"):
        seconds[key] = seconds.get(key, 0.0) + sum(t.get("seconds", {}).get(key, 0.0) for t in trials)
    return dataclasses.replace(result, seconds=seconds)


def _start_from(out: Path, trials: list[dict], choice: dict, init: str | None, *, delete: bool = True,
                probe: dict | None = None) -> str | None:  # fmt: skip
    """The weights that start the run: the probe's ``best.pt`` where a probe ran, else the chosen trial's (else
    ``init``: a trial that saved none, as one whose loss was never finite); the other trials' weights are deleted
    (``delete``: by rank 0 alone under torchrun)."""
    for t in trials:
        if (probe or t is not choice) and delete:
            (auto_trials.trial_dir(out, t["trained_stages"]) / checkpoint.BEST).unlink(missing_ok=True)
    chosen = auto_trials.trial_dir(out, choice["trained_stages"]) / checkpoint.BEST
    weights = Path(probe["weights"]) if probe else chosen
    return os.path.abspath(weights) if weights.is_file() else init


def _procedure() -> str:
    """The procedure as this module's docstring tells it, for ``recipe.json``; ``python -OO`` strips docstrings
    (the run then crashed after its trials, on None.split)."""
    if not __doc__:
        return "see the docstring of freezetune.auto.recipe (python -OO removed it from this process)"
    return __doc__.split("\n\n", 2)[2].strip()


def _check_plan(cfg: TrainConfig) -> None:
    """The stages an ``unfreeze`` plan names, checked before the trials: a name the model has no stage of stopped the
    run only after them, their files left behind."""
    from freezetune.freezing.schedule import parse_schedule

    if cfg.unfreeze is None or not (plan := parse_schedule(cfg.unfreeze).plan):
        return
    from freezetune.freezing.freeze import resolve_stages
    from freezetune.model.create import create_model

    model, _ = create_model(cfg.model, "none", img_size=cfg.img_size)  # the structure alone: no weights to read
    for spec in plan.values():
        resolve_stages(model, spec)
