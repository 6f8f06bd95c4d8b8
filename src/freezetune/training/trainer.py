"""The training engine: pretrained model -> freeze -> new head -> train (progressive unfreezing) -> best checkpoint.

``train(cfg)`` is the whole run; ``Trainer`` exposes its parts for notebooks. How a run is set up, and in which
order, is ``RunSetup``'s business (``run/setup.py``); what a step reads (images or cached features), the
``FeaturePath``'s; how data becomes batches, the ``Loaders'``; how far the run is, ``Progress``'s; what a resume
restores, ``checkpoint``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import time
from collections.abc import Callable, Iterator
from itertools import islice

import torch

from freezetune.config.check import validate
from freezetune.config.options import FRACTIONS
from freezetune.config.train_config import TrainConfig, epochs_of
from freezetune.data import noun
from freezetune.data.layout import check_val_apart_from_test
from freezetune.device import hardware
from freezetune.device.distributed import all_reduce_sum, barrier, broadcast, broadcast_tensors, in_group, leave_group
from freezetune.device.memory import out_of_memory_hint
from freezetune.errors import ConfigError, TrainingError
from freezetune.freezing.freeze import count_parameters
from freezetune.freezing.schedule import epochs_on_cut
from freezetune.inference.evaluation import evaluate_best, write_evaluation
from freezetune.recipes import named as recipes
from freezetune.recipes.request import refuse_a_plain_resume_of_a_recipe
from freezetune.run import checkpoint, reporting
from freezetune.run import directory as runtime
from freezetune.run import lock as run_lock
from freezetune.run import log as run_log
from freezetune.run.collector import older_objects_frozen
from freezetune.run.interrupt import AT_ONCE_UNDER_DDP, OUTSIDE_A_STEP, RESUME, RunInterrupted, StopRequest, pause_point
from freezetune.run.records import after_stop, drop_stale_test
from freezetune.run.setup import RunSetup
from freezetune.training import bn_refresh, epoch_log, rng
from freezetune.training.progress import RunResult, other_monitor
from freezetune.training.step import one_value_batch


# gradients on, whatever the caller's mode: a notebook cell's torch.set_grad_enabled(False) or inference_mode left
# every run failing at its first backward ("element 0 of tensors does not require grad"); restored on return
@torch.inference_mode(False)
@torch.enable_grad()
def train(cfg: TrainConfig | None = None, *, echo: Callable[[str], None] = print, resumable: bool = True,
          brief: bool = False, recipe_run: bool = False, validation_needed_by: tuple[str, ...] = (),
          refit_follows: bool = False, later_epochs: float | None = None, **settings: object) -> RunResult:  # fmt: skip
    """Run a whole fine-tuning job as configured; ``echo`` receives the human-readable log lines.

    A recipe (``recipe``, or ``freeze: auto``, the default) runs through ``freezetune.recipes.named``.
    ``resumable=False`` writes no ``last.pt`` (only ``best.pt``) and no ``report.png``: for a run nobody will resume, as
    the auto recipe's trials, whose resume state (the optimizer's moments included) is the largest file a run writes;
    its progress bars are named after its run dir (a trial's "last-3: epoch 1/1"), as the run's own are not. ``brief``:
    one line for what trains, not the stage table (the auto recipe's later trials, whose table differs from the first's
    in a row or two).
    ``recipe_run``: a recipe's run in its own dir (the auto recipe's final run, a named recipe's last phase), which
    keeps the ``recipe.json`` (and ``auto-trials/``) beside it (a fresh start of any other run clears them: they were
    an earlier run's).
    ``validation_needed_by``: what, beyond the run's own settings, needs validation data (a sweep, which compares its
    recipes on it): data without any is refused at set-up, naming it, in every run a recipe starts too (a sweep
    found out only after its first recipe had trained). ``refit_follows``: a later run trains on the validation
    images this run holds out automatically (the auto recipe's trials): a class short of ``per_class`` by them alone
    is noted, not warned of. ``later_epochs``: epochs of this run's length that later runs train on the feature
    stores this one keeps in ``cache_dir`` (the auto recipe's run, on its trials' cache; 0: none; None: unknown, as a
    sweep's other recipes): a training store is built only if the draws it serves outnumber its images
    (``FeaturePath``).

    >>> from freezetune.config.train_config import TrainConfig
    >>> train(TrainConfig(data="DIR_OF_IMAGES", epochs=3))  # doctest: +SKIP
    """
    # SIGTERM/SIGINT end the run with RunInterrupted at once, except in the training loop (Trainer.fit), which saves
    # its place first; the handlers found are put back after the run
    if settings:  # ft.train(data="DIR") was a TypeError of an unexpected keyword, where a dict got the way to do it
        given = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        raise ConfigError(f"train() takes a freezetune.TrainConfig, not settings ({given}): "
                          f"train(TrainConfig({given}))")  # fmt: skip
    validate(cfg)  # before a recipe plans anything: every problem of the config, with the choices
    if cfg.epochs is None and cfg.budget is None:  # a budget's auto recipe plans them (auto.plan.run_epochs)
        cfg = dataclasses.replace(cfg, epochs=epochs_of(cfg))
    runtime.check_resume_target(cfg.out, cfg.resume)  # a recipe would otherwise look in a new timestamped dir
    runtime.check_folders(cfg.out, cfg.cache_dir, (cfg.data, cfg.val_data))
    check_val_apart_from_test(cfg.data, cfg.val_data)
    # under torchrun the outermost call leaves the process group, once: a recipe's runs (the auto recipe's trials and
    # run) share it; left and joined again between them, the ranks' third join never met
    owner = not in_group()
    # the log (train.log) around the rest: it records the line of whatever error or stop ends the run
    # run.lock.scope: the run dirs this run claimed (its own, a recipe's, its trials') are released at its end;
    # the collector's full passes skip what the imports made (run.collector)
    with run_log.log(echo) as echo, out_of_memory_hint(cfg.batch_size), StopRequest().listening(defer=False), \
            run_lock.scope() as claimed, older_objects_frozen(collect_first=torch.cuda.is_initialized()):  # fmt: skip
        try:
            if cfg.resume and not recipe_run:  # a recipe's own run resumes through the recipe
                refuse_a_plain_resume_of_a_recipe(cfg)
            if recipes.recipe_of(cfg) is not None:  # each run of the recipe needs what this one does
                each = functools.partial(train, validation_needed_by=validation_needed_by)
                return recipes.run(cfg, echo=echo, train=each)
            return Trainer(cfg, echo=echo, resumable=resumable, brief=brief, recipe_run=recipe_run,
                           validation_needed_by=validation_needed_by, refit_follows=refit_follows,
                           later_epochs=later_epochs).fit()  # fmt: skip
        except RunInterrupted as exc:  # a run dir of runs/ the command did not name: "--resume" alone found no run
            if cfg.out is None and claimed:
                raise exc.naming(claimed[0]) from None
            raise
        finally:
            if owner:
                leave_group()
            _free_device_memory()


def _free_device_memory() -> None:
    """A run's model and optimizer state sit in reference cycles (torch.fx's tracer leaves some around the model):
    freed when the collector next runs a full pass. The outermost run's are freed as it returns
    (``run.collector.older_objects_frozen``); on a GPU each run's are, so that the auto recipe's trials do not hold
    device memory through its run. (After a failure the traceback keeps the run's frames, and so the run, alive.)"""
    if torch.cuda.is_initialized():
        gc.collect()


class Trainer(RunSetup):
    """One training run: set up from a validated config (``RunSetup``: what is built, in which order), then
    ``fit()`` trains its epochs, unfreezes on schedule, saves ``best.pt``/``last.pt`` and scores the test split."""

    def fit(self) -> RunResult:
        """Train the remaining epochs, then plot the curves and score ``best.pt`` on the test split."""
        self.say_setup()
        self.fit_start = start = time.perf_counter()
        try:
            # one process: a signal is acted on at the next step boundary, after saving there; under DDP the ranks
            # could not agree on that step without a collective every step, so a signal stops them at once
            at_once = AT_ONCE_UNDER_DDP if self.dist.enabled else OUTSIDE_A_STEP
            with self.stop.listening(defer=not self.dist.enabled, at_once=at_once):
                self._epochs()
            self.checkpoints.wait()  # best.pt is scored next
        except BaseException as exc:
            self._close(failing=True)
            if isinstance(exc, RunInterrupted) and self.dist.is_main and self.resumable:
                after_stop(self.run_dir, monitor=self.cfg.monitor, best_epoch=self.progress.best_epoch, echo=self.echo)
            raise
        self._close(failing=False)
        self.seconds["epochs"] = time.perf_counter() - start
        seconds = self._spent()  # this process's and the earlier ones' of a resumed run
        if self.dist.is_main and self.resumable:  # not a trial's: a chart of one short epoch, half a second each
            reporting.plot_report(self.run_dir / reporting.METRICS_CSV, self.run_dir / reporting.REPORT_PNG,
                                  monitor=self.cfg.monitor, best_epoch=self.progress.best_epoch)  # fmt: skip
        test = self._final_test()
        barrier(self.dist)
        p = self.progress
        # no test split, or --no-final-test: the run still ends on a line naming its result (not the auto recipe's
        # trials, which are not resumed: the recipe says their scores)
        best_gone = self.dist.is_main and self.resumable and not (self.run_dir / checkpoint.BEST).exists()
        if best_gone:  # deleted since it was saved (a resume of a finished run): nothing to name, nothing scored
            scored = (self.run_dir / runtime.TEST_METRICS).exists()
            kept = f" ({runtime.TEST_METRICS} keeps its score from before)" if scored else ""
            self.echo(f"best.pt is missing from {self.run_dir} (deleted since epoch {p.best_epoch} saved it): it is "
                      f"not scored on the test split{kept}")  # fmt: skip
        elif test is None and (self.cfg.final_test or self.resumable):
            metric = ""
            if p.best_metric is not None:  # an accuracy as the other end lines give it: "75.0 %"
                value = f"{100 * p.best_metric:.1f} %" if self.cfg.monitor in FRACTIONS else f"{p.best_metric:.4f}"
                metric = f", {self.cfg.monitor} {value}"
            why = "no test split to score" if self.cfg.final_test else "the test split is not scored in this run"
            self.echo(f"best.pt: epoch {p.best_epoch}{metric} ({why}) -> {self.run_dir}")
        return RunResult(self.run_dir, p.best_epoch, p.best_metric, test, list(self.metrics.rows), seconds,
                         data_kind=noun(self.data.train), no_refit=self.data.no_refit,
                         monitor=self.cfg.monitor, steps_per_epoch=self.steps_per_epoch,
                         train_items=len(self.data.train), eval_item_s=self.features.eval_item_s)  # fmt: skip

    def _model_record(self) -> dict:
        """What a checkpoint holds to rebuild the model: weights, resolved config, classes, preprocessing."""
        return checkpoint.model_record(self.model, self.cfg.recorded(), self.classes, self.preprocess, self.hf_files)

    def _spent(self, *, running: bool = False) -> dict[str, float]:
        """The run's seconds so far: this process's (``running``: the epoch loop's up to now) plus its earlier ones'."""
        now = dict(self.seconds)
        if running and self.fit_start is not None:
            now["epochs"] = time.perf_counter() - self.fit_start
        return {k: self.spent_before.get(k, 0.0) + now.get(k, 0.0) for k in {*now, *self.spent_before}}

    def _close(self, *, failing: bool) -> None:
        """After the epochs, Ctrl-C and errors too: the saves already made land, TensorBoard is flushed, the loaders'
        workers stop with the run (not when the garbage collector frees them). A run already ``failing`` keeps its own
        exception: what the clean-up meets then (loader workers the same SIGTERM killed) is not raised over it."""
        steps = (lambda: self.checkpoints.wait(raise_error=not failing), self.metrics.close, self.features.close,
                 self._tidy_spill)  # fmt: skip
        for step in steps:
            try:
                step()
            except Exception:
                if not failing:
                    raise

    def _tidy_spill(self) -> None:
        """Under torchrun each rank clears only its own spill folder (another's, empty for a moment, vanished as that
        rank was about to write there): the first rank removes the shared ``cache/`` once it is empty, when no rank
        builds a store any more (after the epochs, a stop or a failure: it stayed, empty, in the run dir)."""
        if self.dist.enabled and self.dist.is_main:
            self.features.remove_empty_spill()

    def _epochs(self) -> None:
        cfg, unfreezer = self.cfg, self.state.unfreezer
        # stages unfrozen after the previous epoch: non-empty only when resuming right after an unfreeze
        unfrozen = unfreezer.unfrozen_after(self.progress.epoch - 1) if unfreezer is not None else []
        if self.trained_out():  # a resume of a run that stopped early is finished (the report and the test follow),
            return  # as a run that trained all its epochs is
        unfrozen = unfrozen or self.caught_up
        for epoch in range(self.progress.epoch, cfg.epochs):
            row = self._run_epoch(epoch, unfrozen)
            last = epoch + 1 == cfg.epochs  # nothing trains after the last epoch: no unfreeze, no cache rebuild
            warming = self._warming(epoch)  # a stalling metric has not plateaued while the LR climbs
            unfrozen = [] if last else self._open_stages(epoch, row, warming)
            improved = self.progress.update(epoch, row.get(cfg.monitor), row.get(other_monitor(cfg.monitor)),
                                            spent=self._spent(running=True))  # fmt: skip
            if warming or unfrozen:  # after the update: new stages get the full patience (they got one epoch less)
                self.progress.reset_patience()
            self._save_and_say(row, improved)
            if improved and (tie := self.progress.noise_tie(noun(self.data.train))):  # best.pt moved to a lower score
                self.echo(tie)
            if unfrozen:
                self._say_unfrozen(epoch, unfrozen)
            saved = "saved in last.pt" if self.resumable else "not saved: this run is not resumed"
            if self.stop.requested:  # the signal came during validation or the save (a resume builds the cache)
                self.checkpoints.wait()
                raise self.stop.interrupted(f"after epoch {epoch + 1} ({saved})")
            if unfrozen:  # the frozen prefix got shorter: rebuild at the new boundary, or read images
                try:  # (a resume builds it again)
                    go_on = f"; continue with {RESUME}" if self.resumable else ""  # (a trial's: its recipe says)
                    with self.stop.at_once_in(f"while the feature cache was rebuilt after epoch {epoch + 1} "
                                              f"({saved}){go_on}"):  # fmt: skip
                        pause_point("rebuild")
                        self.features.build(epochs_left=epochs_on_cut(unfreezer, epoch + 1, cfg.epochs))
                except RunInterrupted:
                    self.checkpoints.wait()  # the epoch's last.pt, still being written
                    raise
            if cfg.early_stop and self.progress.bad_epochs >= cfg.early_stop and not last:
                self.echo(f"early stop: {cfg.monitor} did not improve for {cfg.early_stop} "
                          f"epoch{'s' if cfg.early_stop != 1 else ''}")  # fmt: skip
                break

    def _save_and_say(self, row: dict, improved: bool) -> None:
        """Hand the epoch's checkpoints to the writer, then say its line: a stop at once (torchrun) or a closed output
        pipe at that line still lands them (``_close`` waits); said first, the epoch was shown, not saved. A save
        that fails (an earlier write's full disk) still lets the line be said before its error."""
        try:
            if self.dist.is_main:
                checkpoint.save_epoch(self.checkpoints, self._model_record(), self.state, self.progress,
                                      self.steps_per_epoch, row=row, improved=improved, last=self.resumable,
                                      data=self.data_print)  # fmt: skip
        finally:
            self.echo(epoch_log.format_epoch_line(row, noun(self.data.train), self.cfg.monitor))

    def _run_epoch(self, epoch: int, unfrozen: list[str]) -> dict:
        rng.seed_epoch(self.cfg.seed, epoch, rank=self.dist.rank)
        hardware.reset_peak_memory(self.device)
        self.step.start_epoch()  # the LRs the epoch's last step used name its metrics row
        start = time.perf_counter()
        train_stats = self._train_epoch(epoch, self.features.train_batches(epoch))
        # a resumed epoch took the time its steps before the stop took too: its img/s divided the whole epoch's images
        # by the resumed part's seconds (897 img/s for 120)
        seconds = time.perf_counter() - start + train_stats.pop("seconds_before")
        if (step := train_stats.pop("first_bad_step")) >= 0:  # stop before these weights reach last.pt or best.pt
            raise self._diverged(epoch, step)
        start = time.perf_counter()
        val = self.features.evaluate_val(self.precision, num_classes=len(self.classes), bar=self._bar("validation"))
        self.seconds["val"] += time.perf_counter() - start
        val = broadcast(val, self.dist)  # rank 0's numbers drive every rank's unfreeze and early-stop decisions
        if val is not None and val.get("loss") is not None and not math.isfinite(val["loss"]):
            # non-finite logits: weights that must not become best.pt (a NaN epoch's accuracy can still look best)
            raise TrainingError(f"the validation loss was not finite after epoch {epoch + 1}: training diverged; "
                                f"{self._kept()}")  # fmt: skip
        row = epoch_log.epoch_row(epoch, self.cfg.epochs, train_stats, val, seconds=seconds, unfrozen=unfrozen,
                                  optimizer=self.state.optimizer, params=count_parameters(self.model),
                                  peak_mb=hardware.peak_memory_mb(self.device), lrs=self.step.lrs)  # fmt: skip
        if self.resumable and epoch > 0 and not (self.run_dir / checkpoint.LAST).exists():
            # a dir without last.pt but with two rows holds finished work and is never restarted over
            # (run.directory.finished_work): the second row waits for the first last.pt, once a run
            self.checkpoints.wait()
        self.metrics.log_epoch(row)  # before best.pt: a best.pt without a row is another run's (run.directory)
        return row

    def _bar(self, label: str) -> str | None:
        """A progress bar's label where this process draws bars (``--progress``, rank 0), else None. A measurement's
        (an auto trial's, its probe's) names it: in a log file its bars read as the run's own ("epoch 1/1")."""
        if not self.draws_bars:
            return None
        return label if self.resumable else f"{self.run_dir.name}: {label}"

    def _train_epoch(self, epoch: int, batches) -> dict:
        self.model.train()
        meter = epoch_log.TrainProgress(len(batches), self._bar(f"epoch {epoch + 1}/{self.cfg.epochs}") or "",
                                        enabled=self.draws_bars, device=self.device)  # fmt: skip
        try:
            self._steps(epoch, batches, meter)
        except BaseException:  # a stop or an error: clear the bar's line, so the message that follows starts its own
            meter.abandon()
            raise
        stats = meter.close(lambda totals: all_reduce_sum(totals, self.dist))
        if stats["first_bad_step"] < 0:  # a diverged epoch's weights are never kept: a pass over its data for nothing
            averaged = self.state.average is not None and epoch + 1 == self.cfg.epochs
            if averaged:  # the run's weights from now on: validated, kept by last.pt (a resume finds it trained out)
                self.state.average.apply()
            self._refresh_bn(epoch, averaged=averaged)
        # DDP hands rank 0's buffers to every rank before each forward, so after the last step each rank holds the
        # BatchNorm statistics of its own last batch: take rank 0's, which last.pt records and validation uses
        broadcast_tensors(self.model.buffers(), self.dist)
        return {**stats, "skipped_batches": meter.skipped} if self.cfg.skip_nonfinite else stats

    def _refresh_bn(self, epoch: int, *, averaged: bool = False) -> None:
        """BatchNorm statistics of the layers that train recomputed when too few steps have passed for their running
        average to forget where it started (``bn_refresh``), before validation scores them and last.pt keeps them.
        Not in the auto recipe's trials (not resumable): their scores only compare candidates, by a rule measured on
        them as they were, and the pass cost 7 % of the main job's time for the same choice.

        Without validation (the default command's refit) nothing reads an epoch's statistics but its checkpoints,
        which the next epoch's replace: the pass is made once, after the last epoch, where the run's first epoch left
        them stale (on 40 images a class the first two epochs were: two passes, 4 % of the run, for checkpoints
        overwritten). A run stopped before its last epoch keeps running statistics. ``averaged``: the weights were
        just made their average (``average_weights``), which no step's statistics belong to: always recomputed."""
        if not self.resumable and not averaged:
            return
        unfreezes = self.state.unfreezer.events if self.state.unfreezer is not None else []
        steps = 0 if averaged else bn_refresh.steps_on(epoch, self.steps_per_epoch, unfreezes)
        if self.data.val is None and not averaged:
            if epoch + 1 < self.cfg.epochs:
                return
            steps = min(steps, self.steps_per_epoch)  # stale after the first epoch since the trainable part changed

        def batches():  # each through the frozen prefix alone (streamed), then joined: a prefix at four batches' size
            # could need four times a step's memory
            return ((self.features.step_inputs(x), y) for x, y in self.features.train_batches(epoch))

        bn_refresh.refresh_if_stale(self.features.train_module, steps, batches, self.step.forward,
                                    lambda t: all_reduce_sum(t, self.dist), self.dist.world)  # fmt: skip

    def _steps(self, epoch: int, batches, meter: epoch_log.TrainProgress) -> None:
        """The training steps of ``epoch`` (those a mid-epoch ``last.pt`` left, on resume), each saved after when
        asked."""
        for inputs, targets in self._remaining(batches, meter):
            try:
                stepped = self.step(self.features.train_module, self.features.step_inputs(inputs), targets, meter,
                                    cached=self.features.cached)  # fmt: skip
            except ValueError as exc:
                if "more than 1 value per channel" not in str(exc):
                    raise
                raise one_value_batch(exc, len(targets), self.cfg.batch_size, self.cfg.epoch_images) from None
            if not stepped and meter.skipped > self.cfg.skip_nonfinite:
                raise self._diverged(epoch, meter.step - 1, skipped=meter.skipped - 1)
            if stepped and self.state.average is not None:
                self.state.average.update()
            self._after_step(epoch, meter)

    def _diverged(self, epoch: int, step: int, skipped: int = 0) -> TrainingError:
        skips = f" after skipping {skipped} non-finite batch(es) this epoch (--skip-nonfinite)" if skipped else ""
        return TrainingError(f"the loss was not finite at epoch {epoch + 1}, step {step + 1}{skips}: training "
                             f"diverged; {self._kept()}")  # fmt: skip

    def _kept(self) -> str:
        """What the checkpoints hold when training diverged: a run that diverged in its first epoch saved none (a
        mid-epoch ``last.pt`` aside), and said that epoch 0 was kept in two files that did not exist."""
        p, tip = self.progress, "(try a lower --lr or --grad-clip 1.0)"
        if p.epoch == 0:
            mid = (self.run_dir / checkpoint.LAST).exists()  # --save-every-steps saved steps of epoch 1
            return f"{'only last.pt, mid-epoch, was' if mid else 'no checkpoint was'} saved: no epoch finished {tip}"
        if not p.best_epoch:  # no validation score was ever finite enough to pick a best
            return f"last.pt keeps epoch {p.epoch} {tip}"
        return f"best.pt and last.pt keep epoch {p.best_epoch} and {p.epoch} {tip}"

    def _remaining(self, batches, meter: epoch_log.TrainProgress) -> Iterator:
        """The epoch's batches from where a mid-epoch ``last.pt`` left it (all of them otherwise).

        The batches already trained are drawn and dropped rather than skipped in the sampler: the loader's
        workers, the device pipeline's generator and the cached views then reach the next batch in exactly the
        state they had, whatever the loader kind; only their loading is paid again. The process's RNG (in-process
        augmentation, dropout) is then put back as it was after that step.
        """
        p = self.progress
        batches = iter(batches)
        if p.step:
            for _ in islice(batches, p.step):
                pass
            meter.load_state_dict(p.partial["meter"])
            rng.set_rng_state(p.partial["rng"])
            self.step.start_epoch(p.partial.get("lrs"))
        return batches

    def _after_step(self, epoch: int, meter: epoch_log.TrainProgress) -> None:
        """Save ``last.pt`` mid-epoch every ``save_every_steps`` steps and on a stop signal (then stop)."""
        pause_point("step")
        every, step = self.cfg.save_every_steps, meter.step
        if not (self.stop.requested or (every and step % every == 0 and step < meter.total)):
            return
        # never save the weights of a non-finite step (the epoch's end reports it), nor a run nobody resumes
        if self.resumable and not meter.diverged:
            self.progress.at_step(step, {"meter": meter.state_dict(), "rng": rng.rng_state(), "lrs": self.step.lrs},
                                  spent=self._spent(running=True))  # fmt: skip
            last = checkpoint.last_record(self._model_record(), self.state, self.progress, self.steps_per_epoch,
                                          data=self.data_print)  # fmt: skip
            self.checkpoints.submit(best=None, last=last)
        if self.stop.requested:
            self.checkpoints.wait()
            saved = ("not saved: this run is not resumed" if not self.resumable
                     else "not saved: a non-finite step; last.pt holds the last save" if meter.diverged
                     else "saved in last.pt")  # fmt: skip
            raise self.stop.interrupted(f"at step {step}/{meter.total} of epoch {epoch + 1} ({saved})")

    # --- unfreezing and the final test ----------------------------------------------------------------------

    def _final_test(self) -> dict | None:
        """``best.pt`` on the test split, once, at the end: the one number no decision of the run has seen. Not
        scored (``--no-final-test``, no test split), an earlier attempt's scores of another ``best.pt`` go."""
        if not self.cfg.final_test or self.data.test is None:
            if self.dist.is_main:
                drop_stale_test(self.run_dir, self.progress.best_epoch, self.echo)
            return None
        result = evaluate_best(self.model, self.run_dir / checkpoint.BEST, self.data.test,
                               num_classes=len(self.classes), precision=self.precision,
                               channels_last=self.channels_last, loaders=self.loaders, dist=self.dist,
                               bar=self._bar("test (best.pt)"))  # fmt: skip
        if result is None:  # best.pt is gone (fit says so)
            return None
        result = {**result, "checkpoint": checkpoint.BEST, "epoch": self.progress.best_epoch}  # what it scored
        if not self.dist.is_main:
            return result
        self.echo(write_evaluation(result, self.classes, plot=self.run_dir / runtime.CONFUSION_PNG,
                                   metrics=self.run_dir / runtime.TEST_METRICS))  # fmt: skip
        f1 = f", macro-F1 {100 * result['macro_f1']:.2f}%" if self.cfg.monitor == "val_f1" else ""  # what it chose by
        self.echo(f"test accuracy {100 * result['acc']:.2f}%{f1} (best.pt, epoch {self.progress.best_epoch}) -> "
                  f"{self.run_dir}")  # fmt: skip
        return result
